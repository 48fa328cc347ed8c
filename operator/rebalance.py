"""One rebalance cycle: measured load -> per-layer decision -> what to write and report.

Pure apart from ``run_cycle``'s Prometheus queries. The kopf daemon
(balancer_handlers.py) only reads the live placement, calls ``run_cycle``,
writes ``CycleOutcome.placement`` into the ConfigMap, patches the status
fields and conditions, and posts the event.

The decision is acceptance.decide_placement (the same function the CLI runs):
per layer, out of sample, above max(improvementThreshold, Poisson noise),
copies budgeted by maxMovesPerCycle (per layer) and moveBudgetPerCycle (per
cycle). Layers that do not move keep their live rows verbatim.

Besides the load, a cycle reads the scrape coverage of the window (too
little: the window is skipped) and the placement version each replica group
serves (status.groupPlacementVersions; a group behind the ConfigMap's
version, or one that refused a placement, gets PlacementAdopted=False).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from .acceptance import MOVE, AcceptanceOptions, Decision, decide_placement
from .api import LoadBalancingSpec
from moeshard.core.placement import Placement, imbalance
from .prometheus_source import MetricsUnavailable

CONDITION_BALANCED = "Balanced"
CONDITION_METRICS = "MetricsAvailable"
CONDITION_ADOPTED = "PlacementAdopted"


class LoadSource(Protocol):
    def expert_loads(self, name: str, namespace: str, window: str, num_layers: int, num_experts: int) -> np.ndarray: ...

    def coverage(self, name: str, namespace: str, window: str) -> float | None: ...

    def group_versions(self, name: str, namespace: str, window: str) -> dict[str, tuple[int, bool]]: ...


@dataclass(frozen=True)
class CycleOutcome:
    """Result of one cycle.

    placement: the new placement to write, or None to keep the live one.
    status: status fields to merge (camelCase, MoEDeploymentStatus names).
    conditions: conditions to set (type, status, reason, message).
    event: (type "Normal" or "Warning", reason, message), or None.
    moves [L]: weight copies the new placement needs (zeros when kept).
    decision: the per-layer decision, when one was made.
    """

    placement: Placement | None
    status: dict[str, Any]
    conditions: list[dict[str, str]]
    event: tuple[str, str, str] | None
    moves: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    decision: Decision | None = None


def rfc3339(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def replicated_experts(placement: Placement) -> int:
    """Logical experts with more than one replica, summed over layers."""
    return int((placement.replica_counts() > 1).sum())


def acceptance_options(spec: LoadBalancingSpec, expert_groups: int | None = None) -> AcceptanceOptions:
    """The decision's knobs from the spec and the router (the rest keep AcceptanceOptions' defaults).

    ``expert_groups``: the router's groups to keep inside NVLink domains (``grouped.grouped_routing``).
    """
    return AcceptanceOptions(floor=spec.improvement_threshold, max_moves=spec.max_moves_per_cycle,
                             move_budget=spec.move_budget_per_cycle, expert_groups=expert_groups)


def plan_cycle(
    current: Placement, loads: np.ndarray, spec: LoadBalancingSpec, gpus_per_domain: int | None, now: datetime,
    coverage: float | None = None, expert_groups: int | None = None,
) -> CycleOutcome:
    """Decide from measured ``loads`` [L, E] which layers of ``current`` change; pure."""
    metrics_ok = {"type": CONDITION_METRICS, "status": "True", "reason": "QuerySucceeded",
                  "message": f"{int(loads.sum())} expert tokens in the window"}
    if not np.any(loads > 0):
        metrics_ok = {**metrics_ok, "reason": "NoTraffic", "message": "no tokens in the window; placement kept"}
        return CycleOutcome(None, {"placementVersion": current.version}, [metrics_ok], None)
    decision = decide_placement(current, loads, gpus_per_domain, acceptance_options(spec, expert_groups), coverage)
    before = imbalance(current, loads)
    if decision.skipped is not None:
        metrics_ok = {**metrics_ok, "reason": "WindowSkipped", "message": f"placement kept: {decision.skipped}"}
        return CycleOutcome(None, {"placementVersion": current.version}, [metrics_ok], None, decision.moves, decision)
    counts: dict[str, int] = {}
    for d in decision.layers:
        counts[d.decision] = counts.get(d.decision, 0) + 1
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if decision.placement is None:
        balanced = {"type": CONDITION_BALANCED, "status": "True", "reason": "WithinThreshold",
                    "message": f"max/mean {before:.3f}; no layer gains enough ({tally})"}
        status = {"placementVersion": current.version, "imbalanceAfter": round(before, 4),
                  "replicatedExperts": replicated_experts(current)}
        return CycleOutcome(None, status, [metrics_ok, balanced], None, decision.moves, decision)
    new = decision.placement
    after = imbalance(new, loads)
    moves = int(decision.moves.sum())
    moved = [d.layer for d in decision.layers if d.decision == MOVE]
    balanced = {"type": CONDITION_BALANCED, "status": "True", "reason": "Rebalanced",
                "message": f"placement v{new.version}: max/mean {before:.3f} -> {after:.3f}, {moves} expert copies "
                           f"in {len(moved)} layers ({tally})"}
    status = {"placementVersion": new.version, "imbalanceBefore": round(before, 4), "imbalanceAfter": round(after, 4),
              "replicatedExperts": replicated_experts(new), "lastRebalanceTime": rfc3339(now)}
    event = ("Normal", "Rebalanced", f"placement v{current.version} -> v{new.version}: max/mean GPU load "
             f"{before:.3f} -> {after:.3f}, {moves} expert weight copies in {len(moved)} of {new.num_layers} layers")
    return CycleOutcome(new, status, [metrics_ok, balanced], event, decision.moves, decision)


def adoption(current_version: int, groups: dict[str, tuple[int, bool]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Status fields and the PlacementAdopted condition from what each replica group serves; pure.

    ``groups``: {replica: (version served, refused a placement in the window)}.
    """
    versions = {r: v for r, (v, _) in groups.items()}
    behind = {r: v for r, v in versions.items() if v < current_version}
    rejected = sorted(r for r, (_, refused) in groups.items() if refused)
    status = {"groupPlacementVersions": versions}
    if not groups:
        return status, {"type": CONDITION_ADOPTED, "status": "Unknown", "reason": "NoGroupMetrics",
                        "message": "no replica group exports moeshard_placement_version yet"}
    if rejected:
        return status, {"type": CONDITION_ADOPTED, "status": "False", "reason": "Rejected",
                        "message": f"replica groups {', '.join(rejected)} refused a placement file; "
                                   f"serving {', '.join(f'{r}: v{versions[r]}' for r in rejected)}"}
    if behind:
        return status, {"type": CONDITION_ADOPTED, "status": "False", "reason": "GroupsBehind",
                        "message": f"placement v{current_version} not yet served by "
                                   + ", ".join(f"group {r} (v{v})" for r, v in sorted(behind.items()))}
    return status, {"type": CONDITION_ADOPTED, "status": "True", "reason": "AllGroupsAdopted",
                    "message": f"all {len(groups)} replica groups serve placement v{current_version}"}


