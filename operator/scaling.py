"""Scale events of a MoEDeployment's reconcile: drains on scale-in, the autoscaler object, groups past the progress deadline.

A mixin of the reconciler (handlers._Reconciler): its methods use the
reconciler's apply / delete / event / named and its ``now``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeshard.core import naming

from .api import parse_duration
from .autoscaling import KEDA_API_VERSION, build_autoscaler
from .deployment import Deployment
from .live import annotation, group_ready, parse_time, replica_of
from .manifests import KINDS, SERVING_LABEL, pod_index_label
from .scheduling_wait import Overdue, overdue_message, overdue_pods, waiting_pods

if TYPE_CHECKING:
    from .live import LiveChildren

DRAINING_ANNOTATION = "moeshard.io/draining-since"  # on a group a scale-in drains: when the drain began
PROGRESS_DEADLINE_REASON = "ProgressDeadlineExceeded"  # Progressing=False, as a Deployment says it
AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")


class ScalingMixin:
    """Scale-in drains, the HPA / ScaledObject, and the progress deadline of one reconcile."""

    def label_serving(self, d: Deployment, live: "LiveChildren") -> None:
        """Set ``moeshard.io/serving`` on rank 0 of every group: "true" below the desired count, else "false".

        Only with ``spec.autoscaling`` (whose front Service also selects
        ``moeshard.io/serving=true``), or while the live front Service still
        selects that label (a merge patch cannot drop a selector key, so after
        the section goes the labels keep it truthful). Runs before the front
        Service is applied, so a Service that starts selecting the label never
        finds no pod. Pods are labelled by the operator, not the pod template:
        adding the section rolls no group.
        """
        front = live.services.get(naming.service_name(self.name)) or {}
        if d.spec.autoscaling is None and SERVING_LABEL not in ((front.get("spec") or {}).get("selector") or {}):
            return
        rank0 = pod_index_label(d)
        for pod in live.pods:
            meta = pod.get("metadata") or {}
            r = replica_of(pod)
            if r is None or meta.get("deletionTimestamp") or (meta.get("labels") or {}).get(rank0) != "0":
                continue
            want = "true" if r < d.replicas else "false"
            if (meta.get("labels") or {}).get(SERVING_LABEL) != want:
                self.kube.patch("v1", "pods", self.namespace, meta["name"], {"metadata": {"labels": {SERVING_LABEL: want}}})

    def drain_groups(self, d: Deployment, live: "LiveChildren") -> set[int]:
        """With ``spec.autoscaling``, drain the groups a scale-in removes; returns the indices still draining.

        A group at index >= replicas goes in three steps:
          1. ``label_serving`` turned its rank-0 pod ``moeshard.io/serving=false``
             (the front Service stops sending it requests; running ones go on)
             and here its group object gets ``moeshard.io/draining-since``;
          2. it stays (with its headless Service and PDB) for
             ``spec.autoscaling.drainTimeout``, or less when no pod of it is
             ready (nothing to drain);
          3. it is deleted like any scaled-down group; the kubelet's SIGTERM
             then makes the engine finish what is still queued.
        A scale-out while a group drains takes it back (annotation removed,
        serving again). Without the section groups go at once, as before.
        """
        if d.spec.autoscaling is None:
            return set()
        timeout = parse_duration(d.spec.autoscaling.drain_timeout)
        draining: set[int] = set()
        for name, group in live.groups.items():
            r = replica_of(group)
            if r is None:
                continue
            since = annotation(group, DRAINING_ANNOTATION)
            route = KINDS[group["kind"]]
            if r < d.replicas:
                if since is not None:  # scaled out again while draining: it serves again
                    self.kube.patch(*route, self.namespace, name, {"metadata": {"annotations": {DRAINING_ANNOTATION: None}}})
                    self.event("DrainCancelled", f"replica group {r} serves again (scaled out while draining)")
                continue
            if since is None:
                self.kube.patch(*route, self.namespace, name, {"metadata": {"annotations": {DRAINING_ANNOTATION: self.now}}})
                self.event("DrainingGroup", f"replica group {r} out of the front Service; deleted after "
                                            f"{d.spec.autoscaling.drain_timeout} at most")
                draining.add(r)
                continue
            try:
                elapsed = (parse_time(self.now) - parse_time(since)).total_seconds()
            except ValueError:  # an annotation edited by hand: the drain ends now
                elapsed = timeout
            if elapsed < timeout and group_ready(group, d.pods_per_replica):
                draining.add(r)
        return draining

    def autoscaler(self, d: Deployment) -> None:
        """Apply the HPA or ScaledObject that spec.autoscaling asks for; delete any other one we own."""
        desired = build_autoscaler(d)
        if desired is not None and desired["kind"] == "ScaledObject" and not self.kube.has_api(KEDA_API_VERSION, "scaledobjects"):
            self.event("KEDAMissing", "spec.autoscaling.engine keda needs KEDA's ScaledObject CRD, which this "
                                      "cluster does not serve; no autoscaler built", "Warning")
            desired = None
        for kind in AUTOSCALER_KINDS:
            live = self.named(kind)
            keep = desired["metadata"]["name"] if desired is not None and desired["kind"] == kind else None
            for name, obj in live.items():
                if name != keep:
                    self.delete(obj, "spec.autoscaling changed")
            if keep is not None:
                self.apply(desired, live.get(keep))

    def overdue(self, d: Deployment, live: "LiveChildren") -> Overdue | None:
        """Groups whose pods wait for a node past ``spec.engine.progressDeadline``: the condition to report.

        The namespace's FailedScheduling Events are listed only when some pod
        is past the deadline, so a healthy reconcile makes no extra request.
        A Warning Event is posted when the deadline is first exceeded.
        """
        deadline_text = d.spec.engine.progress_deadline
        now = parse_time(self.now)
        late = overdue_pods(waiting_pods(live.pods), now, parse_duration(deadline_text))
        if not late:
            return None
        events = self.kube.list("v1", "events", self.namespace,
                                fields={"involvedObject.kind": "Pod", "reason": "FailedScheduling"})
        sizes = {r: d.pods_per_replica for r in range(d.replicas)}  # pods, whichever kind runs the group
        result = overdue_message(late, sizes, events, now, deadline_text, d.spec.engine.scheduling.kueue_queue)
        before = {c.get("type"): c for c in (self.body.get("status") or {}).get("conditions") or []}
        if (before.get("Progressing") or {}).get("reason") != PROGRESS_DEADLINE_REASON:
            self.event(PROGRESS_DEADLINE_REASON, result.message, "Warning")
        return result
