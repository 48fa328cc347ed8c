"""The real kopf operator against the kube emulator over HTTP, driven by the official client.

The operator runs in a background thread (kopf.operator with fast settings:
re-reconcile every 0.2 s while progressing); a small thread in the test plays
the StatefulSet controller by marking every group's pods ready.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kmock

from support.kube_emulator import stale_list_reaction, wait_for

GROUP, VERSION, PLURAL, NS = "moeshard.io", "v1alpha1", "moedeployments", "test"
STS, SVC, PDB, CM, EVENTS = ("apps/v1/statefulsets", "v1/services", "policy/v1/poddisruptionbudgets",
                             "v1/configmaps", "v1/events")


class ReadyController:
    """Plays the StatefulSet controller: marks every StatefulSet's pods ready, every 50 ms."""

    def __init__(self, kube, emulator):
        self.kube, self.emulator = kube, emulator
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for name, sts in self.emulator.objects(STS, NS).items():
                want = sts["spec"]["replicas"]
                if (sts.get("status") or {}).get("readyReplicas") != want:
                    try:
                        self.kube.patch("apps/v1", "statefulsets", NS, name,
                                        {"status": {"replicas": want, "readyReplicas": want}}, subresource="status")
                    except Exception:  # deleted meanwhile
                        pass

    def __enter__(self) -> "ReadyController":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


def _status(custom, name: str = "tiny") -> dict[str, Any]:
    try:
        return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name).get("status") or {}
    except Exception:
        return {}


def _ready(custom, name: str = "tiny"):
    def check():
        status = _status(custom, name)
        body = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        return status.get("phase") == "Ready" and status.get("observedGeneration") == body["metadata"]["generation"]
    return check


def _event_reasons(emulator, name: str) -> set[str]:
    return {e.get("reason") for e in emulator.objects(EVENTS, NS).values()
            if (e.get("involvedObject") or {}).get("name") == name}


