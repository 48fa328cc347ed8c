"""KV-cache sizing per rank: one fact shared by the engine's pool and the planner's memory model.

Torch-free, in moeshard.core: the engine sizes its pool with it and the
planner's memory model (operator/planner.py ``kv_bytes_per_token``) too.

Attention TP splits the KV heads over the TP ranks when ``tp <= Hkv``. When
attention TP exceeds the KV head count (Qwen3-235B: 4 KV heads, TP 8), each
TP rank holds the ONE KV head its query heads read, replicated on
``tp / Hkv`` ranks, as vLLM does; then ``tp`` must be a multiple of ``Hkv``.

Shape legend: Hq query heads, Hkv KV heads, D head dim, L decoder layers.
"""

from __future__ import annotations

import math

from moeshard.core.layout import attention_tp_problem


def check_attention_tp(num_attention_heads: int, num_kv_heads: int, tp: int) -> None:
    """ValueError unless TP ``tp`` can split Hq query heads and split or replicate Hkv KV heads.

    The rule is moeshard.core.layout.attention_tp_problem, the one the planner enumerates with.
    """
    problem = attention_tp_problem(tp, tp, num_heads=num_attention_heads, num_kv_heads=num_kv_heads)
    if problem:
        raise ValueError(f"attention TP {problem}")


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads one TP rank stores: Hkv / tp, or 1 when TP exceeds Hkv (replicated)."""
    return max(1, num_kv_heads // tp)


def first_kv_head(num_attention_heads: int, num_kv_heads: int, tp: int, tp_rank: int) -> int:
    """Index of the first KV head TP rank ``tp_rank`` stores (the one its first query head reads)."""
    group = num_attention_heads // num_kv_heads  # G query heads per KV head
    return (tp_rank * (num_attention_heads // tp)) // group


def kv_bytes_per_token_per_rank(*, num_layers: int, num_kv_heads: int, head_dim: int, tp: int,
                                dtype_bytes: int) -> int:
    """Bytes one cached token takes on one rank: K and V of its KV heads in every layer."""
    return 2 * num_layers * kv_heads_per_rank(num_kv_heads, tp) * head_dim * dtype_bytes


def kv_blocks_for_bytes(budget_bytes: int, *, bytes_per_token: int, block_size: int) -> int:
    """Whole blocks of ``block_size`` tokens that fit in ``budget_bytes``."""
    if bytes_per_token < 1 or block_size < 1:
        raise ValueError("bytes_per_token and block_size must be >= 1")
    return max(0, budget_bytes) // (bytes_per_token * block_size)


def blocks_for_tokens(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` tokens."""
    return math.ceil(tokens / block_size) if tokens > 0 else 0
