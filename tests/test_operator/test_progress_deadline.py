"""Gang admission: a group whose pods wait for a node past spec.engine.progressDeadline says why.

The reconcile runs on the kube emulator. Nothing schedules pods there, so the
tests write what kube-scheduler would: the pod's ``PodScheduled=False``
condition and its ``FailedScheduling`` Event (with a message that differs from
the condition's, so the test sees which one the operator read), or, for a pod
that Kueue holds, the ``kueue.x-k8s.io/admission`` scheduling gate.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from moeshard.operator.handlers import reconcile
from moeshard.operator.live import parse_time
from moeshard.operator.scheduling_wait import (
    KUEUE_ADMISSION_GATE, WaitingPod, overdue_message, overdue_pods, scheduler_said, waiting_pods,
)

from .test_gitops_health import HEALTH_LUA, ArgoHealth, kstatus_assess

GROUP, VERSION, PLURAL, NS = "moeshard.io", "v1alpha1", "moedeployments", "test"
T0 = "2026-12-01T00:00:00Z"
GPU_SHORT = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu. preemption: 0/12 nodes are available."


def _get(custom, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _pod(name: str, replica: int, owner: dict[str, Any], reason: str | None, gates: tuple[str, ...] = ()) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": NS,
        "labels": {"moeshard.io/deployment": owner["metadata"]["name"].rsplit("-r", 1)[0],
                   "moeshard.io/replica": str(replica), "app.kubernetes.io/name": "moeshard-engine"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": owner["metadata"]["name"],
                             "uid": owner["metadata"]["uid"], "controller": True}]},
        "spec": {"containers": [{"name": "engine", "image": "x"}],
                 "schedulingGates": [{"name": g} for g in gates]}}
    return pod


def _unscheduled(kube, pod: dict[str, Any], reason: str, message: str) -> None:
    kube.create(pod)
    kube.patch("v1", "pods", NS, pod["metadata"]["name"], {"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": reason, "lastTransitionTime": T0,
        "message": message}]}}, subresource="status")


def _failed_scheduling(kube, pod: str, count: int, message: str, when: str = T0) -> None:
    kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{pod}.{count}", "namespace": NS},
                 "involvedObject": {"kind": "Pod", "name": pod, "namespace": NS}, "reason": "FailedScheduling",
                 "type": "Warning", "message": message, "count": count, "lastTimestamp": when})


def _conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in body["status"]["conditions"]}


def test_a_gang_member_no_node_takes_names_the_group_and_the_schedulers_reason(kube, custom, emulator, example,
                                                                               check_moed):
    body = example("qwen3-235b-gb200", **{"metadata.name": "nvl", "spec.parallelism.replicas": 1,
                                          "spec.engine.progressDeadline": "2m",
                                          "spec.model.weights": {"uri": "pvc://models/qwen3"}})  # no download
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(body))
    reconcile(kube, _get(custom, "nvl"), now=T0)
    sts = kube.get("apps/v1", "statefulsets", NS, "nvl-r0")
    assert sts["spec"]["replicas"] == 4  # an NVL72 group: 4 pods of 4 GPUs, all needed to serve
    for i in range(3):  # three pods run; the fourth finds no node
        kube.create(_pod(f"nvl-r0-{i}", 0, sts, None))
    _unscheduled(kube, _pod("nvl-r0-3", 0, sts, "Unschedulable"), "Unschedulable", "condition text")
    _failed_scheduling(kube, "nvl-r0-3", 7, GPU_SHORT)
    _failed_scheduling(kube, "other-pod", 1, "not ours")

    outcome = reconcile(kube, _get(custom, "nvl"), now="2026-12-01T00:01:00Z")
    within = _get(custom, "nvl")
    assert _conditions(within)["Progressing"]["status"] == "True"  # inside the deadline: still starting
    assert kstatus_assess(within) == "InProgress"
    assert not [e for e in outcome.events if e[1] == "ProgressDeadlineExceeded"]

    outcome = reconcile(kube, within, now="2026-12-01T00:02:30Z")
    late = _get(custom, "nvl")
    conditions = _conditions(late)
    progressing, stalled = conditions["Progressing"], conditions["Stalled"]
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert (stalled["status"], stalled["reason"]) == ("True", "Unschedulable")
    message = progressing["message"]
    assert message.startswith("past spec.engine.progressDeadline (2m): group 0 (1/4 pods not scheduled): "
                              "pod nvl-r0-3 unschedulable for 150 s: FailedScheduling (x7): 0/12 nodes")
    assert "Insufficient nvidia.com/gpu" in message and "condition text" not in message and "not ours" not in message
    assert late["status"]["phase"] == "Progressing"  # nothing is deleted or failed: a node may still come
    assert kstatus_assess(late) == "Failed" and ArgoHealth(HEALTH_LUA.read_text())(late)[0] == "Degraded"
    warnings = [e for e in outcome.events if e[1] == "ProgressDeadlineExceeded"]
    assert len(warnings) == 1 and warnings[0][0] == "Warning" and "nvl-r0-3" in warnings[0][2]
    assert kube.get("apps/v1", "statefulsets", NS, "nvl-r0") is not None

    again = reconcile(kube, late, now="2026-12-01T00:03:00Z")  # still late: the condition stays, no second Event
    assert not [e for e in again.events if e[1] == "ProgressDeadlineExceeded"]
    assert _conditions(_get(custom, "nvl"))["Progressing"]["reason"] == "ProgressDeadlineExceeded"

    # the node comes: the pod is scheduled and the deadline condition goes
    kube.patch("v1", "pods", NS, "nvl-r0-3", {"status": {"phase": "Running", "conditions": [{
        "type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T00:03:10Z"}]}},
        subresource="status")
    reconcile(kube, _get(custom, "nvl"), now="2026-12-01T00:03:20Z")
    conditions = _conditions(_get(custom, "nvl"))
    assert (conditions["Progressing"]["status"], conditions["Stalled"]["status"]) == ("True", "False")


def test_a_group_kueue_has_not_admitted_names_the_gate_and_the_queue(kube, custom, emulator, example, check_moed):
    body = example("tiny-cpu", **{"metadata.name": "queued", "spec.engine.progressDeadline": "5m",
                                  "spec.engine.scheduling.kueueQueue": "gpu-queue"})
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(body))
    reconcile(kube, _get(custom, "queued"), now=T0)
    sts = kube.get("apps/v1", "statefulsets", NS, "queued-r0")
    assert sts["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    _unscheduled(kube, _pod("queued-r0-0", 0, sts, "SchedulingGated", (KUEUE_ADMISSION_GATE,)), "SchedulingGated",
                 "Scheduling is blocked due to non-empty scheduling gates")
    reconcile(kube, _get(custom, "queued"), now="2026-12-01T00:06:00Z")
    conditions = _conditions(_get(custom, "queued"))
    assert (conditions["Stalled"]["status"], conditions["Stalled"]["reason"]) == ("True", "SchedulingGated")
    message = conditions["Progressing"]["message"]
    assert "pod queued-r0-0 waiting for admission for 360 s" in message
    assert KUEUE_ADMISSION_GATE in message and "LocalQueue gpu-queue" in message


# ----------------------------------------------------------------------------- the pure parts


def _waiting(name: str, replica: int | None, since: str, reason: str = "Unschedulable",
             gates: tuple[str, ...] = ()) -> WaitingPod:
    return WaitingPod(name, replica, reason, parse_time(since), "cond", gates)


def test_waiting_pods_reads_only_waiting_reasons_with_a_time():
    def pod(name: str, **cond: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": {"moeshard.io/replica": "1"}},
                "status": {"conditions": [{"type": "PodScheduled", "status": "False", **cond}]}}
    pods = [pod("a", reason="Unschedulable", lastTransitionTime=T0),
            pod("b", reason="SchedulingGated", lastTransitionTime=T0),
            pod("c", reason="Unschedulable"),  # no time: cannot be judged
            pod("d", reason="SomethingElse", lastTransitionTime=T0),
            {"metadata": {"name": "e", "deletionTimestamp": T0}, "status": {"conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": T0}]}}]
    assert [(w.name, w.replica, w.reason) for w in waiting_pods(pods)] == [
        ("a", 1, "Unschedulable"), ("b", 1, "SchedulingGated")]


@pytest.mark.parametrize("waited_s, late", [(119, False), (120, True), (3600, True)])
def test_the_deadline_is_inclusive(waited_s: int, late: bool):
    now = parse_time(T0) + dt.timedelta(seconds=waited_s)
    assert bool(overdue_pods([_waiting("p", 0, T0)], now, 120.0)) is late


def test_scheduler_said_takes_the_newest_event_and_sums_repeats():
    events = [{"involvedObject": {"kind": "Pod", "name": "p"}, "reason": "FailedScheduling", "count": 3,
               "message": "old", "lastTimestamp": "2026-12-01T00:00:00Z"},
              {"involvedObject": {"kind": "Pod", "name": "p"}, "reason": "FailedScheduling", "count": 2,
               "message": "new", "lastTimestamp": "2026-12-01T00:05:00Z"},
              {"involvedObject": {"kind": "Pod", "name": "p"}, "reason": "Scheduled", "message": "x"}]
    assert scheduler_said(events, "p") == "FailedScheduling (x5): new"
    assert scheduler_said(events, "q") == ""


def test_overdue_message_names_each_group_once_and_falls_back_to_the_condition():
    now = parse_time("2026-12-01T00:10:00Z")
    late = [_waiting("g1-a", 1, "2026-12-01T00:00:00Z"), _waiting("g1-b", 1, "2026-12-01T00:01:00Z"),
            _waiting("g2-a", 2, "2026-12-01T00:02:00Z", "SchedulingGated", ("example.com/gate",))]
    result = overdue_message(late, {1: 4, 2: 4}, [], now, "5m")
    assert result.reason == "Unschedulable"  # not every late pod is gated
    assert result.message == (
        "past spec.engine.progressDeadline (5m): group 1 (2/4 pods not scheduled): pod g1-a unschedulable for "
        "600 s: cond; group 2 (1/4 pods not scheduled): pod g2-a waiting for admission for 480 s: held by "
        "scheduling gate example.com/gate")


def test_the_kueue_example_is_valid_and_consistent_with_its_kueue_objects(check_moed):
    import pathlib

    import yaml

    from moeshard.operator.commands.render import render_objects
    from moeshard.operator.manifests import KUEUE_QUEUE_LABEL

    folder = pathlib.Path(__file__).resolve().parents[2] / "examples" / "kueue"
    body = check_moed(yaml.safe_load((folder / "qwen3-235b-gb200-kueue.yaml").read_text()))
    setup = {o["kind"]: o for o in yaml.safe_load_all((folder / "kueue-setup.yaml").read_text())}
    assert set(setup) == {"Topology", "ResourceFlavor", "ClusterQueue", "LocalQueue"}
    scheduling = body["spec"]["engine"]["scheduling"]
    queue = setup["LocalQueue"]
    assert (queue["metadata"]["name"], queue["metadata"]["namespace"]) == (
        scheduling["kueueQueue"], body["metadata"]["namespace"])
    assert queue["spec"]["clusterQueue"] == setup["ClusterQueue"]["metadata"]["name"]
    flavors = [f["name"] for g in setup["ClusterQueue"]["spec"]["resourceGroups"] for f in g["flavors"]]
    assert flavors == [setup["ResourceFlavor"]["metadata"]["name"]]
    assert setup["ResourceFlavor"]["spec"]["topologyName"] == setup["Topology"]["metadata"]["name"]
    levels = [level["nodeLabel"] for level in setup["Topology"]["spec"]["levels"]]
    required = scheduling["topologyAnnotations"]["kueue.x-k8s.io/podset-required-topology"]
    assert required in levels

    groups = [o for o in render_objects(body) if o["kind"] == "StatefulSet"]
    assert len(groups) == body["spec"]["parallelism"]["replicas"]
    gpus_per_group = 0
    for sts in groups:  # one Kueue workload per group: the queue label on the StatefulSet, TAS on its pods
        assert sts["metadata"]["labels"][KUEUE_QUEUE_LABEL] == scheduling["kueueQueue"]
        assert sts["spec"]["template"]["metadata"]["annotations"][
            "kueue.x-k8s.io/podset-required-topology"] == required
        gpus_per_group = sts["spec"]["replicas"] * int(
            sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    quota = {r["name"]: r["nominalQuota"] for g in setup["ClusterQueue"]["spec"]["resourceGroups"]
             for f in g["flavors"] for r in f["resources"]}
    assert int(quota["nvidia.com/gpu"]) >= gpus_per_group * len(groups)  # the example's groups fit its quota
