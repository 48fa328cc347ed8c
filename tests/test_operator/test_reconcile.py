"""The reconcile core (handlers.reconcile) against the kube emulator over HTTP, without kopf.

Fast and deterministic: each test calls the same function the kopf handlers
call, and plays the StatefulSet controller / kubelet itself by writing
StatefulSet status and Pods.
"""

from __future__ import annotations

import itertools
from typing import Any

import hypothesis.strategies as st
import kmock
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import example as hypothesis_example

from moeshard.operator.api import SpecError, parse_resource
from moeshard.operator.handlers import cleanup, reconcile
from moeshard.operator.planner import plan_for_spec
from moeshard.operator.kube import KubeError
from moeshard.core.placement import parse_placement
from support.kube_emulator import stale_list_reaction

NS = "test"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"
STS, SVC, PDB, CM, PODS = "apps/v1/statefulsets", "v1/services", "policy/v1/poddisruptionbudgets", "v1/configmaps", "v1/pods"
NETPOL = "networking.k8s.io/v1/networkpolicies"


# --------------------------------------------------------------------------- helpers


def _create(custom, body: dict[str, Any]) -> dict[str, Any]:
    return custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)


def _live(custom, name: str = "tiny") -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _reconcile(kube, custom, name: str = "tiny"):
    return reconcile(kube, _live(custom, name))


def _mark_ready(kube, emulator, ready: bool = True) -> None:
    """Play the StatefulSet controller: every group reports all its pods ready."""
    for name, sts in emulator.objects(STS, NS).items():
        n = sts["spec"]["replicas"] if ready else 0
        kube.patch("apps/v1", "statefulsets", NS, name, {"status": {"replicas": sts["spec"]["replicas"],
                                                                     "readyReplicas": n}}, subresource="status")


def _settle(kube, custom, emulator, name: str = "tiny", rounds: int = 10) -> dict[str, Any]:
    """Reconcile and mark groups ready until the deployment is Ready."""
    for _ in range(rounds):
        _reconcile(kube, custom, name)
        _mark_ready(kube, emulator)
        status = _live(custom, name).get("status") or {}
        if status.get("phase") == "Ready" and status.get("observedGeneration") == _live(custom, name)["metadata"]["generation"]:
            return status
    raise AssertionError(f"not Ready after {rounds} rounds: {status}")


def _conditions(custom, name: str = "tiny") -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in _live(custom, name)["status"]["conditions"]}


def _fail_pod(kube, replica: int, name: str = "tiny", owner_uid: str | None = None, pod: int = 0,
              terminating: bool = False) -> None:
    """Play the kubelet: a pod of group ``replica`` (owned by the StatefulSet ``owner_uid``) whose engine restarted."""
    metadata = {
        "name": f"{name}-r{replica}-{pod}", "namespace": NS,
        "labels": {"moeshard.io/deployment": name, "moeshard.io/replica": str(replica),
                   "app.kubernetes.io/name": "moeshard-engine"}}
    if owner_uid:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": f"{name}-r{replica}",
                                        "uid": owner_uid, "controller": True}]
    if terminating:  # the finalizer keeps it listed, as the kubelet's grace period does
        metadata["deletionTimestamp"] = "2026-11-28T00:00:00Z"
        metadata["finalizers"] = ["moeshard.io/test-grace-period"]
    pod = kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                       "spec": {"containers": [{"name": "engine", "image": "x"}]}})
    kube.patch("v1", "pods", NS, pod["metadata"]["name"], {"status": {
        "phase": "Running", "containerStatuses": [{"name": "engine", "restartCount": 1, "ready": False, "image": "x",
                                                   "imageID": ""}]}}, subresource="status")


# --------------------------------------------------------------------------- tests


