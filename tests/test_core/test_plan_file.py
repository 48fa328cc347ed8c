"""plan.json as the engine reads it: the operator's own output parses, and disagreement is named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moeshard.core.engine_env import EngineEnvironment, build_engine_env
from moeshard.core.plan_file import PlanFile, PlanFileError
from moeshard.operator.api import parse_resource
from moeshard.operator.commands.plan import DEFAULT_DEPLOYMENT, load_resource
from moeshard.operator.planner import plan_for_spec


def _env_for(plan) -> EngineEnvironment:
    c = plan.chosen
    env = build_engine_env(deployment="d", namespace="n", replica_index=0, pods_per_group=c.pods_per_replica,
                           gpus_per_pod=c.gpus_per_pod, gpus_per_domain=c.ranks_per_domain,
                           attention_tp=c.attention_tp, expert_ep=c.expert_ep, rendezvous_host="h", port=8000,
                           device="cuda")
    return EngineEnvironment.from_environ({e["name"]: e.get("value", "0") for e in env})


def test_the_operators_plan_json_checks_out_against_the_operators_env():
    plan = plan_for_spec(parse_resource(load_resource(str(DEFAULT_DEPLOYMENT))))
    parsed = PlanFile.from_json(json.dumps(plan.to_json()))
    assert (parsed.expert_ep, parsed.slots_per_gpu, parsed.ranks_per_domain) == (16, 9, 16)
    env = _env_for(plan)
    parsed.check_environment(env)
    with pytest.raises(PlanFileError, match="MOESHARD_ATTENTION_TP \\(2\\) disagrees with plan.json \\(4\\)"):
        parsed.check_environment(dataclasses.replace(env, attention_tp=2))


@pytest.mark.parametrize("text,field", [("{", "not valid JSON"), ("{}", "chosen: missing"),
                                        ('{"chosen": {"attentionTP": true}}', "chosen.attentionTP")])
def test_bad_plan_json_names_the_field(text, field):
    with pytest.raises(PlanFileError, match=field):
        PlanFile.from_json(text)


def test_no_file_is_no_plan(tmp_path):
    assert PlanFile.read(tmp_path / "plan.json") is None
