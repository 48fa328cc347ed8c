"""Phase and conditions (pure)."""

from __future__ import annotations

from moeshard.operator.api import MoEDeploymentStatus
from moeshard.operator.status import Observation, compute_phase, compute_status, merge_conditions

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def _conds(status):
    return {c["type"]: c for c in status["conditions"]}


def test_phases():
    assert compute_phase(Observation(1, replicas=2, ready=2), None) == "Ready"
    assert compute_phase(Observation(1, replicas=2, ready=0, missing=2), None) == "Progressing"
    assert compute_phase(Observation(1, replicas=2, ready=1, outdated=1), "Ready") == "Progressing"
    assert compute_phase(Observation(1, replicas=2, ready=1), "Ready") == "Degraded"
    assert compute_phase(Observation(1, replicas=2, ready=1, restarted=1), "Progressing") == "Degraded"
    assert compute_phase(Observation(1, replicas=2, failed_reason="RestartBudgetExceeded"), "Ready") == "Failed"
    assert compute_phase(Observation(1, invalid_field="spec.x"), "Ready") == "Failed"
    assert compute_phase(Observation(1, replicas=1, pending_reason="LeaderWorkerSetMissing"), None) == "Pending"
    assert compute_phase(Observation(1, replicas=0), None) == "Ready"


def test_invalid_spec_names_the_field_and_keeps_the_old_plan_fields():
    status = compute_status(Observation(3, invalid_field="spec.parallelism.expertEP", invalid_message="too big"),
                            {"plan": {"expertEP": 8}, "replicas": 2}, T0)
    planned = _conds(status)["Planned"]
    assert (planned["status"], planned["reason"]) == ("False", "InvalidSpec")
    assert planned["message"] == "spec.parallelism.expertEP: too big"
    assert "plan" not in status and "replicas" not in status  # merge patch leaves the old ones
    MoEDeploymentStatus.model_validate(status)


def test_available_allows_max_unavailable_groups_down():
    ok = _conds(compute_status(Observation(1, replicas=3, ready=2, outdated=1), None, T0))["Available"]
    assert ok["status"] == "True"
    down = _conds(compute_status(Observation(1, replicas=3, ready=1, outdated=2), None, T0))["Available"]
    assert down["status"] == "False"


def test_foreign_conditions_survive_and_transition_times_stay_when_unchanged():
    balanced = {"type": "Balanced", "status": "True", "reason": "Rebalanced", "message": "", "lastTransitionTime": T0}
    first = compute_status(Observation(1, replicas=1, ready=1), {"conditions": [balanced]}, T0)
    again = compute_status(Observation(1, replicas=1, ready=1), first | {"conditions": first["conditions"]}, T1)
    assert again == first  # nothing changed: identical status, so no write
    assert _conds(again)["Balanced"] == balanced
    flipped = compute_status(Observation(1, replicas=1, ready=0), again, T1)
    assert _conds(flipped)["Available"]["lastTransitionTime"] == T1
    assert _conds(flipped)["Planned"]["lastTransitionTime"] == T0
    MoEDeploymentStatus.model_validate(flipped)


def test_merge_conditions_ignores_garbage():
    merged = merge_conditions(["x", None, {"type": "MetricsAvailable", "status": "False"}],
                              [{"type": "Planned", "status": "True"}], T0)
    # garbage dropped, the balancer's condition kept in place, the new one appended
    assert [c["type"] for c in merged] == ["MetricsAvailable", "Planned"]
