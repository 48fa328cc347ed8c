"""Engine metrics: names from moeshard.core.naming, scope labels on every series, exact counts."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeshard.engine.metrics import EngineMetrics, MetricScope
from moeshard.core.engine_env import EngineEnvironment
from moeshard.core.naming import (
    METRIC_EXPERT_TOKENS,
    METRIC_PLACEMENT_REJECTED,
    METRIC_PLACEMENT_VERSION,
    METRIC_RANK_TOKENS,
    METRIC_REQUEST_LATENCY,
    SCOPE_DEPLOYMENT,
    SCOPE_NAMESPACE,
    SCOPE_REPLICA,
)

SCOPE = MetricScope("qwen", "serving", 2)


def samples(metrics: EngineMetrics):
    return [s for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples]


def test_every_series_carries_the_scope_and_all_experts_start_at_zero():
    metrics = EngineMetrics(SCOPE, num_layers=2, num_experts=3, world_size=4)
    got = samples(metrics)
    for sample in got:
        assert sample.labels[SCOPE_DEPLOYMENT] == "qwen"
        assert sample.labels[SCOPE_NAMESPACE] == "serving"
        assert sample.labels[SCOPE_REPLICA] == "2"
    experts = {(s.labels["layer"], s.labels["expert"]) for s in got if s.name == METRIC_EXPERT_TOKENS}
    assert experts == {(str(l), str(e)) for l in range(2) for e in range(3)}
    assert {s.labels["rank"] for s in got if s.name == METRIC_RANK_TOKENS} == {"0", "1", "2", "3"}
    names = {s.name for s in got}
    assert {METRIC_PLACEMENT_VERSION, METRIC_PLACEMENT_REJECTED, METRIC_REQUEST_LATENCY + "_bucket"} <= names


def test_counts_accumulate_exactly():
    metrics = EngineMetrics(SCOPE, num_layers=2, num_experts=3, world_size=2)
    metrics.add_expert_tokens(np.array([[1, 0, 2], [0, 0, 3]]))
    metrics.add_expert_tokens(np.array([[4, 0, 0], [1, 0, 0]]))
    metrics.add_rank_tokens(np.array([5, 7]))
    np.testing.assert_array_equal(metrics.expert_tokens(), [[5, 0, 2], [1, 0, 3]])
    got = {(s.name, s.labels.get("layer"), s.labels.get("expert"), s.labels.get("rank")): s.value for s in samples(metrics)}
    assert got[(METRIC_EXPERT_TOKENS, "0", "0", None)] == 5
    assert got[(METRIC_EXPERT_TOKENS, "1", "2", None)] == 3
    assert got[(METRIC_RANK_TOKENS, None, None, "1")] == 7
    metrics.set_placement_version(4)
    metrics.count_rejected_placement()
    metrics.observe_request_latency(0.2)
    got = {s.name: s.value for s in samples(metrics) if s.name in (METRIC_PLACEMENT_VERSION, METRIC_PLACEMENT_REJECTED,
                                                                   METRIC_REQUEST_LATENCY + "_count")}
    assert got == {METRIC_PLACEMENT_VERSION: 4, METRIC_PLACEMENT_REJECTED: 1, METRIC_REQUEST_LATENCY + "_count": 1}


def test_registries_are_private():
    a = EngineMetrics(SCOPE, num_layers=1, num_experts=2, world_size=1)
    b = EngineMetrics(SCOPE, num_layers=1, num_experts=2, world_size=1)  # same names: no collision
    a.add_expert_tokens(np.array([[3, 0]]))
    assert b.expert_tokens().sum() == 0 and a.expert_tokens().sum() == 3


@pytest.mark.parametrize(
    ("call", "arg", "match"),
    [
        ("add_expert_tokens", np.zeros((2, 2)), "shape"),
        ("add_expert_tokens", -np.ones((1, 2)), "negative"),
        ("add_rank_tokens", np.zeros(3), "shape"),
    ],
)
def test_bad_deltas_are_refused(call, arg, match):
    metrics = EngineMetrics(SCOPE, num_layers=1, num_experts=2, world_size=1)
    with pytest.raises(ValueError, match=match):
        getattr(metrics, call)(arg)


def test_scope_from_the_engine_environment():
    env = EngineEnvironment.from_environ({"MOESHARD_DEPLOYMENT": "d", "MOESHARD_NAMESPACE": "n",
                                          "MOESHARD_REPLICA_INDEX": "5"})
    assert MetricScope.from_env(env).values() == ("d", "n", "5")


def test_serving_metrics_are_exposed_with_exact_values():
    from moeshard.engine import metrics as m

    metrics = EngineMetrics(SCOPE, num_layers=1, num_experts=2, world_size=1)
    metrics.observe_time_to_first_token(0.2)
    metrics.observe_inter_token_latency(0.03)
    metrics.observe_inter_token_latency(0.04)
    metrics.observe_queue_time(0.01)
    metrics.set_scheduler_state(running=3, waiting=2, blocks_used=5, blocks_free=11)
    metrics.add_prompt_tokens(40)
    metrics.add_generation_tokens(7)
    metrics.add_preemptions(1)
    values = {(s.name, s.labels.get("state")): s.value for s in samples(metrics)}
    assert values[(m.METRIC_TTFT + "_count", None)] == 1 and values[(m.METRIC_TTFT + "_sum", None)] == 0.2
    assert values[(m.METRIC_ITL + "_count", None)] == 2 and values[(m.METRIC_QUEUE_TIME + "_count", None)] == 1
    assert values[(m.METRIC_RUNNING, None)] == 3 and values[(m.METRIC_WAITING, None)] == 2
    assert values[(m.METRIC_KV_BLOCKS, "used")] == 5 and values[(m.METRIC_KV_BLOCKS, "free")] == 11
    assert values[(m.METRIC_KV_USAGE, None)] == 5 / 16  # what the autoscaler's kvCacheUsage target reads
    assert values[(m.METRIC_PROMPT_TOKENS, None)] == 40
    assert values[(m.METRIC_GENERATION_TOKENS, None)] == 7
    assert values[(m.METRIC_PREEMPTIONS, None)] == 1


def test_every_series_the_autoscaler_reads_is_exported():
    """The recording rules behind spec.autoscaling (operator/autoscaling.py) read series the engine really has."""
    from moeshard.operator import autoscaling

    metrics = EngineMetrics(SCOPE, num_layers=1, num_experts=2, world_size=1)
    metrics.observe_time_to_first_token(0.1)
    names = {s.name for s in samples(metrics)}
    wanted = {autoscaling.METRIC_REQUESTS_WAITING, autoscaling.METRIC_KV_CACHE_USAGE,
              autoscaling.METRIC_TTFT + "_bucket"}
    assert wanted <= names, f"the engine does not export {sorted(wanted - names)}"
