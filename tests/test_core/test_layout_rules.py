"""The parallel layout rules of moeshard.core.layout, each fact once."""

from __future__ import annotations

import numpy as np
import pytest

from moeshard.core.layout import (
    attention_tp_problem, expert_ep_problem, global_rank, max_over_mean, ranks_per_domain,
    slots_per_gpu,
)


@pytest.mark.parametrize("ep,experts,redundant,ok", [
    (8, 128, 0, True), (16, 128, 16, True), (12, 128, 0, False), (256, 128, 128, False), (0, 8, 0, False),
    (3, 8, 1, True),
])
def test_expert_ep_rule(ep, experts, redundant, ok):
    assert (expert_ep_problem(ep, experts, redundant) is None) is ok


def test_slots_per_gpu_is_experts_plus_redundant_over_ep():
    assert slots_per_gpu(128, 16, 16) == 9
    with pytest.raises(ValueError, match="must divide numExperts"):
        slots_per_gpu(128, 0, 12)


@pytest.mark.parametrize("tp,ep,pod,heads,kv,ok", [
    (4, 16, 4, 64, 4, True),     # Qwen3-235B on NVL72
    (8, 8, 8, 64, 4, True),      # TP above the KV heads: each KV head replicated twice
    (8, 16, 4, 64, 4, False),    # TP group would cross a 4-GPU pod
    (3, 12, 12, 64, 4, False),   # heads not divisible
    (4, 6, 8, 64, 4, False),     # TP does not divide EP
    (2, 8, 8, 32, 6, True),
    (4, 8, 8, 32, 6, False),     # 6 KV heads over 4 ranks: neither divides the other
])
def test_attention_tp_rule(tp, ep, pod, heads, kv, ok):
    assert (attention_tp_problem(tp, ep, gpus_per_pod=pod, num_heads=heads, num_kv_heads=kv) is None) is ok


def test_ranks_per_domain_and_global_rank():
    assert ranks_per_domain(16, 72) == 16
    assert ranks_per_domain(128, 72) == 64
    assert ranks_per_domain(24, 8) == 8
    assert global_rank(pod_index=2, gpus_per_pod=4, local_rank=3) == 11


def test_max_over_mean():
    assert max_over_mean(np.array([1.0, 1.0, 2.0, 0.0])) == 2.0
    np.testing.assert_allclose(max_over_mean(np.array([[1.0, 3.0], [0.0, 0.0]])), [1.5, 1.0])
