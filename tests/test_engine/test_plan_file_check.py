"""The engine reads the operator's plan.json: its slots per rank, and a refusal when its environment disagrees."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moeshard.core.plan_file import PlanFileError
from moeshard.engine.runtime import EngineRuntime
from moeshard.engine.verify import local_env


def _plan_json(tp: int, ep: int, slots: int) -> str:
    return json.dumps({"chosen": {"attentionTP": tp, "expertEP": ep, "podsPerReplica": 1, "gpusPerPod": ep,
                                  "slotsPerGpu": slots, "domainsPerReplica": 1}})


def test_engine_takes_slots_from_plan_and_refuses_a_disagreeing_env(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    plan = tmp_path / "plan.json"
    plan.write_text(_plan_json(tp=1, ep=1, slots=10))  # 8 experts + 2 redundant slots on one rank
    env = dataclasses.replace(local_env(model, 1), plan_file=str(plan))
    runtime = EngineRuntime.create(env)
    try:
        assert runtime.placement.slots_per_gpu == 10
    finally:
        runtime.close()
    plan.write_text(_plan_json(tp=2, ep=2, slots=4))
    with pytest.raises(PlanFileError, match="MOESHARD_EXPERT_EP \\(1\\) disagrees with plan.json \\(2\\)"):
        EngineRuntime.create(env)
