"""hf:// weights downloaded once per MoEDeployment: a Job fills a PVC the operator owns; WeightsReady gates the groups.

Objects of a MoEDeployment NAME whose ``spec.model.weights.uri`` is hf://ORG/REPO
(KEY = ``WeightsSource.cache_key()``, a hash of uri, revision and the cache fields):

    PersistentVolumeClaim  NAME-weights-KEY   the cache: storage class, size, access mode from spec.model.weights.cache
    Job                    NAME-weights-KEY   ``moeshard engine fetch`` (engine image) into the claim, backoffLimit 3

The engine pods mount the claim read-only (backends/moeshard_engine.py); no pod downloads.

Reconcile (``WeightsMixin.weights``), before any replica group object is created or rolled:
  1. pvc:// and file:// sources: WeightsReady=True (ProvidedVolume), nothing to create.
  2. hf://: create the claim and the Job when missing. Both are created once and never patched (a claim's spec
     and a Job's template are immutable); a Job left from a claim that had to be created again is deleted,
     so the next pass downloads into the new claim.
  3. read the Job's status: Pending or Downloading (its active/succeeded/failed pod counts and start time go to
     ``status.weights``) -> WeightsReady=False (Downloading), groups held; Succeeded -> WeightsReady=True
     (Downloaded); Failed (backoffLimit spent) -> WeightsReady=False (DownloadFailed), a Warning Event naming
     the Job, groups held and nothing deleted: groups of an earlier checkpoint keep serving. A failed Job whose
     template no longer matches the spec (a fixed tokenSecret, another image) is deleted and created again on
     the next pass; deleting the Job by hand retries as well.
  4. the caches of another KEY (an earlier uri, revision or cache) are deleted once no live replica group
     mounts their claim: the groups of the old checkpoint serve from it until they are rolled, and a new
     revision never overwrites the files a serving group reads.
Each change of the download's phase is an Event (and a retried pod a Warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moeshard.core import naming

from .api_weights import CACHE_ACCESS_MODES
from .backends import get_backend
from .deployment import Deployment
from .live import LiveChildren, annotation, group_ready
from .manifests import (
    COMPONENT_WEIGHTS, HASH_ANNOTATION, build_group, child_metadata, pod_security_context, with_hash,
)

DOWNLOAD_BACKOFF_LIMIT = 3  # pod failures the Job retries before it fails (a network blip, a node lost)
CACHE_HEADROOM = 1.1  # default claim size: the BF16 checkpoint plus 10%
GIB = 2**30
WEIGHTS_CONDITION = "WeightsReady"


# --------------------------------------------------------------------------- desired objects (pure)


def cache_name(d: Deployment) -> str:
    """Name of the claim and of the Job of the deployment's hf:// checkpoint."""
    return naming.weights_cache_name(d.name, d.spec.model.weights.cache_key())


def default_cache_size(d: Deployment) -> str:
    """The model's checkpoint bytes (its figures, BF16) plus CACHE_HEADROOM, in whole Gi."""
    model = d.plan.model
    return f"{max(1, math.ceil(model.total_params * model.weight_bytes * CACHE_HEADROOM / GIB))}Gi"