def test_create_then_no_op_reconcile_makes_no_write(kube, custom, emulator, example, check_moed, check_builtin):
    _create(custom, check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 2})))
    outcome = _reconcile(kube, custom)
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1"]
    assert sorted(emulator.objects(SVC, NS)) == ["tiny", "tiny-r0-ranks", "tiny-r1-ranks"]
    assert sorted(emulator.objects(PDB, NS)) == ["tiny-r0", "tiny-r1"]
    assert sorted(emulator.objects(CM, NS)) == ["tiny-config"]
    assert sorted(emulator.objects(NETPOL, NS)) == ["tiny-r0", "tiny-r1"]  # the example asks for them
    assert len([e for e in outcome.events if e[1] == "Created"]) == 10  # an Event for every action
    uid = _live(custom)["metadata"]["uid"]
    for resource in (STS, SVC, PDB, CM):
        for obj in emulator.objects(resource, NS).values():
            check_builtin(obj)
            assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    status = _settle(kube, custom, emulator)
    assert status["replicas"] == 2 and status["readyReplicas"] == 2
    assert status["selector"] == "moeshard.io/deployment=tiny,app.kubernetes.io/name=moeshard-engine"
    assert status["plan"]["expertEP"] == 4 and status["plan"]["attentionTP"] == 2
    before = kube.writes
    outcome = _reconcile(kube, custom)
    assert kube.writes == before and outcome.events == [] and outcome.settled


def test_ep_change_rolls_one_group_at_a_time(kube, custom, emulator, example, check_moed):
    _create(custom, check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 3})))
    _settle(kube, custom, emulator)
    old = {n: s["metadata"]["uid"] for n, s in emulator.objects(STS, NS).items()}
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                          {"spec": {"parallelism": {"expertEP": 2, "attentionTP": 1}}})
    replaced_per_round = []
    for _ in range(6):
        _reconcile(kube, custom)
        groups = emulator.objects(STS, NS)
        new = [n for n, s in groups.items() if s["metadata"]["uid"] != old[n]]
        replaced_per_round.append(len(new))
        # capacity: groups still serving (ready, old) + new groups ready never drop below replicas - 1
        serving = sum(1 for s in groups.values() if (s.get("status") or {}).get("readyReplicas", 0) >= s["spec"]["replicas"])
        assert serving >= 2
        _mark_ready(kube, emulator)
        if len(new) == 3:
            break
    assert replaced_per_round[:3] == [1, 2, 3]
    status = _settle(kube, custom, emulator)
    assert status["plan"]["expertEP"] == 2
    assert all(s["spec"]["replicas"] == 1 for s in emulator.objects(STS, NS).values())  # 2 ranks in one pod
    placement = parse_placement(emulator.objects(CM, NS)["tiny-config"]["data"]["placement.json"])
    assert placement.version == 1 and placement.num_gpus == 2  # reset for the new EP, version moved on


def test_balancer_placement_is_kept_while_it_fits(kube, custom, emulator, example, check_moed):
    _create(custom, check_moed(example("tiny-cpu")))
    _settle(kube, custom, emulator)
    cm = emulator.objects(CM, NS)["tiny-config"]
    placement = parse_placement(cm["data"]["placement.json"]).with_version(7)
    kube.patch("v1", "configmaps", NS, "tiny-config", {"data": {"placement.json": placement.to_json()}})
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"workload": {"decodeBatch": 8}}})
    _reconcile(kube, custom)
    cm = emulator.objects(CM, NS)["tiny-config"]
    assert parse_placement(cm["data"]["placement.json"]).version == 7
    assert '"decodeBatch":8' in cm["data"]["plan.json"] or '"decodeBatch": 8' in cm["data"]["plan.json"]


def test_corrupt_placement_is_rewritten(kube, custom, emulator, example, check_moed):
    _create(custom, check_moed(example("tiny-cpu")))
    _settle(kube, custom, emulator)
    kube.patch("v1", "configmaps", NS, "tiny-config", {"data": {"placement.json": "{not json"}})
    outcome = _reconcile(kube, custom)
    assert ("Normal", "Patched") in {e[:2] for e in outcome.events}
    placement = parse_placement(emulator.objects(CM, NS)["tiny-config"]["data"]["placement.json"])
    assert placement.num_gpus == 4
    writes = kube.writes
    _reconcile(kube, custom)
    assert kube.writes == writes  # and then nothing more to do


