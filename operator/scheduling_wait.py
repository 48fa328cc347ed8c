"""Replica groups that cannot start: pods waiting for a node past ``spec.engine.progressDeadline``, and why.

A group serves only when every one of its pods runs (a gang: an NVL72 group
of 4-GPU pods, or the ranks of any multi-pod group); one pod that no node
takes holds the whole group in ``Progressing``. Past the deadline the
reconciler reports the group with the reason the scheduler gave:

* the pod's newest ``FailedScheduling`` event (``0/12 nodes are available:
  12 Insufficient nvidia.com/gpu``), with how many times it was repeated;
* else the message of the pod's ``PodScheduled=False`` condition;
* for a pod held by a scheduling gate, the gate: ``kueue.x-k8s.io/admission``
  means Kueue has not admitted the group's workload (quota, or no topology
  domain that fits the whole group under Topology Aware Scheduling).

Pure functions over pod and Event dicts; the reconciler lists the Events only
when some pod is already past the deadline.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .live import parse_time, replica_of

KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
WAITING_REASONS = ("Unschedulable", "SchedulingGated")
MESSAGE_CHARS = 300  # of the scheduler's text, per pod: conditions stay readable in `kubectl describe`


@dataclass(frozen=True)
class WaitingPod:
    """A pod the scheduler has not placed: ``reason`` Unschedulable or SchedulingGated."""

    name: str
    replica: int | None
    reason: str
    since: dt.datetime
    condition_message: str
    gates: tuple[str, ...]


@dataclass(frozen=True)
class Overdue:
    """What the conditions say about groups past the deadline: ``reason`` for Stalled, and the message."""

    reason: str
    message: str


def waiting_pods(pods: list[dict[str, Any]]) -> list[WaitingPod]:
    """The pods (not being deleted) whose ``PodScheduled`` condition is False for a waiting reason."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") != "PodScheduled" or cond.get("status") != "False":
                continue
            if cond.get("reason") not in WAITING_REASONS:
                continue
            try:
                since = parse_time(cond.get("lastTransitionTime") or "")
            except ValueError:  # no or odd timestamp: the deadline cannot be judged, so it is not
                continue
            gates = tuple(g.get("name", "") for g in (pod.get("spec") or {}).get("schedulingGates") or [])
            out.append(WaitingPod(meta.get("name", "?"), replica_of(pod), cond["reason"], since,
                                  (cond.get("message") or "").strip(), gates))
    return out


def overdue_pods(waiting: list[WaitingPod], now: dt.datetime, deadline_s: float) -> list[WaitingPod]:
    """The waiting pods that have waited ``deadline_s`` or longer, longest first."""
    late = [w for w in waiting if (now - w.since).total_seconds() >= deadline_s]
    return sorted(late, key=lambda w: (w.since, w.name))


def _event_time(event: dict[str, Any]) -> str:
    return (event.get("lastTimestamp") or event.get("eventTime") or
            (event.get("metadata") or {}).get("creationTimestamp") or "")


def scheduler_said(events: list[dict[str, Any]], pod: str) -> str:
    """The newest FailedScheduling event about ``pod`` as 'FailedScheduling (xN): message', or ''."""
    mine = [e for e in events
            if (e.get("involvedObject") or {}).get("kind") == "Pod"
            and (e.get("involvedObject") or {}).get("name") == pod
            and e.get("reason") == "FailedScheduling"]
    if not mine:
        return ""
    newest = max(mine, key=_event_time)
    count = sum(int(e.get("count") or 1) for e in mine)
    repeated = f" (x{count})" if count > 1 else ""
    return f"FailedScheduling{repeated}: {(newest.get('message') or '').strip()[:MESSAGE_CHARS]}"


def _why(pod: WaitingPod, events: list[dict[str, Any]], queue: str | None) -> str:
    if pod.reason == "SchedulingGated":
        if KUEUE_ADMISSION_GATE in pod.gates:
            where = f"LocalQueue {queue}" if queue else "its LocalQueue"
            return (f"held by scheduling gate {KUEUE_ADMISSION_GATE}: Kueue has not admitted the group's "
                    f"workload in {where} (quota, or no topology domain fits the whole group; "
                    f"`kubectl get workloads` shows why)")
        gates = ", ".join(pod.gates) or "a scheduling gate"
        return f"held by scheduling gate {gates}"
    said = scheduler_said(events, pod.name)
    return said or pod.condition_message[:MESSAGE_CHARS] or "no node fits the pod"


def overdue_message(late: list[WaitingPod], pods_per_group: dict[int, int], events: list[dict[str, Any]],
                    now: dt.datetime, deadline_text: str, queue: str | None = None) -> Overdue:
    """One condition message for the groups that ``late`` pods hold, naming each group's longest-waiting pod.

    ``pods_per_group`` maps a replica index to the pods its group needs, so
    the message says how much of the gang is waiting.
    """
    by_group: dict[int | None, list[WaitingPod]] = {}
    for pod in late:
        by_group.setdefault(pod.replica, []).append(pod)
    parts = []
    for replica, group in sorted(by_group.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        first = group[0]
        waited = int((now - first.since).total_seconds())
        verb = "waiting for admission" if first.reason == "SchedulingGated" else "unschedulable"
        size = pods_per_group.get(replica) if replica is not None else None
        share = f"{len(group)}/{size} pods" if size else f"{len(group)} pod(s)"
        label = f"group {replica}" if replica is not None else "a group"
        parts.append(f"{label} ({share} not scheduled): pod {first.name} {verb} for {waited} s: "
                     f"{_why(first, events, queue)}")
    gated_only = all(p.reason == "SchedulingGated" for p in late)
    return Overdue("SchedulingGated" if gated_only else "Unschedulable",
                   f"past spec.engine.progressDeadline ({deadline_text}): " + "; ".join(parts))
