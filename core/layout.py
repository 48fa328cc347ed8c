"""Parallel layout rules that the planner, the API, the engine and the CLIs all apply.

One fact, one function. Each ``*_problem`` function returns None when the
layout is fine and otherwise a reason without a field name, so that every
caller raises its own error naming its own field (``spec.parallelism.expertEP``
in the API, ``--ep`` on a command line, ``MOESHARD_EXPERT_EP`` in an engine pod).

Legend: E experts, R redundant slots, N = EP ranks of one group, T attention
TP size, K KV heads, M ranks per NVLink domain.
"""

from __future__ import annotations

import numpy as np


def expert_ep_problem(ep: int, num_experts: int, redundant_slots: int = 0) -> str | None:
    """EP must divide E + R (every rank holds the same number of slots) and be at most E."""
    slots = num_experts + redundant_slots
    if ep < 1:
        return f"{ep} must be at least 1"
    if slots % ep:
        return f"{ep} must divide numExperts + redundantSlots ({num_experts} + {redundant_slots} = {slots})"
    if ep > num_experts:
        return f"{ep} exceeds the model's {num_experts} experts"
    return None


def slots_per_gpu(num_experts: int, redundant_slots: int, ep: int) -> int:
    """(E + R) / N: expert slots per rank. Raises ValueError when EP does not divide them."""
    problem = expert_ep_problem(ep, num_experts, redundant_slots)
    if problem:
        raise ValueError(f"expert EP {problem}")
    return (num_experts + redundant_slots) // ep


def fewest_redundant_slots(num_experts: int, ep: int) -> int:
    """Smallest R with EP dividing E + R: what a group without a plan (local launch, verify) uses."""
    return (-num_experts) % ep


def attention_tp_problem(
    tp: int, ep: int, *, gpus_per_pod: int | None = None, num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> str | None:
    """Attention TP: divides EP (TP groups tile the EP group), fits inside one pod, divides the heads.

    KV heads: each TP rank needs whole KV heads. With T <= K, T must divide K;
    with T > K the heads are replicated (vLLM's rule), so K must divide T.
    """
    if tp < 1:
        return f"{tp} must be at least 1"
    if ep % tp:
        return f"{tp} must divide expert EP ({ep})"
    if gpus_per_pod is not None and ep > gpus_per_pod and gpus_per_pod % tp:
        return f"{tp} must divide the {gpus_per_pod} GPUs of a pod: a TP group never crosses a pod"
    if num_heads is not None and num_heads % tp:
        return f"{tp} must divide the model's {num_heads} attention heads"
    if num_kv_heads is not None and (num_kv_heads % tp if tp <= num_kv_heads else tp % num_kv_heads):
        return (f"{tp} and the model's {num_kv_heads} KV heads must divide one another "
                "(KV heads are split across TP ranks, or replicated when TP exceeds them)")
    return None


def ranks_per_domain(ep: int, gpus_per_domain: int) -> int:
    """M: ranks of one EP group inside one NVLink domain (largest divisor of EP that fits a domain)."""
    if ep <= gpus_per_domain:
        return ep
    return max(d for d in range(1, gpus_per_domain + 1) if ep % d == 0)


def global_rank(pod_index: int, gpus_per_pod: int, local_rank: int) -> int:
    """Rank inside the EP group of local rank ``local_rank`` on pod ``pod_index``."""
    return pod_index * gpus_per_pod + local_rank


def max_over_mean(loads: np.ndarray) -> np.ndarray | float:
    """max/mean over the last axis (1.0 where the mean is 0): the balance figure everywhere.

    loads [..., G] -> [...] (a float for a 1-D input).
    """
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    peak = loads.max(axis=-1)
    ratio = np.divide(peak, mean, out=np.ones_like(mean), where=mean > 0)
    return float(ratio) if ratio.ndim == 0 else ratio