def test_failed_pod_recreates_its_group_until_the_restart_budget_ends(kube, custom, emulator, example, check_moed):
    body = example("tiny-cpu", **{"spec.parallelism.replicas": 2,
                                  "spec.engine.restartBudget": {"maxRestarts": 2, "window": "30m"}})
    _create(custom, check_moed(body))
    _settle(kube, custom, emulator)
    for attempt in (1, 2):
        uid = emulator.objects(STS, NS)["tiny-r1"]["metadata"]["uid"]
        _fail_pod(kube, 1)
        outcome = _reconcile(kube, custom)
        assert [e[1] for e in outcome.events if e[1] == "RecreatedGroup"] == ["RecreatedGroup"]
        assert emulator.objects(STS, NS)["tiny-r1"]["metadata"]["uid"] != uid  # recreated as a unit
        assert emulator.objects(STS, NS)["tiny-r0"]["metadata"]["generation"] == 1  # the other group untouched
        assert emulator.objects(PODS, NS) == {}
        status = _live(custom)["status"]
        assert status["phase"] == "Degraded" and len(status["groupRestarts"]) == attempt
        _settle(kube, custom, emulator)
    uid = emulator.objects(STS, NS)["tiny-r1"]["metadata"]["uid"]
    _fail_pod(kube, 1)
    outcome = _reconcile(kube, custom)
    assert emulator.objects(STS, NS)["tiny-r1"]["metadata"]["uid"] == uid  # no loop
    status = _live(custom)["status"]
    assert status["phase"] == "Failed"
    assert _conditions(custom)["Degraded"]["reason"] == "RestartBudgetExceeded"
    assert ("Warning", "RestartBudgetExceeded") in {(e[0], e[1]) for e in outcome.events}


def test_pods_of_a_recreated_group_that_linger_do_not_count_again(kube, custom, emulator, example, check_moed):
    """On a cluster the old pods terminate for their grace period after a recreation: one
    failure must cost one restart, not the whole budget."""
    body = example("tiny-cpu", **{"spec.engine.restartBudget": {"maxRestarts": 3, "window": "30m"}})
    _create(custom, check_moed(body))
    _settle(kube, custom, emulator)
    old_uid = emulator.objects(STS, NS)["tiny-r0"]["metadata"]["uid"]
    _fail_pod(kube, 0, owner_uid=old_uid)
    assert [e[1] for e in _reconcile(kube, custom).events].count("RecreatedGroup") == 1
    new_uid = emulator.objects(STS, NS)["tiny-r0"]["metadata"]["uid"]
    assert new_uid != old_uid
    _fail_pod(kube, 0, owner_uid=old_uid)  # the old incarnation's pod, not yet gone
    _fail_pod(kube, 0, owner_uid=new_uid, pod=1, terminating=True)  # terminating, whatever its owner
    for _ in range(3):
        outcome = _reconcile(kube, custom)
        assert "RecreatedGroup" not in [e[1] for e in outcome.events]
    assert emulator.objects(STS, NS)["tiny-r0"]["metadata"]["uid"] == new_uid
    assert len(_live(custom)["status"]["groupRestarts"]) == 1


def test_scale_down_and_up_through_the_scale_subresource(kube, custom, emulator, example, check_moed):
    _create(custom, check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 3})))
    _settle(kube, custom, emulator)
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"replicas": 1}})
    _reconcile(kube, custom)
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0"]
    assert sorted(emulator.objects(SVC, NS)) == ["tiny", "tiny-r0-ranks"]
    assert sorted(emulator.objects(PDB, NS)) == ["tiny-r0"]
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"replicas": 2}})
    _settle(kube, custom, emulator)
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1"]
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny")
    assert scale["status"]["replicas"] == 2 and "moeshard.io/deployment=tiny" in scale["status"]["selector"]
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"replicas": 0}})
    status = _settle(kube, custom, emulator)  # zero groups is a settled, Ready deployment
    assert emulator.objects(STS, NS) == {} and status["replicas"] == 0
    assert sorted(emulator.objects(SVC, NS)) == ["tiny"] and sorted(emulator.objects(CM, NS)) == ["tiny-config"]


