"""One rule for attention TP: whatever the planner chooses, the engine accepts at start-up.

For every preset the engine serves, on every hardware profile, with and
without allowCrossDomain, the planner's chosen (TP, EP, pods x GPUs) goes
through the engine's own checks: the model builder's TP check (query heads
split, KV heads split or replicated) and the rank layout (ParallelConfig).
Qwen3-235B has 4 KV heads; with allowCrossDomain on HGX the planner picks TP 8,
which the engine serves by replicating KV heads.
"""

from __future__ import annotations

import pytest

from moeshard.core.architectures import PRESETS
from moeshard.core.hardware import PROFILES
from moeshard.core.hf_config import HF_MODEL_TYPES
from moeshard.engine.config import ParallelConfig, SUPPORTED_MODEL_TYPES
from moeshard.engine.model import check_tp_shape
from moeshard.operator.planner import PlanError, plan_parallelism

SERVED = sorted(name for name, p in PRESETS.items() if p.architecture in SUPPORTED_MODEL_TYPES)


class _Shape:
    """The two fields check_tp_shape reads of an engine ModelConfig."""

    def __init__(self, heads: int, kv_heads: int):
        self.num_attention_heads, self.num_kv_heads = heads, kv_heads


def test_the_engine_serves_a_subset_of_what_the_reader_reads():
    assert set(SUPPORTED_MODEL_TYPES) <= set(HF_MODEL_TYPES) and SERVED


@pytest.mark.parametrize("preset", SERVED)
@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("cross", [False, True])
def test_planner_choice_passes_the_engines_checks(preset, profile, cross):
    model = PRESETS[preset]
    try:
        plan = plan_parallelism(model, PROFILES[profile], allow_cross_domain=cross)
    except PlanError:
        pytest.skip(f"{preset} does not fit {profile}")
    c = plan.chosen
    check_tp_shape(_Shape(model.num_attention_heads, model.num_kv_heads), c.attention_tp)
    for rank in range(c.expert_ep):
        ParallelConfig(rank=rank, world_size=c.expert_ep, tp_size=c.attention_tp,
                       gpus_per_domain=c.ranks_per_domain, gpus_per_pod=c.gpus_per_pod)


def test_qwen3_235b_cross_domain_on_hgx_takes_tp_above_the_kv_heads():
    plan = plan_parallelism(PRESETS["qwen3-235b-a22b"], PROFILES["h100-hgx"], allow_cross_domain=True)
    assert plan.chosen.attention_tp > PRESETS["qwen3-235b-a22b"].num_kv_heads
    check_tp_shape(_Shape(64, 4), plan.chosen.attention_tp)
