"""hf:// weights downloaded once per MoEDeployment (operator/weights.py), against the kube emulator.

The emulator has no Job controller: these tests play it by patching the download Job's status
(active pods, then the Complete or Failed condition), as the real controller would after running
``moeshard engine fetch``. Nothing is downloaded here; tests/test_engine/test_fetch.py tests the command.
"""

from __future__ import annotations

from typing import Any

from moeshard.operator.handlers import reconcile
from support.kube_emulator import wait_for

NS = "test"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"
STS, JOBS, PVCS, EVENTS = "apps/v1/statefulsets", "batch/v1/jobs", "v1/persistentvolumeclaims", "v1/events"
HF = {"uri": "hf://Qwen/tiny-moe", "revision": "v1", "tokenSecret": "hf-token"}


def _hf(example, **weights: Any) -> dict[str, Any]:
    return example("tiny-cpu", **{"spec.model.weights": HF | weights})


def _live(custom) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")


def _condition(custom, kind: str = "WeightsReady") -> dict[str, Any]:
    return next(c for c in _live(custom)["status"]["conditions"] if c["type"] == kind)


def _job_status(kube, name: str, status: dict[str, Any]) -> None:
    """Play the Job controller: write the download Job's status."""
    kube.patch("batch/v1", "jobs", NS, name, {"status": status}, subresource="status")


def _succeeded(kube, name: str) -> None:
    _job_status(kube, name, {"active": 0, "succeeded": 1, "startTime": "2026-01-01T00:00:00Z",
                             "completionTime": "2026-01-01T00:20:00Z",
                             "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                            {"type": "Complete", "status": "True"}]})


def _claims(sts: dict[str, Any]) -> list[dict[str, Any]]:
    return [v["persistentVolumeClaim"] for v in sts["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v]


def test_hf_source_is_downloaded_once_before_any_group_starts(kube, custom, emulator, example, check_moed,
                                                              check_builtin):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_hf(example)))
    outcome = reconcile(kube, _live(custom))
    (name,) = emulator.objects(JOBS, NS)
    assert list(emulator.objects(PVCS, NS)) == [name] and name.startswith("tiny-weights-")
    assert emulator.objects(STS, NS) == {}  # no group before the weights are there
    for obj in (*emulator.objects(JOBS, NS).values(), *emulator.objects(PVCS, NS).values()):
        check_builtin(obj)
    assert ("Normal", "Created", f"created Job {name}") in outcome.events
    weights = _condition(custom)
    assert (weights["status"], weights["reason"]) == ("False", "Downloading")
    assert _live(custom)["status"]["weights"]["phase"] == "Pending"

    # the Job's pod runs: its progress shows in status and as an Event; groups still wait
    _job_status(kube, name, {"active": 1, "startTime": "2026-01-01T00:00:00Z"})
    outcome = reconcile(kube, _live(custom))
    status = _live(custom)["status"]
    assert status["weights"] == {"source": "hf://Qwen/tiny-moe@v1", "phase": "Downloading", "claim": name,
                                 "job": name, "active": 1, "succeeded": 0, "failed": 0,
                                 "startTime": "2026-01-01T00:00:00Z"}
    assert "1 active" in _condition(custom)["message"]
    assert _condition(custom, "Progressing")["reason"] == "DownloadingWeights"
    assert status["phase"] == "Progressing"
    assert "DownloadingWeights" in {reason for _, reason, _ in outcome.events}
    assert emulator.objects(STS, NS) == {}

    # a pod failed and the Job retries it: a Warning, still waiting
    _job_status(kube, name, {"active": 1, "failed": 1})
    outcome = reconcile(kube, _live(custom))
    assert [r for t, r, _ in outcome.events if t == "Warning"] == ["DownloadRetry"]

    # done: the groups appear, mounting the claim read-only, with no download of their own
    _succeeded(kube, name)
    outcome = reconcile(kube, _live(custom))
    assert "WeightsDownloaded" in {reason for _, reason, _ in outcome.events}
    (sts,) = emulator.objects(STS, NS).values()
    assert _claims(sts) == [{"claimName": name, "readOnly": True}]
    assert "initContainers" not in sts["spec"]["template"]["spec"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in (
        sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"])
    weights = _condition(custom)
    assert (weights["status"], weights["reason"]) == ("True", "Downloaded")
    assert _live(custom)["status"]["weights"]["completionTime"] == "2026-01-01T00:20:00Z"
    assert list(emulator.objects(JOBS, NS)) == [name]  # one download, whatever the number of groups

    # settled: nothing more to write (status.weights included)
    reconcile(kube, _live(custom))
    writes = kube.writes
    outcome = reconcile(kube, _live(custom))
    assert kube.writes == writes and outcome.events == []


def test_a_failed_download_loses_nothing_and_a_new_revision_never_overwrites_the_served_cache(
        kube, custom, emulator, example, check_moed):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_hf(example)))
    reconcile(kube, _live(custom))
    (old,) = emulator.objects(JOBS, NS)
    _succeeded(kube, old)
    reconcile(kube, _live(custom))
    (group_uid,) = [s["metadata"]["uid"] for s in emulator.objects(STS, NS).values()]

    # a new revision: a new Job into a new claim; the serving group keeps the old claim
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                          {"spec": {"model": {"weights": {"revision": "v2"}}}})
    reconcile(kube, _live(custom))
    (new,) = set(emulator.objects(JOBS, NS)) - {old}
    assert set(emulator.objects(PVCS, NS)) == {old, new}
    (sts,) = emulator.objects(STS, NS).values()
    assert sts["metadata"]["uid"] == group_uid and _claims(sts)[0]["claimName"] == old

    # the new download fails: WeightsReady=False DownloadFailed, a Warning naming the Job, nothing deleted
    _job_status(kube, new, {"active": 0, "failed": 4, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]})
    outcome = reconcile(kube, _live(custom))
    weights = _condition(custom)
    assert (weights["status"], weights["reason"]) == ("False", "DownloadFailed")
    assert new in weights["message"] and "BackoffLimitExceeded" in weights["message"]
    assert [(t, r) for t, r, m in outcome.events if new in m] == [("Warning", "DownloadFailed")]
    assert _live(custom)["status"]["phase"] == "Degraded"  # the old group is still there
    assert set(emulator.objects(JOBS, NS)) == {old, new} and set(emulator.objects(PVCS, NS)) == {old, new}
    assert [s["metadata"]["uid"] for s in emulator.objects(STS, NS).values()] == [group_uid]
    reconcile(kube, _live(custom))
    assert set(emulator.objects(JOBS, NS)) == {old, new}  # a failed Job is kept (its status is the record)

    # a fixed tokenSecret changes the Job's template: the failed Job is replaced, same cache
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                          {"spec": {"model": {"weights": {"tokenSecret": "hf-token-2"}}}})
    reconcile(kube, _live(custom))
    assert new not in emulator.objects(JOBS, NS)
    reconcile(kube, _live(custom))
    assert new in emulator.objects(JOBS, NS) and emulator.objects(JOBS, NS)[new].get("status", {}) == {}

    # it succeeds: the group rolls onto the new claim, then the old cache goes
    _succeeded(kube, new)
    reconcile(kube, _live(custom))
    (sts,) = emulator.objects(STS, NS).values()
    assert sts["metadata"]["uid"] != group_uid and _claims(sts)[0]["claimName"] == new
    reconcile(kube, _live(custom))
    assert set(emulator.objects(JOBS, NS)) == {new} and set(emulator.objects(PVCS, NS)) == {new}


