"""Reading the live objects of a MoEDeployment: times, replica indices, readiness, failures, its children."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from moeshard.core import naming


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def replica_of(obj: dict[str, Any]) -> int | None:
    raw = ((obj.get("metadata") or {}).get("labels") or {}).get(naming.LABEL_REPLICA)
    return int(raw) if raw is not None and raw.isdigit() else None


def group_ready(group: dict[str, Any], pods: int) -> bool:
    status = group.get("status") or {}
    if group.get("kind") == "LeaderWorkerSet":
        return status.get("readyReplicas", 0) >= 1
    return status.get("readyReplicas", 0) >= pods


def pod_failed_after_start(pod: dict[str, Any], group: dict[str, Any]) -> bool:
    """A pod of the live ``group`` whose engine died after starting: phase Failed, or a container restarted.

    Pods of an earlier incarnation of the group (owned by a deleted StatefulSet,
    or already terminating) linger for their grace period after a recreation;
    they must not count, or one failure would use up the whole restart budget.
    """
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    group_uid = (group.get("metadata") or {}).get("uid")
    owners = (pod.get("metadata") or {}).get("ownerReferences") or []
    if group_uid and owners and not any(o.get("uid") == group_uid for o in owners):
        return False
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return True
    return any((c.get("restartCount") or 0) > 0 for c in status.get("containerStatuses") or [])


def group_pods(group: dict[str, Any]) -> int:
    """Pods a live group needs ready (a StatefulSet's replicas; a LeaderWorkerSet counts groups)."""
    return int((group.get("spec") or {}).get("replicas") or 1)


@dataclass
class LiveChildren:
    """The live children of one MoEDeployment, by name (pods as a list)."""

    config_maps: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    pdbs: dict[str, dict[str, Any]]
    domains: dict[str, dict[str, Any]]
    policies: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    other_kind_groups: dict[str, dict[str, Any]]
    pods: list[dict[str, Any]]


def annotation(obj: dict[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


