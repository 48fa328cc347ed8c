"""Status of a MoEDeployment: phase and conditions from what the reconcile observed. Pure.

The operator owns the conditions Planned, Available, Progressing, Degraded and WeightsReady,
the kstatus conditions Ready, Reconciling and Stalled (what Flux and other
kstatus readers assess; see ``compute_kstatus_conditions``) and the fields
below; the balancer owns Balanced, MetricsAvailable and the placement fields.
``merge_conditions`` replaces only the owned conditions and keeps
``lastTransitionTime`` when a condition's status did not change, so a
reconcile that changes nothing produces an identical status (and no write).

Phase, first rule that matches:
    Degraded     the new spec is invalid, or a child of it was refused (ApplyRejected), or its weights
                 download failed (DownloadFailed), while groups of an earlier spec still run (they are
                 left as they are; Available counts them)
    Failed       the spec is invalid, or a group exhausted the restart budget, or a child was refused,
                 or the weights download failed
    Pending      nothing can be created yet (e.g. the LeaderWorkerSet CRD is missing)
    Ready        every desired group is up to date and ready
    Degraded     fewer groups ready than desired after having been Ready/Degraded
    Progressing  groups being created, rolled or recreated, or waiting for the weights download

WeightsReady (operator/weights.py) says whether the checkpoint is there: True for a mounted
pvc:// or file:// source and a finished hf:// download; while it is False no group is created
or rolled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Written by every reconcile; WeightsReady (also the reconciler's) only once the spec is valid and planned.
OWNED_CONDITIONS = ("Planned", "Available", "Progressing", "Degraded", "Ready", "Reconciling", "Stalled")
OWNED_FIELDS = ("observedGeneration", "phase", "conditions", "plan", "replicas", "readyReplicas", "selector",
                "groupRestarts", "drainingReplicas", "appliedSpec", "weights")


@dataclass(frozen=True)
class Observation:
    """What one reconcile saw and did, the input of ``compute_status``.

    replicas: desired groups; ready: groups up to date with every pod ready;
    outdated: groups still running an old template; restarted: groups
    recreated after a failure in this reconcile.
    """

    generation: int
    replicas: int = 0
    ready: int = 0
    outdated: int = 0
    missing: int = 0
    restarted: int = 0
    max_unavailable: int = 1
    plan: dict[str, Any] | None = None
    plan_summary: str = ""
    selector: str | None = None
    invalid_field: str | None = None  # spec path of a bad spec, None when valid
    invalid_message: str = ""
    failed_reason: str | None = None  # e.g. RestartBudgetExceeded
    failed_message: str = ""
    pending_reason: str | None = None  # e.g. LeaderWorkerSetMissing
    pending_message: str = ""
    group_restarts: list[dict[str, Any]] = field(default_factory=list)
    draining: int = 0  # groups above the desired count, drained before deletion (scale in)
    overdue_reason: str | None = None  # pods waiting for a node past progressDeadline: Unschedulable / SchedulingGated
    overdue_message: str = ""  # ... naming each group, its pod and the scheduler's reason (Stalled, not Failed)
    serving: int = 0  # live groups (of any spec) when the spec is refused; 0 otherwise
    applied_spec: dict[str, Any] | None = None  # the spec this reconcile applied (status.appliedSpec)
    weights: dict[str, Any] | None = None  # status.weights (operator/weights.py): source, download Job progress
    weights_condition: tuple[bool, str, str] | None = None  # WeightsReady: status, reason, message
    weights_pending: str = ""  # the download Job still runs: the groups wait (Progressing, DownloadingWeights)


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
            "observedGeneration": generation}


def _refused_while_serving(obs: Observation) -> bool:
    return obs.serving > 0 and (obs.invalid_field is not None or obs.failed_reason in ("ApplyRejected",
                                                                                          "DownloadFailed"))


def compute_phase(obs: Observation, previous_phase: str | None) -> str:
    if _refused_while_serving(obs):
        return "Degraded"
    if obs.invalid_field is not None or obs.failed_reason is not None:
        return "Failed"
    if obs.pending_reason is not None:
        return "Pending"
    if obs.ready >= obs.replicas and obs.outdated == 0 and obs.missing == 0:
        return "Ready"
    if obs.restarted or (previous_phase in ("Ready", "Degraded") and obs.outdated == 0 and obs.missing == 0):
        return "Degraded"
    return "Progressing"


def compute_conditions(obs: Observation, phase: str) -> list[dict[str, Any]]:
    """The four owned conditions (without lastTransitionTime; merge_conditions adds it)."""
    gen = obs.generation
    if obs.invalid_field is not None and obs.serving:
        message = f"{obs.invalid_field}: {obs.invalid_message}"
        ok = obs.ready >= 1
        return [
            _condition("Planned", False, "InvalidSpec", message, gen),
            _condition("Available", ok, "MinimumReplicasAvailable" if ok else "MinimumReplicasUnavailable",
                       f"{obs.ready}/{obs.serving} replica groups of the last applied spec ready", gen),
            _condition("Progressing", False, "InvalidSpec", message, gen),
            _condition("Degraded", True, "InvalidSpec",
                       f"the new spec is refused; the groups of the last applied spec keep serving: {message}", gen),
        ]
    if obs.invalid_field is not None:
        message = f"{obs.invalid_field}: {obs.invalid_message}"
        return [
            _condition("Planned", False, "InvalidSpec", message, gen),
            _condition("Available", False, "InvalidSpec", "nothing is deployed for an invalid spec", gen),
            _condition("Progressing", False, "InvalidSpec", message, gen),
            _condition("Degraded", False, "InvalidSpec", "", gen),
        ]
    planned = _condition("Planned", True, "Planned", obs.plan_summary, gen)
    needed = max(0, obs.replicas - obs.max_unavailable) if obs.replicas else 0
    available_ok = obs.ready >= needed and (obs.replicas == 0 or obs.ready >= 1)
    available = _condition(
        "Available", available_ok, "MinimumReplicasAvailable" if available_ok else "MinimumReplicasUnavailable",
        f"{obs.ready}/{obs.replicas} replica groups ready", gen,
    )
    if obs.failed_reason is not None:
        progressing = _condition("Progressing", False, obs.failed_reason, obs.failed_message, gen)
    elif obs.pending_reason is not None:
        progressing = _condition("Progressing", False, obs.pending_reason, obs.pending_message, gen)
    elif obs.overdue_reason is not None:
        progressing = _condition("Progressing", False, "ProgressDeadlineExceeded", obs.overdue_message, gen)
    elif obs.weights_pending:
        progressing = _condition("Progressing", True, "DownloadingWeights", obs.weights_pending, gen)
    elif phase == "Ready":
        progressing = _condition("Progressing", False, "ReconcileComplete", "every replica group is up to date", gen)
    else:
        parts = [f"{n} {what}" for n, what in ((obs.missing, "to create"), (obs.outdated, "to roll"),
                                               (obs.restarted, "recreated after a failure")) if n]
        waiting = obs.replicas - obs.ready
        if waiting > 0:
            parts.append(f"{waiting} not ready")
        progressing = _condition("Progressing", True, "RollingGroups" if obs.outdated else "CreatingGroups",
                                 "replica groups: " + ", ".join(parts) if parts else "", gen)
    if obs.failed_reason is not None:
        degraded = _condition("Degraded", True, obs.failed_reason, obs.failed_message, gen)
    elif phase == "Degraded":
        degraded = _condition("Degraded", True, "GroupsNotReady",
                              f"{obs.ready}/{obs.replicas} replica groups ready", gen)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "", gen)
    return [planned, available, progressing, degraded]


def compute_kstatus_conditions(obs: Observation, phase: str) -> list[dict[str, Any]]:
    """Ready, Reconciling and Stalled as kstatus (Flux's health assessment) reads them.

    Stalled      True when the spec cannot make progress without a person: invalid
                 spec, restart budget spent (phase Failed), a required CRD missing
                 (Pending), a group's pods waiting for a node past spec.engine.progressDeadline;
    Reconciling  True while groups are created, rolled, recreated or drained (and
                 not Stalled: kstatus reads Stalled first);
    Ready        True only when every desired group is up to date and serving
                 (phase Ready), for the generation in ``observedGeneration``.
    """
    gen = obs.generation
    stalled_reason, stalled_message = None, ""
    if obs.invalid_field is not None:
        stalled_reason, stalled_message = "InvalidSpec", f"{obs.invalid_field}: {obs.invalid_message}"
    elif obs.failed_reason is not None:
        stalled_reason, stalled_message = obs.failed_reason, obs.failed_message
    elif obs.pending_reason is not None:
        stalled_reason, stalled_message = obs.pending_reason, obs.pending_message
    elif obs.overdue_reason is not None:
        stalled_reason, stalled_message = obs.overdue_reason, obs.overdue_message
    if stalled_reason is not None:
        return [
            _condition("Ready", False, stalled_reason, stalled_message, gen),
            _condition("Reconciling", False, stalled_reason, "stalled: " + stalled_message, gen),
            _condition("Stalled", True, stalled_reason, stalled_message, gen),
        ]
    serving = f"{obs.ready}/{obs.replicas} replica groups ready"
    stalled = _condition("Stalled", False, "AsExpected", "", gen)
    if phase == "Ready":
        ready = _condition("Ready", True, "AllGroupsReady", f"{serving}, every one up to date", gen)
        if obs.draining:
            return [ready, _condition("Reconciling", True, "DrainingGroups",
                                      f"{obs.draining} replica group(s) draining before removal", gen), stalled]
        return [ready, _condition("Reconciling", False, "ReconcileComplete", "", gen), stalled]
    parts = [f"{n} {what}" for n, what in ((obs.missing, "to create"), (obs.outdated, "to roll"),
                                           (obs.restarted, "recreated after a failure"),
                                           (obs.draining, "draining")) if n]
    reason = ("DownloadingWeights" if obs.weights_pending else "RollingGroups" if obs.outdated
              else "RestartingGroups" if obs.restarted or phase == "Degraded" else "CreatingGroups")
    return [
        _condition("Ready", False, "GroupsNotReady", serving, gen),
        _condition("Reconciling", True, reason, ", ".join(parts + [serving]), gen),
        stalled,
    ]


def merge_conditions(previous: list[dict[str, Any]] | None, updates: list[dict[str, Any]], now: str,
                     generation: int | None = None) -> list[dict[str, Any]]:
    """The one writer of ``status.conditions`` (the reconciler's and the balancer's conditions).

    ``updates`` replace the conditions of their type in place (new types are
    appended); every other condition is kept, garbage entries dropped.
    ``lastTransitionTime`` stays while a condition's status is unchanged, else
    becomes ``now``; ``generation``, when given, is set as observedGeneration.
    """
    merged = [dict(c) for c in (previous or []) if isinstance(c, dict)]
    where = {c.get("type"): i for i, c in enumerate(merged)}
    for update in updates:
        i = where.get(update["type"])
        old = merged[i] if i is not None else None
        kept_time = old.get("lastTransitionTime") if old and old.get("status") == update["status"] else None
        entry = dict(update) | {"lastTransitionTime": kept_time or now}
        if generation is not None:
            entry["observedGeneration"] = generation
        if i is None:
            where[update["type"]] = len(merged)
            merged.append(entry)
        else:
            merged[i] = entry
    return merged


def compute_status(obs: Observation, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The owned part of ``status`` (camelCase), to be merge-patched onto the live status."""
    previous = previous or {}
    phase = compute_phase(obs, previous.get("phase"))
    updates = compute_conditions(obs, phase) + compute_kstatus_conditions(obs, phase)
    if obs.weights_condition is not None:
        updates.append(_condition("WeightsReady", *obs.weights_condition, obs.generation))
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "phase": phase,
        "conditions": merge_conditions(previous.get("conditions"), updates, now),
    }
    if obs.invalid_field is None:
        status |= {"plan": obs.plan, "replicas": obs.replicas, "readyReplicas": obs.ready,
                   "selector": obs.selector, "groupRestarts": obs.group_restarts,
                   "drainingReplicas": obs.draining}
    elif obs.serving:
        status["readyReplicas"] = obs.ready
    if obs.weights is not None:  # keys the new value lacks are removed (null in a merge patch)
        status["weights"] = {k: None for k in previous.get("weights") or {} if k not in obs.weights} | obs.weights
    if obs.applied_spec is not None:  # a JSON string: a merge patch of a nested object would keep removed keys
        status["appliedSpec"] = json.dumps(obs.applied_spec, sort_keys=True, separators=(",", ":"))
    return status


def status_changed(previous: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing ``new`` (owned fields only) would change the live status."""
    previous = previous or {}
    return any(previous.get(key) != value for key, value in new.items())
