"""The product brief's choices (DESIGN.md table) and the planner's documented deviations."""

from __future__ import annotations

import numpy as np
import pytest

from moeshard.operator.api import WorkloadSpec
from moeshard.core.architectures import PRESETS, get_preset
from moeshard.core.hardware import US, get_profile
from moeshard.operator.planner import (
    distinct_destinations,
    gemm_crossover_tokens,
    plan_parallelism,
)

QWEN = get_preset("qwen3-235b-a22b")
BRIEF = WorkloadSpec(prefillTokens=6000)


def _by_ep(plan):
    best = {}
    for c in plan.candidates:
        if c.expert_ep not in best or c.step_us < best[c.expert_ep].step_us:
            best[c.expert_ep] = c
    return best


def test_h100_chooses_ep8_and_marks_larger_ep_as_crossing_the_fabric():
    plan = plan_parallelism(QWEN, get_profile("h100-hgx"), BRIEF)
    assert plan.chosen.expert_ep == 8
    assert plan.chosen.pods_per_replica == 1 and plan.chosen.gpus_per_pod == 8
    assert not plan.chosen.crosses_fabric
    above = [c for c in plan.candidates if c.expert_ep > 8]
    assert above and all(c.crosses_fabric and c.inter_domain_bytes > 0 for c in above)
    assert all(c.domains_per_replica == c.expert_ep // 8 for c in above)
    assert all(not c.crosses_fabric and c.inter_domain_bytes == 0 for c in plan.candidates if c.expert_ep <= 8)
    # Crossing candidates are estimated, then refused by the default policy, with the reason.
    assert all(not c.feasible and "NVLink domains" in c.reason for c in above)


def test_gb200_chooses_ep16_tp4_and_shows_ep32_as_worse():
    plan = plan_parallelism(QWEN, get_profile("gb200-nvl72"), BRIEF)
    assert (plan.chosen.expert_ep, plan.chosen.attention_tp) == (16, 4)
    assert plan.chosen.pods_per_replica == 4 and plan.chosen.gpus_per_pod == 4
    best = _by_ep(plan)
    assert best[32].feasible and best[32].moe_step_us > plan.chosen.moe_step_us
    assert best[8].moe_step_us > plan.chosen.moe_step_us
    assert plan.chosen.verdict == "sweet spot"


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "mixtral-8x22b"])
@pytest.mark.parametrize("hardware", ["h100-hgx", "h200-hgx", "b200-hgx", "gb200-nvl72"])
def test_mixtral_never_gets_ep_above_8(preset, hardware):
    for cross in (False, True):
        plan = plan_parallelism(get_preset(preset), get_profile(hardware), BRIEF, allow_cross_domain=cross)
        assert plan.chosen.expert_ep <= 8
        assert max(c.expert_ep for c in plan.candidates) <= 8


def test_gb200_choice_holds_over_the_documented_latency_range():
    """planner.py says EP 16 holds for a NVLink per-message latency of about 0.9 to 2.8 us."""
    base = get_profile("gb200-nvl72")
    for latency in (0.9, 1.0, 1.5, 2.0, 2.8):
        plan = plan_parallelism(QWEN, base.with_overrides(nvlink_latency_s=latency * US), BRIEF)
        assert plan.chosen.expert_ep == 16, latency
    assert plan_parallelism(QWEN, base.with_overrides(nvlink_latency_s=0.5 * US), BRIEF).chosen.expert_ep == 32
    assert plan_parallelism(QWEN, base.with_overrides(nvlink_latency_s=3.5 * US), BRIEF).chosen.expert_ep == 8


def test_tokens_per_expert_does_not_depend_on_ep():
    """The brief divides the batch by EP; per expert it is T K / E at every EP (documented deviation)."""
    plan = plan_parallelism(QWEN, get_profile("gb200-nvl72"), BRIEF)
    assert {round(c.tokens_per_expert, 6) for c in plan.candidates} == {6000 * 8 / 128}
    best = _by_ep(plan)
    assert best[16].gemm_us == pytest.approx(best[8].gemm_us / 2)


@pytest.mark.parametrize(
    "preset, hardware, expected",
    [  # PERF.md's crossover figures
        ("qwen3-235b-a22b", "h200-hgx", 240), ("qwen3-235b-a22b", "h100-hgx", 369),
        ("qwen3-235b-a22b", "gb200-nvl72", 397), ("deepseek-v3", "h200-hgx", 228),
        ("deepseek-v3", "h100-hgx", 342), ("mixtral-8x7b", "h200-hgx", 219), ("mixtral-8x7b", "h100-hgx", 323),
    ],
)
def test_gemm_crossover_matches_perf_md(preset, hardware, expected):
    assert gemm_crossover_tokens(get_preset(preset), get_profile(hardware)) == pytest.approx(expected, abs=1.5)


@pytest.mark.parametrize("experts, top_k, groups", [(128, 8, 8), (128, 8, 16), (256, 8, 32), (8, 2, 4), (128, 8, 2)])
def test_distinct_destinations_matches_sampling(experts, top_k, groups):
    rng = np.random.default_rng(0)
    picks = np.argsort(rng.random((20000, experts)), axis=1)[:, :top_k]  # uniform top-K without replacement
    owners = picks // (experts // groups)
    sampled = np.mean([len(set(row)) for row in owners])
    assert distinct_destinations(experts, top_k, groups) == pytest.approx(sampled, rel=0.01)


def test_presets_have_the_published_sizes():
    # Total parameters as published: Qwen3-235B-A22B 235B (22B active), Qwen3-30B-A3B 30.5B (3.3B active),
    # DeepSeek-V3 671B (37B active, without the MTP module), Mixtral 8x7B 46.7B (12.9B active), 8x22B 141B (39B).
    expected = {
        "qwen3-235b-a22b": (235e9, 22e9), "qwen3-30b-a3b": (30.5e9, 3.3e9), "deepseek-v3": (671e9, 37e9),
        "mixtral-8x7b": (46.7e9, 12.9e9), "mixtral-8x22b": (141e9, 39e9),
    }
    for name, (total, active) in expected.items():
        model = PRESETS[name]
        assert model.total_params == pytest.approx(total, rel=0.02), name
        assert model.active_params == pytest.approx(active, rel=0.05), name