@pytest.mark.parametrize("change, field, crd_refuses", [
    ({"spec.parallelism.expertEP": 5, "spec.parallelism.attentionTP": 1}, "spec.parallelism.expertEP", True),
    ({"spec.parallelism.surprise": 1}, "spec.parallelism.surprise", True),  # unknown field
    ({"spec.hardware.profile": "h100-hgx", "spec.model": {"preset": "qwen3-235b-a22b", "weights": {"uri": "pvc://m/q"}},
      "spec.parallelism": {"expertEP": 16}, "spec.loadBalancing.redundantSlots": 0}, "spec.parallelism", False),  # crosses the domain without permission
])
def test_bad_spec_sets_a_condition_naming_the_field_and_creates_nothing(kube, custom, emulator, example, change, field,
                                                                        crd_refuses, create_unadmitted):
    refusal, _ = create_unadmitted(custom, example("tiny-cpu", **change))
    assert (refusal is not None) == crd_refuses, refusal
    outcome = _reconcile(kube, custom)
    assert outcome.invalid is not None and outcome.invalid.field.startswith(field)
    planned = _conditions(custom)["Planned"]
    assert (planned["status"], planned["reason"]) == ("False", "InvalidSpec")
    assert planned["message"].startswith(field)
    assert _live(custom)["status"]["phase"] == "Failed"
    assert [e[:2] for e in outcome.events] == [("Warning", "InvalidSpec")]
    for resource in (STS, SVC, PDB, CM):
        assert emulator.objects(resource, NS) == {}


@pytest.mark.parametrize("patch, named", [
    ({"parallelism": {"expertEP": 5}}, "spec.parallelism.expertEP"),  # the CRD refuses it (CEL)
    # the CRD lets it through, the planner refuses it naming expertEP; the user changed contextLength
    ({"workload": {"contextLength": 2_000_000, "decodeBatch": 65536}}, "spec.workload.contextLength"),
])
def test_bad_edit_of_a_running_deployment_changes_nothing(kube, custom, emulator, example, check_moed, patch, named):
    _create(custom, check_moed(example("tiny-cpu")))
    _settle(kube, custom, emulator)
    before = {r: emulator.objects(r, NS) for r in (STS, SVC, PDB, CM)}
    emulator.set_admission(False)  # play a spec the CRD let through
    try:
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": patch})
    finally:
        emulator.set_admission(True)
    writes = kube.writes
    outcome = _reconcile(kube, custom)
    assert outcome.invalid is not None
    assert kube.writes == writes + 1  # the status only
    assert {r: emulator.objects(r, NS) for r in before} == before
    status = _live(custom)["status"]
    assert status["plan"]["expertEP"] == 4  # the deployed plan stays reported
    assert status["phase"] == "Degraded" and status["readyReplicas"] == 1  # the old group still serves
    conditions = _conditions(custom)
    assert conditions["Available"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"] == "InvalidSpec"
    assert conditions["Planned"]["message"].startswith(named + ": "), conditions["Planned"]["message"]


def test_stale_list_conflict_is_retried(kube, custom, emulator, example, check_moed):
    """The ConfigMap list comes from a lagging cache (older resourceVersion): the patch gets a real 409
    from the emulator, apply re-reads and succeeds."""
    _create(custom, check_moed(example("tiny-cpu")))
    _settle(kube, custom, emulator)
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"workload": {"decodeBatch": 8}}})
    stale_list, served = stale_list_reaction(emulator, CM, NS, "ConfigMapList")
    emulator.call(lambda em: em["list", kmock.resource(CM)] << stale_list)
    outcome = _reconcile(kube, custom)
    assert served and emulator.emulator.conflicts == ["ConfigMap/tiny-config"]
    assert ("Normal", "Patched") in {e[:2] for e in outcome.events}
    assert "8" in emulator.objects(CM, NS)["tiny-config"]["data"]["plan.json"]