def build_weights_claim(d: Deployment) -> dict[str, Any]:
    """The PersistentVolumeClaim an hf:// checkpoint is downloaded into."""
    cache = d.spec.model.weights.cache
    spec: dict[str, Any] = {
        "accessModes": list(CACHE_ACCESS_MODES[cache.access_mode]),
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": cache.size or default_cache_size(d)}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return with_hash({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                      "metadata": child_metadata(d, cache_name(d), COMPONENT_WEIGHTS), "spec": spec})


def build_weights_job(d: Deployment) -> dict[str, Any]:
    """The Job downloading the hf:// checkpoint into its claim: the backend's fetch container, restricted pod.

    Its pods carry no deployment label: they are neither engine pods (the /scale selector) nor listed with them.
    """
    name = cache_name(d)
    labels = {naming.LABEL_NAME: "moeshard-weights", naming.LABEL_INSTANCE: d.name,
              naming.LABEL_MANAGED_BY: "moeshard-operator", naming.LABEL_COMPONENT: COMPONENT_WEIGHTS}
    return with_hash({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": child_metadata(d, name, COMPONENT_WEIGHTS),
        "spec": {
            "backoffLimit": DOWNLOAD_BACKOFF_LIMIT,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,  # the download never calls the API server
                    # fsGroup makes the fresh volume writable by the engine user; checked at its root only
                    "securityContext": pod_security_context() | {"fsGroupChangePolicy": "OnRootMismatch"},
                    "containers": [get_backend(d.spec.engine.backend).fetch_container(d)],
                    "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": name}},
                                {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    })


def build_weights_objects(d: Deployment) -> list[dict[str, Any]]:
    """The claim and the Job of an hf:// source, in creation order; [] for pvc:// and file://."""
    return [build_weights_claim(d), build_weights_job(d)] if d.spec.model.weights.downloaded else []


# --------------------------------------------------------------------------- reading a Job (pure)


@dataclass(frozen=True)
class DownloadProgress:
    """A download Job as status shows it. phase: Pending, Downloading, Succeeded or Failed."""

    phase: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    message: str = ""  # the Job's Failed condition: reason and message


def job_progress(job: dict[str, Any]) -> DownloadProgress:
    """Phase and pod counts of a download Job from its status (conditions Complete / Failed)."""
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    counts = dict(active=int(status.get("active") or 0), succeeded=int(status.get("succeeded") or 0),
                  failed=int(status.get("failed") or 0), start_time=status.get("startTime"),
                  completion_time=status.get("completionTime"))
    if "Complete" in true or counts["succeeded"] >= 1:
        return DownloadProgress("Succeeded", **counts)
    if "Failed" in true:
        cond = true["Failed"]
        message = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
        return DownloadProgress("Failed", **counts, message=message)
    return DownloadProgress("Downloading" if counts["active"] else "Pending", **counts)


def weights_status(d: Deployment, progress: DownloadProgress | None) -> dict[str, Any]:
    """``status.weights``: the source, and for hf:// the claim, the Job and its progress."""
    weights = d.spec.model.weights
    status: dict[str, Any] = {"source": weights.uri + (f"@{weights.revision}" if weights.revision else "")}
    if progress is None:
        return status | {"phase": "Provided"}
    status |= {"phase": progress.phase, "claim": cache_name(d), "job": cache_name(d), "active": progress.active,
               "succeeded": progress.succeeded, "failed": progress.failed}
    if progress.start_time:
        status["startTime"] = progress.start_time
    if progress.completion_time:
        status["completionTime"] = progress.completion_time
    return status


def _claims_of(group: dict[str, Any]) -> set[str]:
    """Claims a live replica group's pods mount (StatefulSet or LeaderWorkerSet)."""
    spec = group.get("spec") or {}
    template = spec.get("template") or (spec.get("leaderWorkerTemplate") or {}).get("workerTemplate") or {}
    volumes = (template.get("spec") or {}).get("volumes") or []
    return {v["persistentVolumeClaim"].get("claimName") for v in volumes if v.get("persistentVolumeClaim")}


# --------------------------------------------------------------------------- the reconcile step


@dataclass
class WeightsState:
    """What the weights step found: whether groups may start, the condition, status.weights, counts."""

    ready: bool
    condition: tuple[bool, str, str]  # WeightsReady: status, reason, message
    status: dict[str, Any]
    failed_message: str = ""  # DownloadFailed: the Job failed
    pending_message: str = ""  # the Job is still running


class WeightsMixin:
    """The weights step of the reconciler (handlers._Reconciler, whose children/apply/delete/event it uses)."""

    def weights(self, d: Deployment, live: LiveChildren) -> WeightsState:
        weights = d.spec.model.weights
        previous = (self.body.get("status") or {}).get("weights") or {}
        # 4. (first) caches of another key, or of an earlier hf:// source, once no group mounts them
        jobs, claims = self._owned_weights("Job"), self._owned_weights("PersistentVolumeClaim")
        self._delete_stale(d, live, jobs, claims)
        if not weights.downloaded:  # 1
            provided = f"{weights.uri} is mounted read-only; nothing to download"
            return WeightsState(True, (True, "ProvidedVolume", provided), weights_status(d, None))
        # 2. the claim and the Job, created once; a Job deleted here is created again on the next pass
        name = cache_name(d)
        desired_job = build_weights_job(d)
        job, deleted = jobs.get(name), False
        if name not in claims:
            self.apply(build_weights_claim(d), None)
            if job is not None:  # it downloaded into a claim that is gone: download again
                self.delete(job, "its cache volume was created again")
                job, deleted = None, True
        if job is None and not deleted:
            job = self.apply(desired_job, None)
        # 3. its progress
        progress = job_progress(job) if job is not None else DownloadProgress("Pending")
        if (job is not None and progress.phase == "Failed"
                and annotation(job, HASH_ANNOTATION) != annotation(desired_job, HASH_ANNOTATION)):
            self.delete(job, "its template changed since it failed: retrying the download")
            progress = DownloadProgress("Pending")
        status = weights_status(d, progress)
        self._progress_events(name, progress, previous, status)
        counts = (f"Job {name}: {progress.active} active, {progress.succeeded} succeeded, {progress.failed} failed"
                  + (f", started {progress.start_time}" if progress.start_time else ""))
        if progress.phase == "Succeeded":
            done = f"Job {name} downloaded {status['source']} into PersistentVolumeClaim {name}"
            return WeightsState(True, (True, "Downloaded", done), status)
        if progress.phase == "Failed":
            message = (f"Job {name} failed after {progress.failed} pod failure(s) ({progress.message or 'no reason'}); "
                       "replica groups wait. Fix the source or tokenSecret (a changed spec retries), or delete "
                       "the Job to retry")
            return WeightsState(False, (False, "DownloadFailed", message), status, failed_message=message)
        message = f"downloading {status['source']}: {counts}; replica groups start once it succeeds"
        return WeightsState(False, (False, "Downloading", message), status, pending_message=message)

    def held_counts(self, d: Deployment, live: LiveChildren, weights: WeightsState) -> dict[str, Any]:
        """Observation counts while the groups wait for the weights: nothing is created, rolled or recreated."""
        counts: dict[str, Any] = dict(missing=0, outdated=0, restarted=0, ready=0,
                                      failed_reason="DownloadFailed" if weights.failed_message else None,
                                      failed_message=weights.failed_message,
                                      group_restarts=self.restart_history(d.spec.engine.restart_budget.window))
        for group in d.groups():
            live_group = live.groups.get(naming.group_name(d.name, group.index))
            if live_group is None:
                counts["missing"] += 1
                continue
            counts["ready"] += group_ready(live_group, d.pods_per_replica)
            counts["outdated"] += annotation(live_group, HASH_ANNOTATION) != annotation(
                build_group(d, group), HASH_ANNOTATION)
        if weights.failed_message:
            counts["serving"] = len(live.groups)  # phase Degraded while groups of an earlier checkpoint serve
        return counts

    # ------------------------------------------------------------ helpers
    def _owned_weights(self, kind: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.children(kind)
                if ((o.get("metadata") or {}).get("labels") or {}).get(naming.LABEL_COMPONENT) == COMPONENT_WEIGHTS}

    def _delete_stale(self, d: Deployment, live: LiveChildren, jobs: dict[str, Any], claims: dict[str, Any]) -> None:
        current = cache_name(d) if d.spec.model.weights.downloaded else None
        mounted = set().union(*(_claims_of(g) for g in (*live.groups.values(), *live.other_kind_groups.values())))
        for name in sorted((set(jobs) | set(claims)) - {current} - mounted):
            for objs in (jobs, claims):
                if name in objs:
                    self.delete(objs.pop(name), "no replica group mounts this weights cache any more")

    def _progress_events(self, name: str, progress: DownloadProgress, previous: dict[str, Any],
                         status: dict[str, Any]) -> None:
        same_job = previous.get("job") == name
        if same_job and progress.failed > int(previous.get("failed") or 0) and progress.phase != "Failed":
            self.event("DownloadRetry", f"Job {name}: a download pod failed ({progress.failed} of "
                                        f"{DOWNLOAD_BACKOFF_LIMIT + 1} tries)", "Warning")
        if same_job and previous.get("phase") == progress.phase:
            return
        if progress.phase == "Downloading":
            self.event("DownloadingWeights", f"Job {name} is downloading {status['source']} into "
                                             f"PersistentVolumeClaim {name} ({progress.active} active pod)")
        elif progress.phase == "Succeeded":
            self.event("WeightsDownloaded", f"Job {name} downloaded {status['source']}; replica groups start")
        elif progress.phase == "Failed":
            self.event("DownloadFailed", f"Job {name} failed: {progress.message or 'backoffLimit exceeded'}",
                       "Warning")