def test_a_provided_volume_is_ready_at_once(kube, custom, emulator, example, check_moed):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(example("tiny-cpu")))
    reconcile(kube, _live(custom))
    weights = _condition(custom)
    assert (weights["status"], weights["reason"]) == ("True", "ProvidedVolume")
    assert _live(custom)["status"]["weights"] == {"source": "pvc://tiny-models/qwen3-moe", "phase": "Provided"}
    assert emulator.objects(JOBS, NS) == {} and emulator.objects(PVCS, NS) == {}
    (sts,) = emulator.objects(STS, NS).values()
    assert _claims(sts) == [{"claimName": "tiny-models", "readOnly": True}]


def test_switching_to_a_provided_volume_rolls_the_group_then_deletes_the_cache(kube, custom, emulator, example,
                                                                              check_moed):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_hf(example)))
    reconcile(kube, _live(custom))
    (name,) = emulator.objects(JOBS, NS)
    _succeeded(kube, name)
    reconcile(kube, _live(custom))
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"model": {"weights": {
        "uri": "pvc://tiny-models/qwen3-moe", "revision": None, "tokenSecret": None}}}})
    reconcile(kube, _live(custom))  # WeightsReady at once: the group rolls onto the provided claim
    (sts,) = emulator.objects(STS, NS).values()
    assert _claims(sts) == [{"claimName": "tiny-models", "readOnly": True}]
    assert list(emulator.objects(PVCS, NS)) == [name]  # the rolled group's pods may still hold it
    reconcile(kube, _live(custom))
    assert emulator.objects(JOBS, NS) == {} and emulator.objects(PVCS, NS) == {}
    assert _live(custom)["status"]["weights"] == {"source": "pvc://tiny-models/qwen3-moe", "phase": "Provided"}


def test_a_claim_created_again_is_downloaded_into_again(kube, custom, emulator, example, check_moed):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_hf(example)))
    reconcile(kube, _live(custom))
    (name,) = emulator.objects(JOBS, NS)
    _succeeded(kube, name)
    kube.delete("v1", "persistentvolumeclaims", NS, name)  # e.g. by hand, once no pod used it
    reconcile(kube, _live(custom))
    assert list(emulator.objects(PVCS, NS)) == [name] and emulator.objects(JOBS, NS) == {}
    assert _condition(custom)["reason"] == "Downloading"
    reconcile(kube, _live(custom))
    assert emulator.objects(JOBS, NS)[name].get("status", {}) == {}  # a fresh download into the new claim


def test_cache_names_fit_a_label_value_for_the_longest_deployment_name(example):
    from moeshard.operator.api import MAX_NAME_LENGTH
    from moeshard.operator.commands.render import render_objects

    body = _hf(example, revision="a" * 255)
    body["metadata"]["name"] = "n" * MAX_NAME_LENGTH
    names = {o["metadata"]["name"] for o in render_objects(body) if o["kind"] in ("Job", "PersistentVolumeClaim")}
    (name,) = names
    assert len(name) <= 63  # the Job controller puts the Job's name in a label of its pods


def test_the_operator_downloads_serves_then_deletes_the_cache_with_the_deployment(
        start_operator, kube, custom, emulator, example, check_moed):
    """The real kopf operator (its API calls are the ones the chart's RBAC must allow)."""
    start_operator()
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_hf(example)))
    (name,) = wait_for(lambda: list(emulator.objects(JOBS, NS)), what="the download Job")
    assert emulator.objects(STS, NS) == {}
    _succeeded(kube, name)
    wait_for(lambda: emulator.objects(STS, NS), what="the group after the download")
    wait_for(lambda: "WeightsDownloaded" in {e.get("reason") for e in emulator.objects(EVENTS, NS).values()},
             what="the WeightsDownloaded Event")
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")
    wait_for(lambda: not emulator.objects(JOBS, NS) and not emulator.objects(PVCS, NS), what="the cache deleted")
