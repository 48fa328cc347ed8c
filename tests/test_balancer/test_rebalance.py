"""One rebalance cycle (pure): hysteresis, move cap, status fields, conditions, metrics failures."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from moeshard.operator.api import LoadBalancingSpec, MoEDeploymentStatus
from moeshard.operator.balancer import rebalance_placement
from moeshard.core.placement import imbalance, initial_placement
from moeshard.operator.prometheus_source import (
    REASON_BAD_DATA, REASON_NO_DATA, REASON_PARTIAL, MetricsUnavailable, parse_expert_loads,
)
from moeshard.operator.status import merge_conditions
from moeshard.operator.rebalance import (
    CONDITION_BALANCED, CONDITION_METRICS, plan_cycle, rfc3339, replicated_experts, run_cycle,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def hot_loads(layers: int = 2, experts: int = 16) -> np.ndarray:
    """Experts 0-3 hot (all on GPU 0 of the initial placement)."""
    loads = np.full((layers, experts), 100.0)
    loads[:, :4] = 1000.0
    return loads


def test_applies_a_better_placement_with_status_and_event():
    current = initial_placement(2, 16, 4, 5)
    loads = hot_loads()
    outcome = plan_cycle(current, loads, LoadBalancingSpec(), 2, NOW)
    assert outcome.placement is not None and outcome.placement.version == 1
    before, after = imbalance(current, loads), imbalance(outcome.placement, loads)
    assert outcome.status == {
        "placementVersion": 1, "imbalanceBefore": round(before, 4), "imbalanceAfter": round(after, 4),
        "replicatedExperts": replicated_experts(outcome.placement), "lastRebalanceTime": "2026-11-28T12:00:00Z",
    }
    MoEDeploymentStatus.model_validate(outcome.status)  # the fields exist in the API's status model
    assert after < before * 0.95
    types = {c["type"]: c for c in outcome.conditions}
    assert types[CONDITION_METRICS]["status"] == "True"
    assert (types[CONDITION_BALANCED]["status"], types[CONDITION_BALANCED]["reason"]) == ("True", "Rebalanced")
    assert outcome.event[:2] == ("Normal", "Rebalanced") and "v0 -> v1" in outcome.event[2]
    assert outcome.moves.sum() == (outcome.placement.phy2log != current.phy2log).sum()


def test_small_gain_keeps_the_placement():
    loads = hot_loads()
    current = rebalance_placement(loads, 4, 5, 2).placement.with_version(0)
    loads[:, 0] *= 1.05  # a little drift: the best candidate gains less than 5%
    outcome = plan_cycle(current, loads, LoadBalancingSpec(improvementThreshold=0.05), 2, NOW)
    assert outcome.placement is None
    assert outcome.status["placementVersion"] == 0 and "lastRebalanceTime" not in outcome.status
    balanced = next(c for c in outcome.conditions if c["type"] == CONDITION_BALANCED)
    assert balanced["reason"] == "WithinThreshold"
    # With threshold 0 the Poisson noise of ~650 tokens per GPU in the held-out half still keeps it.
    noisy = plan_cycle(current, loads, LoadBalancingSpec(improvementThreshold=0.0), 2, NOW)
    assert noisy.placement is None
    assert all(d.decision == "keep" and d.threshold > 0.03 for d in noisy.decision.layers)


@pytest.mark.parametrize("cap", [0, 1, 3])
def test_move_cap_per_layer(cap):
    current = initial_placement(2, 16, 4, 5)
    outcome = plan_cycle(current, 100 * hot_loads(), LoadBalancingSpec(maxMovesPerCycle=cap, improvementThreshold=0.0),
                         2, NOW)
    assert outcome.placement is not None
    moves = (outcome.placement.phy2log != current.phy2log).sum(axis=1)
    assert (moves <= cap).all()


def test_no_traffic_keeps_the_placement():
    current = initial_placement(1, 8, 2, 4)
    outcome = plan_cycle(current, np.zeros((1, 8)), LoadBalancingSpec(), None, NOW)
    assert outcome.placement is None and outcome.event is None
    assert outcome.conditions == [{"type": CONDITION_METRICS, "status": "True", "reason": "NoTraffic",
                                   "message": "no tokens in the window; placement kept"}]


class FailingSource:
    def __init__(self, error: Exception):
        self.error = error

    def expert_loads(self, *args):
        raise self.error


class FixedSource:
    def __init__(self, loads, coverage=1.0, groups=None):
        self.loads, self._coverage, self.groups = loads, coverage, groups or {}
        self.calls = []

    def expert_loads(self, name, namespace, window, layers, experts):
        self.calls.append((name, namespace, window, layers, experts))
        return self.loads

    def coverage(self, name, namespace, window):
        return self._coverage

    def group_versions(self, name, namespace, window):
        return self.groups


def test_run_cycle_passes_the_window_and_shape():
    source = FixedSource(hot_loads())
    current = initial_placement(2, 16, 4, 5)
    run_cycle(source, "qwen", "serving", current, LoadBalancingSpec(window="15s"), 2, NOW)
    assert source.calls == [("qwen", "serving", "15s", 2, 16)]


def test_metrics_failure_keeps_the_placement_with_reason():
    current = initial_placement(1, 8, 2, 4).with_version(7)
    error = MetricsUnavailable("PrometheusUnreachable", "http://p:9090: ConnectionError: refused")
    outcome = run_cycle(FailingSource(error), "qwen", "serving", current, LoadBalancingSpec(), None, NOW)
    assert outcome.placement is None
    assert outcome.status == {"placementVersion": 7}
    assert outcome.conditions == [{"type": CONDITION_METRICS, "status": "False", "reason": "PrometheusUnreachable",
                                   "message": "http://p:9090: ConnectionError: refused"}]
    assert outcome.event[0] == "Warning" and "v7 kept" in outcome.event[2]


def series(layer, expert, value):
    return {"metric": {"layer": str(layer), "expert": str(expert)}, "value": [1.0, str(value)]}


def test_parse_expert_loads():
    result = [series(l, e, 10 * l + e) for l in range(2) for e in range(3)]
    np.testing.assert_array_equal(parse_expert_loads(result, 2, 3), [[0, 1, 2], [10, 11, 12]])
    with pytest.raises(MetricsUnavailable) as info:
        parse_expert_loads([], 2, 3)
    assert info.value.reason == REASON_NO_DATA
    with pytest.raises(MetricsUnavailable) as info:
        parse_expert_loads(result[:-1], 2, 3)
    assert info.value.reason == REASON_PARTIAL and "layer 1 expert 2" in info.value.message
    for bad in ([series(2, 0, 1)], [series(0, 0, "NaN")], [series(0, 0, -1)], [{"metric": {}}], {"not": "a list"}):
        with pytest.raises(MetricsUnavailable) as info:
            parse_expert_loads(bad, 2, 3)
        assert info.value.reason == REASON_BAD_DATA


def test_merge_conditions_keeps_transition_time_until_status_changes():
    existing = [{"type": "Available", "status": "True", "reason": "Ready", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    up = {"type": CONDITION_METRICS, "status": "True", "reason": "QuerySucceeded", "message": "1 token"}
    first = merge_conditions(existing, [up], rfc3339(NOW), generation=3)
    assert [c["type"] for c in first] == ["Available", CONDITION_METRICS]
    assert first[0] == existing[0] and first[1]["lastTransitionTime"] == "2026-11-28T12:00:00Z"
    assert first[1]["observedGeneration"] == 3
    later = NOW + timedelta(minutes=5)
    same = merge_conditions(first, [{**up, "message": "2 tokens"}], rfc3339(later))
    assert same[1]["lastTransitionTime"] == "2026-11-28T12:00:00Z" and same[1]["message"] == "2 tokens"
    down = merge_conditions(same, [{**up, "status": "False", "reason": "NoData"}], rfc3339(later))
    assert down[1]["lastTransitionTime"] == "2026-11-28T12:05:00Z"
