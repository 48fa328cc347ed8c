"""One rebalance cycle: measured load -> candidate placement -> hysteresis -> what to write.

Pure apart from ``run_cycle``'s Prometheus query. The kopf daemon
(balancer_handlers.py) only reads the live placement, calls ``run_cycle``,
writes ``CycleOutcome.placement`` into the ConfigMap, patches the status
fields and conditions, and posts the event.

Hysteresis: the candidate (incremental from the live placement, at most
``maxMovesPerCycle`` weight copies per layer) is applied only when it lowers
the predicted max/mean GPU load, averaged over layers, by at least
``improvementThreshold`` as a fraction: after <= before * (1 - threshold).
Otherwise the live placement stays and nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from .api import LoadBalancingSpec
from .balancer import BalancerOptions, rebalance_placement
from moeshard.core.placement import Placement, imbalance
from .prometheus_source import MetricsUnavailable

CONDITION_BALANCED = "Balanced"
CONDITION_METRICS = "MetricsAvailable"


class LoadSource(Protocol):
    def expert_loads(self, name: str, namespace: str, window: str, num_layers: int, num_experts: int) -> np.ndarray: ...


@dataclass(frozen=True)
class CycleOutcome:
    """Result of one cycle.

    placement: the new placement to write, or None to keep the live one.
    status: status fields to merge (camelCase, MoEDeploymentStatus names).
    conditions: conditions to set (type, status, reason, message).
    event: (type "Normal" or "Warning", reason, message), or None.
    moves [L]: weight copies the new placement needs (zeros when kept).
    """

    placement: Placement | None
    status: dict[str, Any]
    conditions: list[dict[str, str]]
    event: tuple[str, str, str] | None
    moves: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def rfc3339(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def replicated_experts(placement: Placement) -> int:
    """Logical experts with more than one replica, summed over layers."""
    return int((placement.replica_counts() > 1).sum())


def plan_cycle(
    current: Placement, loads: np.ndarray, spec: LoadBalancingSpec, gpus_per_domain: int | None, now: datetime
) -> CycleOutcome:
    """Decide from measured ``loads`` [L, E] whether to replace ``current``; pure."""
    metrics_ok = {"type": CONDITION_METRICS, "status": "True", "reason": "QuerySucceeded",
                  "message": f"{int(loads.sum())} expert tokens in the window"}
    if not np.any(loads > 0):
        metrics_ok = {**metrics_ok, "reason": "NoTraffic", "message": "no tokens in the window; placement kept"}
        return CycleOutcome(None, {"placementVersion": current.version}, [metrics_ok], None)
    # 1. Candidate: incremental from the live placement, copies capped per layer.
    options = BalancerOptions(max_moves=spec.max_moves_per_cycle)
    result = rebalance_placement(loads, current.num_gpus, current.slots_per_gpu, gpus_per_domain, current, options)
    # 2. Predicted max/mean on this window, live against candidate.
    before = imbalance(current, loads)
    after = imbalance(result.placement, loads)
    gain = (before - after) / before
    moves = int(result.moves.sum())
    # 3. Hysteresis.
    if gain < spec.improvement_threshold:
        balanced = {"type": CONDITION_BALANCED, "status": "True", "reason": "WithinThreshold",
                    "message": f"max/mean {before:.3f}; best candidate {after:.3f} gains {100 * gain:.1f}% "
                               f"< improvementThreshold {100 * spec.improvement_threshold:.1f}%"}
        status = {"placementVersion": current.version, "imbalanceAfter": round(before, 4),
                  "replicatedExperts": replicated_experts(current)}
        return CycleOutcome(None, status, [metrics_ok, balanced], None)
    new = result.placement.with_version(current.version + 1)
    balanced = {"type": CONDITION_BALANCED, "status": "True", "reason": "Rebalanced",
                "message": f"placement v{new.version}: max/mean {before:.3f} -> {after:.3f}, {moves} expert copies"}
    status = {"placementVersion": new.version, "imbalanceBefore": round(before, 4), "imbalanceAfter": round(after, 4),
              "replicatedExperts": replicated_experts(new), "lastRebalanceTime": rfc3339(now)}
    event = ("Normal", "Rebalanced", f"placement v{current.version} -> v{new.version}: max/mean GPU load "
             f"{before:.3f} -> {after:.3f}, {moves} expert weight copies over {new.num_layers} layers")
    return CycleOutcome(new, status, [metrics_ok, balanced], event, result.moves)


def unavailable_cycle(current: Placement, error: MetricsUnavailable) -> CycleOutcome:
    """Keep the placement and say why the metrics could not be used; pure."""
    condition = {"type": CONDITION_METRICS, "status": "False", "reason": error.reason, "message": error.message}
    event = ("Warning", "MetricsUnavailable", f"placement v{current.version} kept: {error.reason}: {error.message}")
    return CycleOutcome(None, {"placementVersion": current.version}, [condition], event)


def run_cycle(
    source: LoadSource, name: str, namespace: str, current: Placement, spec: LoadBalancingSpec,
    gpus_per_domain: int | None, now: datetime | None = None,
) -> CycleOutcome:
    """Query the window's load and plan; any metrics failure keeps the live placement."""
    now = now or datetime.now(timezone.utc)
    try:
        loads = source.expert_loads(name, namespace, spec.window, current.num_layers, current.num_experts)
    except MetricsUnavailable as exc:
        return unavailable_cycle(current, exc)
    return plan_cycle(current, loads, spec, gpus_per_domain, now)


def merge_conditions(existing: list[dict[str, Any]] | None, updates: list[dict[str, str]], now: datetime,
                     generation: int | None = None) -> list[dict[str, Any]]:
    """Conditions list with ``updates`` set by type; lastTransitionTime changes only with the status."""
    merged = [dict(c) for c in (existing or [])]
    for update in updates:
        old = next((c for c in merged if c.get("type") == update["type"]), None)
        entry = dict(update)
        entry["lastTransitionTime"] = (
            old["lastTransitionTime"] if old and old.get("status") == update["status"] and old.get("lastTransitionTime")
            else rfc3339(now)
        )
        if generation is not None:
            entry["observedGeneration"] = generation
        if old is None:
            merged.append(entry)
        else:
            merged[merged.index(old)] = entry
    return merged
