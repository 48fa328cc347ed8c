"""kopf handlers for MoEDeployment: validate -> plan -> build -> apply -> status.

Two layers:

* ``reconcile(kube, body, now)``: the whole reconcile of one
  MoEDeployment, synchronous, over the apply layer (kube.py). It never raises
  for a bad spec: it writes a Planned=False condition naming the field and
  returns the Events to post. Tests and the fuzz call it directly.
* the kopf handlers at the bottom: thin wrappers that run ``reconcile`` in a
  worker thread (one at a time per object), post its Events and turn its
  outcome into kopf's retry/permanent-error signals. A daemon per object
  re-runs it every ``resync_seconds`` (``progress_seconds`` while groups are
  starting or rolling) to notice failed pods, readiness and roll the next group.

Reconcile steps:
  1. validate the spec (pydantic + CEL mirrors) and plan it (planner); a bad
     spec changes no child object;
  2. list the children (by deployment label and owner uid);
  3. apply the ConfigMap (keep the balancer's placement while it fits the
     plan, otherwise a fresh placement with the next version) and the Service;
  4. weights (weights.py): an hf:// checkpoint is downloaded once by a Job into
     a PVC; until it has succeeded (WeightsReady) no group object is created or
     rolled. Then per replica group: apply headless Service, PDB, ComputeDomain;
     create a missing group; recreate a group whose pod failed after start (restart
     budget permitting); roll an outdated group (new EP/TP/image) only while
     the other ready groups keep capacity >= replicas - maxUnavailable;
  5. delete everything of the groups at index >= replicas (scale down); with
     spec.autoscaling a group is drained first (see ``drain_groups``), and the
     HPA / KEDA ScaledObject is applied (or deleted when the section goes);
  6. write status (only when it changed), with the spec just applied
     (``status.appliedSpec``: a later bad spec is diffed against it).

Refusals:
  * a bad or unplannable spec while groups of an earlier spec still serve:
    nothing is touched, phase Degraded, Available from the live groups, and
    the conditions name the field that changed since the applied spec
    (``spec_change_note``), not only the field the validator tripped on;
  * a child the API server refuses (422 Invalid, e.g. a value an admission
    policy or a newer server rejects): every object this pass created is
    deleted again (so no half group or orphan Service/PDB is left), the
    conditions say ``ApplyRejected`` with the object and the server's
    message, and the handler stops retrying the generation
    (kopf.PermanentError); the resync daemon tries again every
    ``resync_seconds`` (a policy may change), a spec change at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from moeshard.core import naming
from .api import API_VERSION, GROUP, PLURAL, VERSION, SpecError, parse_duration, parse_resource
from .kube import Kube, KubeError, kube_from_config
from .deployment import Deployment
from .manifests import (
    HASH_ANNOTATION, KINDS, LWS_API_VERSION, build_compute_domain, build_config_map,
    build_group, build_headless_service, build_initial_placement, build_network_policy, build_pod_disruption_budget,
    build_service,
    placement_fits,
)
from moeshard.core.placement import PLACEMENT_KEY, PlacementError, parse_placement
from .planner import plan_for_spec
from .status import Observation, compute_status, status_changed
from .live import (
    LiveChildren, annotation, group_pods, group_ready, now_rfc3339, owned_by, parse_time, pod_failed_after_start,
    replica_of,
)
from .scaling import AUTOSCALER_KINDS, ScalingMixin
from .spec_diff import applied_spec, spec_change_note
from .weights import WeightsMixin


@dataclass(frozen=True)
class OperatorConfig:
    """Operator settings, built once (run_operator.py, or a test) and handed to kopf through ``memo``."""

    resync_seconds: float = 60.0  # re-reconcile a settled deployment this often
    progress_seconds: float = 5.0  # ... and this often while groups start, roll or fail
    watch_server_timeout: int = 300  # seconds a watch request stays open on the server
    watch_client_timeout: int = 330
    request_timeout: float = 30.0
    error_delay_seconds: float = 10.0  # retry delay after an API error
    peering_mandatory: bool = False  # refuse to run when the kopf peering object is missing


@dataclass
class Outcome:
    """Result of one reconcile: events to post, whether the spec was bad, when to look again."""

    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    invalid: SpecError | None = None
    rejected: str | None = None  # "Kind name: server message" of a child the API server refused (422)
    settled: bool = False
    status: dict[str, Any] | None = None


class _Reconciler(ScalingMixin, WeightsMixin):
    """State of one reconcile pass (a helper of ``reconcile``; not kept between passes)."""

    def __init__(self, kube: Kube, body: dict[str, Any], now: str):
        self.kube = kube
        self.body = body
        meta = body.get("metadata") or {}
        self.name: str = meta.get("name", "")
        self.namespace: str = meta.get("namespace", "default")
        self.uid: str = meta.get("uid", "")
        self.generation: int = int(meta.get("generation") or 1)
        self.now = now
        self.outcome = Outcome()
        self.created: list[dict[str, Any]] = []  # objects this pass created, for a rollback after a 422

    # ------------------------------------------------------------ helpers
    def event(self, reason: str, message: str, type_: str = "Normal") -> None:
        self.outcome.events.append((type_, reason, message))

    def apply(self, desired: dict[str, Any], live: dict[str, Any] | None, force: bool = False) -> dict[str, Any]:
        try:
            result = self.kube.apply(desired, live, force=force)
        except KubeError as exc:
            if exc.status == 422:
                raise _Rejected(desired, exc) from exc
            raise
        if result.action == "created":
            self.created.append(result.obj | {"kind": desired["kind"]})
        if result.action != "unchanged":
            self.event(result.action.capitalize(), f"{result.action} {desired['kind']} {desired['metadata']['name']}")
        return result.obj

    def delete(self, obj: dict[str, Any], why: str) -> None:
        api_version, plural = KINDS[obj["kind"]]
        if self.kube.delete(api_version, plural, self.namespace, obj["metadata"]["name"]):
            self.event("Deleted", f"deleted {obj['kind']} {obj['metadata']['name']} ({why})")

    def children(self, kind: str) -> list[dict[str, Any]]:
        api_version, plural = KINDS[kind]
        try:
            items = self.kube.list(api_version, plural, self.namespace, {naming.LABEL_DEPLOYMENT: self.name})
        except KubeError as exc:
            if exc.status == 404:  # kind not served (e.g. no ComputeDomain CRD)
                return []
            raise
        for item in items:
            item.setdefault("kind", kind)
        return [item for item in items if owned_by(item, self.uid) or kind == "Pod"]

    def write_status(self, obs: Observation) -> None:
        def build(live: dict[str, Any]) -> dict[str, Any] | None:
            new = compute_status(obs, live, self.now)
            self.outcome.status = new
            return new if status_changed(live, new) else None

        self.kube.patch_status(API_VERSION, PLURAL, self.body, build)

    # ------------------------------------------------------------ steps
    def invalid(self, exc: SpecError) -> Outcome:
        self.outcome.invalid = exc
        status = self.body.get("status") or {}
        changed = spec_change_note(applied_spec(status), self.body.get("spec"), exc)
        field_name, message = changed if changed else (exc.field, exc.message)
        self.event("InvalidSpec", f"{field_name}: {message}", "Warning")
        serving = self.live_groups()
        self.write_status(Observation(
            generation=self.generation, invalid_field=field_name, invalid_message=message,
            replicas=int(status.get("replicas") or 0) if serving else 0,
            ready=sum(group_ready(g, group_pods(g)) for g in serving), serving=len(serving)))
        return self.outcome

    def live_groups(self) -> list[dict[str, Any]]:
        """The replica groups (either kind) that exist now, e.g. from an earlier, valid spec."""
        return [g for kind in ("StatefulSet", "LeaderWorkerSet") for g in self.children(kind)]

    def rejected(self, exc: "_Rejected", obs: dict[str, Any]) -> Outcome:
        """A child was refused (422): undo this pass's creations, say so in status, keep the rest."""
        for obj in reversed(self.created):
            if obj["metadata"]["name"] != exc.name or obj["kind"] != exc.kind:
                self.delete(obj, f"rolled back: {exc.kind} {exc.name} was rejected")
        self.outcome.rejected = f"{exc.kind} {exc.name}: {exc.message}"
        self.event("ApplyRejected", self.outcome.rejected, "Warning")
        serving = self.live_groups()
        self.write_status(Observation(
            **obs, ready=sum(group_ready(g, group_pods(g)) for g in serving),
            serving=len(serving), failed_reason="ApplyRejected",
            failed_message=f"the API server refused {self.outcome.rejected}"))
        return self.outcome

    def config_map(self, d: Deployment, live: dict[str, Any] | None) -> None:
        placement = build_initial_placement(d)
        if live is not None and PLACEMENT_KEY in (live.get("data") or {}):
            try:
                current = parse_placement(live["data"][PLACEMENT_KEY])
            except PlacementError:
                current = None
            if current is not None and placement_fits(d, current):
                placement = None  # the balancer's placement stays
            elif current is not None:
                placement = placement.with_version(current.version + 1)
        # A live placement that no longer parses or fits is rewritten even when the plan is unchanged
        # (the desired-hash leaves placement.json out, so it alone would say "unchanged").
        self.apply(build_config_map(d, placement), live, force=placement is not None and live is not None)
        if placement is not None and placement.version > 0:
            self.event("PlacementReset", f"placement reset to version {placement.version} for the new plan")

    def named(self, kind: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.children(kind)}

    def delete_group(self, group: dict[str, Any], pods: list[dict[str, Any]], why: str) -> None:
        self.delete(group, why)
        replica = replica_of(group)
        for pod in pods:  # the GC would delete them too; doing it now frees the names at once
            if replica_of(pod) == replica:
                self.kube.delete("v1", "pods", self.namespace, pod["metadata"]["name"])

    def restart_history(self, spec_window: str) -> list[dict[str, Any]]:
        window = parse_duration(spec_window)
        now = parse_time(self.now)
        history = []
        for entry in (self.body.get("status") or {}).get("groupRestarts") or []:
            try:
                when = parse_time(entry["time"])
            except (KeyError, TypeError, ValueError):
                continue
            if (now - when).total_seconds() <= window:
                history.append(entry)
        return history

    def run(self) -> Outcome:
        # 1. validate and plan
        try:
            spec = parse_resource(self.body)
            plan = plan_for_spec(spec)
        except SpecError as exc:
            return self.invalid(exc)
        d = Deployment(self.name, self.namespace, self.uid, spec, plan)
        c = plan.chosen
        summary = (f"attention TP {c.attention_tp} x EP {c.expert_ep}; {c.replicas} replica group(s) of "
                   f"{c.pods_per_replica} pod(s) x {c.gpus_per_pod} {'GPU' if d.hardware.uses_gpus else 'rank'}(s)"
                   + ("; crosses the fabric" if c.crosses_fabric else ""))
        obs = dict(generation=self.generation, replicas=d.replicas, plan=plan.to_status(), plan_summary=summary,
                   selector=naming.pod_selector(self.name), max_unavailable=spec.engine.max_unavailable)
        if d.uses_lws and not self.kube.has_api(LWS_API_VERSION, "leaderworkersets"):
            self.write_status(Observation(**obs, missing=d.replicas, pending_reason="LeaderWorkerSetMissing",
                                          pending_message="spec.engine.groupKind: LeaderWorkerSet needs the "
                                          "leaderworkerset.x-k8s.io CRD, which this cluster does not serve"))
            return self.outcome

        try:
            return self.apply_children(d, spec, obs)
        except _Rejected as exc:
            return self.rejected(exc, obs)

    def apply_children(self, d: Deployment, spec: Any, obs: dict[str, Any]) -> Outcome:
        """Steps 2-6 for a valid, planned spec; raises _Rejected when the API server refuses a child."""
        # 2. children
        live = LiveChildren(
            config_maps=self.named("ConfigMap"), services=self.named("Service"),
            pdbs=self.named("PodDisruptionBudget"), domains=self.named("ComputeDomain"),
            policies=self.named("NetworkPolicy"),
            groups=self.named("LeaderWorkerSet" if d.uses_lws else "StatefulSet"),
            other_kind_groups=self.named("StatefulSet" if d.uses_lws else "LeaderWorkerSet"),
            pods=self.children("Pod"),
        )

        # 3. config and front Service (rank-0 pods labelled for it first, with spec.autoscaling)
        self.label_serving(d, live)
        self.config_map(d, live.config_maps.get(naming.config_map_name(self.name)))
        self.apply(build_service(d), live.services.get(naming.service_name(self.name)))

        # 4. weights (hf:// downloaded once, weights.py): until WeightsReady no group object is created or rolled;
        #    then per-group objects, then the groups themselves
        weights = self.weights(d, live)
        for r in range(d.replicas if weights.ready else 0):
            self.apply(build_headless_service(d, d.group(r)),
                       live.services.get(naming.headless_service_name(self.name, r)))
            self.apply(build_pod_disruption_budget(d, d.group(r)), live.pdbs.get(naming.group_name(self.name, r)))
            if spec.engine.scheduling.compute_domain:
                self.apply(build_compute_domain(d, d.group(r)), live.domains.get(naming.group_name(self.name, r)))
            if spec.engine.network_policy:
                self.apply(build_network_policy(d, d.group(r)), live.policies.get(naming.group_name(self.name, r)))
        for group in live.other_kind_groups.values() if weights.ready else ():  # groupKind changed: old kind goes
            self.delete_group(group, live.pods, "spec.engine.groupKind changed")
        counts = self.groups(d, live) if weights.ready else self.held_counts(d, live, weights)

        # 5. scale down: everything of a group index >= replicas (and ComputeDomains or NetworkPolicies no
        #    longer asked for), once drained when spec.autoscaling asks for drains; then the autoscaler object
        draining = self.drain_groups(d, live)
        for objs in (live.groups, live.services, live.pdbs, live.domains, live.policies):
            for obj in objs.values():
                r = replica_of(obj)
                stale_domain = obj["kind"] == "ComputeDomain" and not spec.engine.scheduling.compute_domain
                stale_policy = obj["kind"] == "NetworkPolicy" and not spec.engine.network_policy
                if r in draining and not (stale_domain or stale_policy):
                    continue
                if r is not None and (r >= d.replicas or stale_domain or stale_policy):
                    if objs is live.groups:
                        self.delete_group(obj, live.pods, "scaled down")
                    else:
                        self.delete(obj, "scaled down" if r >= d.replicas else "spec.engine.scheduling changed")
        self.autoscaler(d)

        # 6. status
        overdue = self.overdue(d, live)
        self.write_status(Observation(**obs, **counts, draining=len(draining),
                                      overdue_reason=overdue.reason if overdue else None,
                                      overdue_message=overdue.message if overdue else "",
                                      applied_spec=self.body.get("spec"), weights=weights.status,
                                      weights_condition=weights.condition, weights_pending=weights.pending_message))
        self.outcome.settled = (counts["ready"] == d.replicas and not (
            counts["missing"] or counts["outdated"] or counts["restarted"] or draining)) or bool(
            counts["failed_reason"])
        return self.outcome

    def groups(self, d: Deployment, live: "LiveChildren") -> dict[str, Any]:
        """Create missing groups, recreate failed ones, roll outdated ones; returns Observation counts.

        Rolling rule: an outdated group that is serving (all pods ready) is
        replaced only while the other serving groups stay >= replicas -
        maxUnavailable; an outdated group that is not serving is replaced at once.
        """
        budget = d.spec.engine.restart_budget
        history = self.restart_history(budget.window)
        desired = {g.index: build_group(d, g) for g in d.groups()}
        current = {r: live.groups.get(naming.group_name(self.name, r)) for r in range(d.replicas)}
        serving = {r for r, g in current.items() if g is not None and group_ready(g, d.pods_per_replica)}
        floor = d.replicas - d.spec.engine.max_unavailable
        counts: dict[str, Any] = dict(missing=0, outdated=0, restarted=0, failed_reason=None, failed_message="")
        for r in range(d.replicas):
            group = current[r]
            if group is None:
                counts["missing"] += 1
                self.apply(desired[r], None)
                continue
            if annotation(group, HASH_ANNOTATION) != annotation(desired[r], HASH_ANNOTATION):
                counts["outdated"] += 1
                if r in serving and len(serving) - 1 < floor:
                    continue  # wait: replacing it now would drop capacity below the floor
                serving.discard(r)
                self.delete_group(group, live.pods, "rolling to the new plan")
                self.apply(desired[r], None)
                self.event("RolledGroup", f"replica group {r} replaced with the new template")
                continue
            # LeaderWorkerSet recreates its group itself (RecreateGroupOnPodRestart)
            failed = not d.uses_lws and any(
                pod_failed_after_start(p, group) for p in live.pods if replica_of(p) == r)
            if not failed:
                continue
            # a pod failed after start: the group is recreated as a unit, within the restart budget
            if len(history) >= budget.max_restarts:
                counts["failed_reason"] = "RestartBudgetExceeded"
                counts["failed_message"] = (
                    f"replica group {r} failed again after {len(history)} recreations within {budget.window} "
                    f"(spec.engine.restartBudget.maxRestarts {budget.max_restarts})")
                continue
            history.append({"replica": r, "time": self.now})
            counts["restarted"] += 1
            serving.discard(r)
            self.delete_group(group, live.pods, "a pod failed after start")
            self.apply(desired[r], None)
            self.event("RecreatedGroup", f"replica group {r} recreated after a pod failed "
                                         f"({len(history)}/{budget.max_restarts} in {budget.window})", "Warning")
        if counts["failed_reason"]:
            self.event(counts["failed_reason"], counts["failed_message"], "Warning")
        return counts | {"ready": len(serving), "group_restarts": history}


