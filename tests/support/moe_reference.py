"""Naive references and input builders for the MoE kernel tests.

Shape legend: T tokens, K experts per token, E local experts, H hidden, I intermediate.
The reference is written the slow, obvious way (one token, one expert at a
time, float64) so it shares no code or trick with the twins it checks.
"""

from __future__ import annotations

import torch


def naive_expert_ffn(x, topk_ids, topk_weights, w_gate_up, w_down, *, apply_weights=True):
    """[T, H] float64: sum_k c[t,k] * W_down[e] (silu(W_gate[e] x) * W_up[e] x), -1 ids skipped."""
    t, h = x.shape
    e, two_i, _ = w_gate_up.shape
    i = two_i // 2
    out = torch.zeros((t, h), dtype=torch.float64)
    for token in range(t):
        row = x[token].double()
        for k in range(topk_ids.shape[1]):
            expert = int(topk_ids[token, k])
            if not 0 <= expert < e:
                continue
            gate = w_gate_up[expert, :i].double() @ row
            up = w_gate_up[expert, i:].double() @ row
            act = gate * torch.sigmoid(gate) * up
            coef = float(topk_weights[token, k]) if apply_weights else 1.0
            out[token] += coef * (w_down[expert].double() @ act)
    return out


def distinct_topk(t: int, k: int, e: int, generator: torch.Generator) -> torch.Tensor:
    """[T, K] int64 ids, K distinct experts per token (as a router's top-K gives)."""
    scores = torch.rand((t, e), generator=generator)
    return scores.topk(k, dim=1).indices


def make_moe_inputs(t, k, e, h, i, *, dtype=torch.float32, seed=0, ids=None):
    """Random (x, topk_ids, topk_weights, w_gate_up, w_down) scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((t, h), generator=g).to(dtype)
    topk_ids = distinct_topk(t, k, e, g) if ids is None else ids
    topk_weights = torch.rand((t, k), generator=g).to(dtype)
    w_gate_up = (torch.randn((e, 2 * i, h), generator=g) / h**0.5).to(dtype)
    w_down = (torch.randn((e, h, i), generator=g) / i**0.5).to(dtype)
    return x, topk_ids, topk_weights, w_gate_up, w_down
