"""The balancer's kopf daemon: one per MoEDeployment, one rebalance cycle every loadBalancing.interval.

Imported by the operator command so the daemon registers with kopf. The
kopf part is thin: the daemon sleeps an interval (read from the live spec
each time), then runs ``balance_once`` in a worker thread (the API client is
synchronous) and posts its events. ``balance_once`` reads the live placement
from the deployment's ConfigMap, runs the pure cycle of rebalance.py, writes
the new placement (merge patch carrying the ConfigMap's resourceVersion:
if the reconciler rewrote it meanwhile, this cycle's plan is dropped) and
refuses a placement that would not fit the ConfigMap's 1 MiB
(Balanced=False, PlacementTooLarge) and patches the balancer's status fields
and conditions (Balanced, MetricsAvailable, PlacementAdopted) with kube.patch_status, which retries on conflicts with
the reconciler's own status writes.

Never crashes the operator: Prometheus failures become MetricsAvailable=False
(rebalance.py); API errors and anything unexpected are logged and retried
next interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import kopf

from moeshard.core import naming
from .api import API_VERSION, GROUP, PLURAL, VERSION, SpecError, parse_duration, parse_spec
from .kube import Kube, KubeError
from .grouped import grouped_routing
from .planner import plan_for_spec
from moeshard.core.placement import PLACEMENT_KEY, PlacementError, check_config_map_size, parse_placement
from .prometheus_source import PrometheusSource
from .backends import get_backend
from .rebalance import CONDITION_BALANCED, CycleOutcome, LoadSource, rfc3339, run_cycle
from .status import merge_conditions

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 300.0


@dataclass
class BalanceRun:
    """What one ``balance_once`` did: ``action`` is rebalanced, kept, skipped or conflict."""

    action: str
    why: str = ""
    outcome: CycleOutcome | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)


def interval_seconds(spec: Any) -> float:
    """spec.loadBalancing.interval in seconds; the default when absent or malformed (the reconciler reports it)."""
    try:
        return parse_duration(((spec or {}).get("loadBalancing") or {}).get("interval") or "5m")
    except (ValueError, AttributeError):
        return DEFAULT_INTERVAL_S


def balance_once(
    kube: Kube, body: dict[str, Any], make_source: Callable[[str], LoadSource] = PrometheusSource,
    now: datetime | None = None,
) -> BalanceRun:
    """One cycle for the MoEDeployment ``body`` (a plain dict). Synchronous: call it from a thread."""
    now = now or datetime.now(timezone.utc)
    meta = body["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or "default"
    # 1. A spec the reconciler accepted, with balancing on.
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError as exc:
        return BalanceRun("skipped", f"invalid spec: {exc}")
    lb = spec.load_balancing
    backend = get_backend(spec.engine.backend)
    if not backend.takes_placement:  # an engine that places experts itself: nothing to balance here
        return BalanceRun("skipped", f"engine backend {backend.name} takes no expert placement")
    if not lb.enabled:
        return _write_status(kube, body, BalanceRun("skipped", "loadBalancing.enabled is false", CycleOutcome(
            None, {}, [{"type": CONDITION_BALANCED, "status": "False", "reason": "Disabled",
                        "message": "loadBalancing.enabled is false"}], None)), now)
    # 2. The live placement the reconciler wrote (version 0 at first).
    config_map = kube.get("v1", "configmaps", namespace, naming.config_map_name(name))
    raw = ((config_map or {}).get("data") or {}).get(PLACEMENT_KEY)
    if raw is None:
        return BalanceRun("skipped", f"ConfigMap {naming.config_map_name(name)} has no {PLACEMENT_KEY} yet")
    try:
        current = parse_placement(raw)
    except PlacementError as exc:
        return BalanceRun("skipped", f"live {PLACEMENT_KEY} is invalid ({exc}); the reconciler resets it")
    # 3. The pure cycle: query, plan, hysteresis.
    # Ranks per NVLink domain of this group, as the planner laid it out (and as the engine is told).
    plan = plan_for_spec(spec)
    gpus_per_domain = plan.chosen.ranks_per_domain
    # A group-limited router (DeepSeek-V3) keeps each expert group's replicas inside one domain.
    groups = grouped_routing(plan.model.expert_groups, current.num_experts, current.num_gpus, current.slots_per_gpu,
                             gpus_per_domain)
    outcome = run_cycle(make_source(lb.prometheus_url), name, namespace, current, lb, gpus_per_domain, now, groups)
    run = BalanceRun("kept", "", outcome, [outcome.event] if outcome.event else [])
    # 4. The new placement, only when it fits the ConfigMap, only over the ConfigMap we read.
    if outcome.placement is not None:
        other = sum(len(str(v).encode()) for k, v in ((config_map.get("data") or {}).items()) if k != PLACEMENT_KEY)
        try:
            check_config_map_size(outcome.placement, other)
        except PlacementError as exc:
            kept = {k: v for k, v in outcome.status.items() if k == "groupPlacementVersions"}
            too_large = CycleOutcome(None, {"placementVersion": current.version, **kept}, [
                *(c for c in outcome.conditions if c["type"] != CONDITION_BALANCED),
                {"type": CONDITION_BALANCED, "status": "False", "reason": "PlacementTooLarge", "message": str(exc)}],
                ("Warning", "PlacementTooLarge", f"placement v{current.version} kept: {exc}"))
            run = BalanceRun("kept", str(exc), too_large, [too_large.event])
            return _write_status(kube, body, run, now)
        patch = {"metadata": {"resourceVersion": config_map["metadata"].get("resourceVersion")},
                 "data": {PLACEMENT_KEY: outcome.placement.to_json()}}
        try:
            kube.patch("v1", "configmaps", namespace, naming.config_map_name(name), patch)
        except KubeError as exc:
            if exc.status in (404, 409):
                return BalanceRun("conflict", f"ConfigMap changed while planning ({exc.reason}); retry next interval")
            raise
        run.action = "rebalanced"
    return _write_status(kube, body, run, now)


def _write_status(kube: Kube, body: dict[str, Any], run: BalanceRun, now: datetime) -> BalanceRun:
    outcome = run.outcome
    assert outcome is not None  # set by every caller

    def build(live_status: dict[str, Any]) -> dict[str, Any] | None:
        conditions = merge_conditions(live_status.get("conditions"), outcome.conditions, rfc3339(now),
                                      generation=body["metadata"].get("generation"))
        new = {**outcome.status, "conditions": conditions}
        unchanged = all(live_status.get(k) == v for k, v in new.items())
        return None if unchanged else new

    kube.patch_status(API_VERSION, PLURAL, body, build)
    return run


# =========================================================================== kopf wiring


def _plain(body: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(body), default=dict))


@kopf.daemon(GROUP, VERSION, PLURAL, id="balancer", cancellation_backoff=1.0, cancellation_timeout=5.0)
async def balancer_daemon(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: Any,
                          **_: Any) -> None:
    """Every spec.loadBalancing.interval: one rebalance cycle for this deployment."""
    make_source = getattr(memo, "balancer_source", None) or PrometheusSource
    while not await stopped.wait(interval_seconds(body.get("spec"))):
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        kube = getattr(memo, "kube", None)
        if kube is None:
            continue  # the operator's startup handler has not opened the client yet
        try:
            run = await asyncio.to_thread(balance_once, kube, _plain(body), make_source)
        except KubeError as exc:
            logger.warning("balancer: API error, retrying next interval: %s", exc)
            continue
        except Exception:  # noqa: BLE001 - the balancer must never take the operator down
            logger.exception("balancer: cycle failed, retrying next interval")
            continue
        if run.why:
            logger.info("balancer: %s: %s", run.action, run.why)
        for type_, reason, message in run.events:
            kopf.event(body, type=type_, reason=reason, message=message[:1000])