def test_half_done_reconcile_is_completed_without_duplicates(kube, custom, emulator, example, check_moed):
    """The server committed the second group but its answer was lost (the operator died): the next
    reconcile adopts what exists and creates only what is missing."""
    _create(custom, check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 3})))
    lost = []

    def lose_answer(request):
        if request.data["metadata"]["name"] != "tiny-r1" or lost:
            raise NotImplementedError
        lost.append(1)
        raise kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="answer lost")  # stored already

    emulator.call(lambda em: em["create", kmock.resource(STS)] << lose_answer)
    with pytest.raises(KubeError):
        _reconcile(kube, custom)
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1"]
    _reconcile(kube, custom)
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1", "tiny-r2"]
    creates = [r for r in emulator.emulator if r.method == "POST" and "statefulsets" in str(r.url)]
    assert sorted(r.data["metadata"]["name"] for r in creates) == ["tiny-r0", "tiny-r1", "tiny-r2"]


def test_leaderworkerset_needs_its_crd(kube, custom, emulator, example, check_moed):
    _create(custom, check_moed(example("tiny-cpu", **{"spec.engine.groupKind": "LeaderWorkerSet"})))
    _reconcile(kube, custom)
    assert _live(custom)["status"]["phase"] == "Pending"
    assert _conditions(custom)["Progressing"]["reason"] == "LeaderWorkerSetMissing"
    assert emulator.objects(STS, NS) == {}
    from support.kube_emulator import LWS_RESOURCE

    emulator.call(lambda em: em.resources.__setitem__(*LWS_RESOURCE))
    _reconcile(kube, custom)
    assert sorted(emulator.objects("leaderworkerset.x-k8s.io/v1/leaderworkersets", NS)) == ["tiny-r0"]


def test_cleanup_deletes_every_child(kube, custom, emulator, example, check_moed):
    _create(custom, check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 2})))
    _settle(kube, custom, emulator)
    _fail_pod(kube, 0)
    outcome = cleanup(kube, _live(custom))
    for resource in (STS, SVC, PDB, CM, PODS, NETPOL):
        assert emulator.objects(resource, NS) == {}
    assert len([e for e in outcome.events if e[1] == "Deleted"]) == 10


# --------------------------------------------------------------------------- fuzz

_names = (f"fz{i}" for i in itertools.count())
_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=6),
                    st.lists(st.integers(0, 4), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_paths = st.sampled_from([
    "spec", "spec.model", "spec.model.preset", "spec.model.architecture", "spec.model.architecture.numExperts",
    "spec.model.architecture.topK", "spec.hardware", "spec.hardware.profile", "spec.hardware.custom.gpusPerNode",
    "spec.hardware.custom.gpusPerDomain", "spec.parallelism", "spec.parallelism.expertEP",
    "spec.parallelism.attentionTP", "spec.parallelism.replicas", "spec.parallelism.allowCrossDomain",
    "spec.workload.prefillTokens", "spec.loadBalancing.redundantSlots", "spec.loadBalancing.interval",
    "spec.engine", "spec.engine.groupKind", "spec.engine.port", "spec.engine.restartBudget.window",
    "spec.engine.scheduling.tolerations", "spec.engine.scheduling.nodeSelector", "spec.engine.maxUnavailable",
    "spec.model.weights.uri", "spec.extra",
])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(_paths, _values), min_size=1, max_size=3))
@hypothesis_example(changes=[("spec.parallelism.replicas", 0)])  # scale to zero: valid, Ready at once
@hypothesis_example(changes=[("spec.parallelism.replicas", False)])  # a boolean is not an integer (the API server agrees)
@hypothesis_example(changes=[("spec.parallelism.replicas", "2")])
def test_fuzz_no_spec_crashes_the_reconcile(kube, custom, emulator, example, changes):
    """Whatever got past the CRD (admission off), the reconcile never raises, and the outcome follows the
    oracle: a spec that parses and plans starts deploying (Ready at once for scale-to-zero), any other
    spec is Failed with a condition naming a field and no child object."""
    emulator.call(lambda em: setattr(em, "history_limit", 50))  # kmock's request matching is O(history)
    emulator.set_admission(False)
    body = example("tiny-cpu")
    body["metadata"]["name"] = next(_names)
    for path, value in changes:
        node = body
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    name = body["metadata"]["name"]
    _create(custom, body)
    live = _live(custom, name)
    try:  # the oracle: the API models and the planner, on the stored object
        replicas = plan_for_spec(parse_resource(live)).chosen.replicas
    except SpecError:
        replicas = None
    outcome = reconcile(kube, live)  # never raises for a bad spec
    status = _live(custom, name)["status"]
    if replicas is None:
        assert outcome.invalid is not None and status["phase"] == "Failed"
        planned = next(c for c in status["conditions"] if c["type"] == "Planned")
        assert planned["status"] == "False" and planned["message"].startswith(outcome.invalid.field + ": ")
        assert outcome.invalid.field.startswith(("spec", "metadata"))
        children = [n for r in (STS, SVC, PDB, CM) for n in emulator.objects(r, NS) if n == name or n.startswith(name + "-")]
        assert children == []
    else:
        assert outcome.invalid is None
        lws = live["spec"].get("engine", {}).get("groupKind") == "LeaderWorkerSet"  # no LWS CRD served here
        assert status["phase"] == ("Pending" if lws else "Ready" if replicas == 0 else "Progressing")