def test_lifecycle_create_update_ep_scale_conflict_delete(start_operator, custom, kube, emulator, example,
                                                          check_moed, check_builtin):
    start_operator()
    with ReadyController(kube, emulator):
        # create
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                               check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 2})))
        wait_for(_ready(custom), what="Ready after create")
        assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1"]
        status = _status(custom)
        assert status["readyReplicas"] == 2 and status["plan"]["expertEP"] == 4
        assert {"Planned", "Available", "Progressing", "Degraded"} <= {c["type"] for c in status["conditions"]}
        wait_for(lambda: "Created" in _event_reasons(emulator, "tiny"), what="Created events")
        for resource in (STS, SVC, PDB, CM):
            for obj in emulator.objects(resource, NS).values():
                check_builtin(obj)

        # update of EP: every group replaced, capacity kept by the rolling rule (tested in test_reconcile)
        old = {n: s["metadata"]["uid"] for n, s in emulator.objects(STS, NS).items()}
        patch = {"spec": {"parallelism": {"expertEP": 2, "attentionTP": 1}}}
        check_moed(example("tiny-cpu", **{"spec.parallelism.expertEP": 2, "spec.parallelism.attentionTP": 1}))
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", patch)
        wait_for(lambda: _status(custom).get("plan", {}).get("expertEP") == 2 and _ready(custom)(),
                 what="Ready with EP 2")
        groups = emulator.objects(STS, NS)
        assert all(groups[n]["metadata"]["uid"] != old[n] for n in old)
        assert "RolledGroup" in _event_reasons(emulator, "tiny")

        # scale up and down through /scale
        custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"replicas": 3}})
        wait_for(lambda: _status(custom).get("readyReplicas") == 3 and _ready(custom)(), what="3 replicas")
        assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1", "tiny-r2"]
        custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"replicas": 1}})
        wait_for(lambda: sorted(emulator.objects(STS, NS)) == ["tiny-r0"] and _ready(custom)(), what="1 replica")
        assert sorted(emulator.objects(PDB, NS)) == ["tiny-r0"]

        # a 409 on the ConfigMap (stale list from a lagging cache) is retried
        stale_once = _stale_config_map_list(emulator, decode_batch=9)
        emulator.call(lambda em: em["list", kmock.resource(CM)] << stale_once)
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                              {"spec": {"workload": {"decodeBatch": 9}}})
        wait_for(lambda: '"decodeBatch":9' in emulator.objects(CM, NS)["tiny-config"]["data"]["plan.json"],
                 what="plan.json updated after a conflict")
        assert "ConfigMap/tiny-config" in emulator.emulator.conflicts

    # the controller never writes spec: no operator or kopf request touches it
    ours = [r for r in emulator.emulator if r.headers.get("User-Agent", "").startswith(("moeshard-operator", "kopf/"))]
    assert any(r.method == "PATCH" for r in ours)
    for r in ours:
        if r.method in ("PATCH", "PUT") and "/moedeployments/" in r.url.path:
            ops = r.data if isinstance(r.data, list) else [{"path": "/" + k} for k in (r.data or {})]
            assert not [op for op in ops if op["path"].startswith("/spec")], r.data

    # delete: kopf's finalizer runs the cleanup, then the object goes
    body = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")
    assert body["metadata"]["finalizers"] == ["moeshard.io/cleanup"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")
    wait_for(lambda: not emulator.objects("moeshard.io/v1alpha1/moedeployments", NS), what="MoEDeployment gone")
    for resource in (STS, SVC, PDB, CM):
        assert emulator.objects(resource, NS) == {}


def _stale_config_map_list(emulator, decode_batch: int):
    """A LIST reaction serving the ConfigMaps one resourceVersion old from the moment the
    MoEDeployment asks for ``decode_batch`` until a ConfigMap patch built on it got its 409.

    A resync that still holds the old body may list first and write nothing (its desired
    ConfigMap is the live one); the lag lasts past it, so the reconcile of the edit sees it.
    """
    moeds = kmock.resource("moeshard.io/v1alpha1/moedeployments")

    def edited() -> bool:
        moed = emulator.emulator.objects[moeds, NS, "tiny"].raw
        return moed["spec"].get("workload", {}).get("decodeBatch") == decode_batch

    return stale_list_reaction(emulator, CM, NS, "ConfigMapList", when=edited,
                               until=lambda: "ConfigMap/tiny-config" in emulator.emulator.conflicts)[0]


def test_bad_specs_get_conditions_while_good_ones_are_served(start_operator, custom, kube, emulator, example,
                                                             check_moed):
    start_operator()
    cross = example("tiny-cpu", **{"metadata.name": "cross", "spec.hardware.profile": "h100-hgx",
                                   "spec.model": {"preset": "qwen3-235b-a22b", "weights": {"uri": "pvc://m/q"}}, "spec.parallelism": {"expertEP": 16},
                                   "spec.loadBalancing.redundantSlots": 0})  # passes the CRD, not the planner
    unknown = example("tiny-cpu", **{"metadata.name": "unknown", "spec.parallelism.sharding": "auto"})
    good = check_moed(example("tiny-cpu", **{"metadata.name": "good"}))
    for body in (check_moed(cross), unknown, good):
        emulator.set_admission(body is not unknown)  # the CRD refuses an unknown field: play a looser one
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    emulator.set_admission(True)
    with ReadyController(kube, emulator):
        wait_for(_ready(custom, "good"), what="good Ready")
    for name, field in (("cross", "spec.parallelism"), ("unknown", "spec.parallelism.sharding")):
        wait_for(lambda: _status(custom, name).get("phase") == "Failed", what=f"{name} Failed")
        planned = {c["type"]: c for c in _status(custom, name)["conditions"]}["Planned"]
        assert planned["status"] == "False" and planned["reason"] == "InvalidSpec"
        assert planned["message"].startswith(field)
        wait_for(lambda: "InvalidSpec" in _event_reasons(emulator, name), what=f"{name} InvalidSpec event")
        assert not [n for n in emulator.objects(STS, NS) if n.startswith(name)]
    assert sorted(emulator.objects(STS, NS)) == ["good-r0"]


def test_operator_restart_halfway_leaves_no_duplicates(start_operator, custom, kube, emulator, example, check_moed):
    """Operator A hangs while creating group 1 and is stopped; operator B finishes the job."""
    hung = threading.Event()
    state: dict[str, Any] = {}

    async def hang_group_1(request):
        if request.data["metadata"]["name"] != "tiny-r1" or "release" in state:
            raise NotImplementedError
        state["release"] = asyncio.Event()
        hung.set()
        await state["release"].wait()
        raise NotImplementedError  # then answer normally

    emulator.call(lambda em: em["create", kmock.resource(STS)] << hang_group_1)
    first = start_operator()
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                           check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 3})))
    assert hung.wait(15)
    first.stop_flag.set()  # operator A goes away mid-reconcile
    with ReadyController(kube, emulator):
        start_operator()
        wait_for(lambda: len(emulator.objects(STS, NS)) == 3, what="3 groups from operator B")
        emulator.call(lambda em: state["release"].set())  # A's stuck request finally returns
        wait_for(_ready(custom), what="Ready")
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1", "tiny-r2"]
    assert sorted(emulator.objects(SVC, NS)) == ["tiny", "tiny-r0-ranks", "tiny-r1-ranks", "tiny-r2-ranks"]
    assert not [r for r in emulator.emulator if r.method == "DELETE"]  # nothing torn down and rebuilt
    first.stop()