def unavailable_cycle(current: Placement, error: MetricsUnavailable) -> CycleOutcome:
    """Keep the placement and say why the metrics could not be used; pure."""
    condition = {"type": CONDITION_METRICS, "status": "False", "reason": error.reason, "message": error.message}
    event = ("Warning", "MetricsUnavailable", f"placement v{current.version} kept: {error.reason}: {error.message}")
    return CycleOutcome(None, {"placementVersion": current.version}, [condition], event)


def run_cycle(
    source: LoadSource, name: str, namespace: str, current: Placement, spec: LoadBalancingSpec,
    gpus_per_domain: int | None, now: datetime | None = None, expert_groups: int | None = None,
) -> CycleOutcome:
    """Query the window's load and plan; any metrics failure keeps the live placement."""
    now = now or datetime.now(timezone.utc)
    try:
        loads = source.expert_loads(name, namespace, spec.window, current.num_layers, current.num_experts)
        coverage = source.coverage(name, namespace, spec.window)
        groups = source.group_versions(name, namespace, spec.window)
    except MetricsUnavailable as exc:
        return unavailable_cycle(current, exc)
    outcome = plan_cycle(current, loads, spec, gpus_per_domain, now, coverage, expert_groups)
    group_status, adopted = adoption(current.version, groups)
    return CycleOutcome(outcome.placement, {**outcome.status, **group_status}, [*outcome.conditions, adopted],
                        outcome.event, outcome.moves, outcome.decision)