def test_compute_domain_and_group_kind_changes(kube, custom, emulator, example, check_moed):
    from support.kube_emulator import COMPUTE_DOMAIN_RESOURCE, LWS_RESOURCE

    emulator.call(lambda em: em.resources.__setitem__(*COMPUTE_DOMAIN_RESOURCE))
    emulator.call(lambda em: em.resources.__setitem__(*LWS_RESOURCE))
    domains, lws = "resource.nvidia.com/v1beta1/computedomains", "leaderworkerset.x-k8s.io/v1/leaderworkersets"
    _create(custom, check_moed(example("tiny-cpu", **{"spec.engine.scheduling": {"computeDomain": True}})))
    _reconcile(kube, custom)
    assert sorted(emulator.objects(domains, NS)) == ["tiny-r0"]
    claim = emulator.objects(STS, NS)["tiny-r0"]["spec"]["template"]["spec"]["resourceClaims"][0]
    assert claim["resourceClaimTemplateName"] == "tiny-r0-imex"
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"engine": {
        "scheduling": {"computeDomain": False}, "groupKind": "LeaderWorkerSet"}}})
    _reconcile(kube, custom)
    assert emulator.objects(domains, NS) == {}
    assert emulator.objects(STS, NS) == {} and sorted(emulator.objects(lws, NS)) == ["tiny-r0"]


# --------------------------------------------------------------------------- 422 on a child


def test_rejected_group_rolls_back_its_objects_and_says_apply_rejected(kube, custom, emulator, example, check_moed):
    """A StatefulSet the API server refuses (an admission policy here) leaves no half group: the objects this
    pass created are deleted again, the conditions name the object and the server's message, no retry loop."""
    from support.kube_admission import Cause

    policy = {"on": True}

    def refuse(plural, obj):
        return [Cause("FieldValueForbidden", "spec", "denied by policy")] if policy["on"] and plural == "statefulsets" \
            else []

    emulator.call(lambda em: em.admission.policies.append(refuse))
    _create(custom, check_moed(example("tiny-cpu")))
    outcome = _reconcile(kube, custom)
    assert outcome.rejected == 'StatefulSet tiny-r0: StatefulSet.apps "tiny-r0" is invalid: spec: denied by policy'
    for resource in (STS, SVC, PDB, CM):
        assert emulator.objects(resource, NS) == {}, resource
    status = _live(custom)["status"]
    assert status["phase"] == "Failed"
    progressing = _conditions(custom)["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "ApplyRejected")
    assert "StatefulSet tiny-r0" in progressing["message"] and "denied by policy" in progressing["message"]
    assert ("Warning", "ApplyRejected") in {e[:2] for e in outcome.events}
    policy["on"] = False  # the policy changes: the next reconcile (resync) deploys
    assert _reconcile(kube, custom).rejected is None
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0"]