class _Rejected(Exception):
    """The API server refused a child object (HTTP 422 Invalid)."""

    def __init__(self, desired: dict[str, Any], error: KubeError):
        super().__init__(str(error))
        self.kind = desired["kind"]
        self.name = desired["metadata"]["name"]
        self.message = error.message


def reconcile(kube: Kube, body: dict[str, Any], now: str | None = None) -> Outcome:
    """Reconcile one MoEDeployment body (a plain dict). Raises only KubeError (API trouble)."""
    return _Reconciler(kube, body, now or now_rfc3339()).run()


def cleanup(kube: Kube, body: dict[str, Any]) -> Outcome:
    """Delete every child of a MoEDeployment (the finalizer's work; on a real cluster the GC would follow)."""
    rec = _Reconciler(kube, body, now_rfc3339())
    for kind in (*AUTOSCALER_KINDS, "StatefulSet", "LeaderWorkerSet", "ComputeDomain", "PodDisruptionBudget",
                 "NetworkPolicy", "Service", "ConfigMap", "Job", "PersistentVolumeClaim", "Pod"):
        for obj in rec.children(kind):
            if kind == "Pod":
                kube.delete("v1", "pods", rec.namespace, obj["metadata"]["name"])
            else:
                rec.delete(obj, "MoEDeployment deleted")
    return rec.outcome


# =========================================================================== kopf wiring


def _plain(body: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(body), default=dict))


def _config(memo: Any) -> OperatorConfig:
    return getattr(memo, "config", None) or OperatorConfig()


def _post(body: Any, events: list[tuple[str, str, str]]) -> None:
    for type_, reason, message in events:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Apply the OperatorConfig to kopf's settings; open the API client."""
    config = _config(memo)
    settings.persistence.finalizer = naming.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.networking.request_timeout = config.request_timeout
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "moeshard-operator"
    settings.peering.mandatory = config.peering_mandatory
    memo.config = config
    if getattr(memo, "kube", None) is None:
        memo.kube = kube_from_config()
        memo.kube.timeout = config.request_timeout
    memo.locks = {}


async def _reconcile_now(body: Any, memo: kopf.Memo, fn: Any = reconcile) -> Outcome:
    uid = body["metadata"]["uid"]
    lock = memo.locks.setdefault(uid, asyncio.Lock())
    async with lock:
        outcome = await asyncio.to_thread(fn, memo.kube, _plain(body))
    _post(body, outcome.events)
    return outcome


async def reconcile_handler(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Create, update (spec only; /scale lands here too) and resume: reconcile at once."""
    try:
        outcome = await _reconcile_now(body, memo)
    except KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=_config(memo).error_delay_seconds) from exc
    if outcome.invalid is not None:
        raise kopf.PermanentError(str(outcome.invalid))
    if outcome.rejected is not None:  # retried by the resync daemon, not every error_delay_seconds
        raise kopf.PermanentError(f"ApplyRejected: {outcome.rejected}")


async def resync(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Re-reconcile every progress_seconds until settled, then every resync_seconds."""
    config = _config(memo)
    delay = config.progress_seconds
    while not await stopped.wait(delay):
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        try:
            outcome = await _reconcile_now(body, memo)
        except KubeError as exc:
            logger.warning("resync of %s failed: %s", body["metadata"]["name"], exc)
            delay = config.error_delay_seconds
            continue
        stop = outcome.settled or outcome.invalid or outcome.rejected
        delay = config.resync_seconds if stop else config.progress_seconds


async def delete_handler(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Delete the children before the finalizer goes (the emulator and some GitOps flows have no GC)."""
    try:
        await _reconcile_now(body, memo, cleanup)
    except KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=_config(memo).error_delay_seconds) from exc
    memo.locks.pop(body["metadata"]["uid"], None)


def register(registry: kopf.OperatorRegistry) -> None:
    """Register the handlers above with ``registry``.

    Importing this module registers them with kopf's default registry (what
    ``moeshard operator`` runs); tests call it on a fresh registry so that no
    other module's handlers run beside these.
    """
    kopf.on.startup(registry=registry)(configure)
    kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)(reconcile_handler)
    kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)(reconcile_handler)
    kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)(reconcile_handler)
    kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=1.0, cancellation_timeout=5.0,
                registry=registry)(resync)
    kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)(delete_handler)


register(kopf.get_default_registry())

__all__ = ["OperatorConfig", "register", "Outcome", "cleanup", "reconcile"]
