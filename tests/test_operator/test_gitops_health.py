"""GitOps health: Flux's kstatus assessment and Argo CD's health.lua on statuses the operator wrote.

``kstatus_assess`` follows the kstatus rules (sigs.k8s.io/cli-utils kstatus
documentation, as Flux's ``wait: true`` applies them to a custom resource):

1. ``metadata.deletionTimestamp`` set: Terminating;
2. ``status.observedGeneration`` present and != ``metadata.generation``:
   InProgress (the controller has not seen the latest spec);
3. condition ``Reconciling`` True: InProgress;
4. condition ``Stalled`` True: Failed;
5. condition ``Ready`` present and not True: InProgress;
6. otherwise Current.

The statuses come from the real kopf operator on the kube emulator and from
the reconcile itself (restart budget), in the same test run; health.lua runs
in Lua (lupa) on the very same objects.
"""

from __future__ import annotations

import pathlib
from typing import Any

import lupa
import yaml

from moeshard.operator.handlers import reconcile
from moeshard.operator.status import OWNED_CONDITIONS
from support.kube_emulator import wait_for

from test_operator.test_scenarios import ReadyController

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "charts" / "moeshard" / "files" / "argocd" / "health.lua"
ARGOCD_CM = ROOT / "charts" / "moeshard" / "files" / "argocd" / "argocd-cm.yaml"
GROUP, VERSION, PLURAL, NS = "moeshard.io", "v1alpha1", "moedeployments", "test"
STS = "apps/v1/statefulsets"


def kstatus_assess(obj: dict[str, Any]) -> str:
    """The kstatus status of a custom resource (rules in the module docstring)."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    observed = status.get("observedGeneration")
    if observed is not None and observed != meta.get("generation"):
        return "InProgress"
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    if conditions.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conditions.get("Stalled", {}).get("status") == "True":
        return "Failed"
    if "Ready" in conditions and conditions["Ready"]["status"] != "True":
        return "InProgress"
    return "Current"


class ArgoHealth:
    """health.lua run as Argo CD runs it: a chunk that reads the global ``obj`` and returns ``hs``."""

    def __init__(self, script: str):
        self.lua = lupa.LuaRuntime(unpack_returned_tuples=True)
        self.check = self.lua.eval(f"function(obj)\n{script}\nend")

    def __call__(self, obj: dict[str, Any]) -> tuple[str, str]:
        hs = self.check(self.lua.table_from(obj, recursive=True))
        return hs["status"], hs["message"]


def _get(custom, name: str = "tiny") -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _observed(custom, name: str = "tiny"):
    def check():
        body = _get(custom, name)
        return body if (body.get("status") or {}).get("observedGeneration") == body["metadata"]["generation"] else None
    return check


def _check_kstatus_fields(body: dict[str, Any]) -> None:
    """Every owned condition carries the generation it was computed from; Ready/Reconciling/Stalled exist."""
    conditions = {c["type"]: c for c in body["status"]["conditions"]}
    assert set(OWNED_CONDITIONS) <= set(conditions)
    for kind in OWNED_CONDITIONS:
        assert conditions[kind]["observedGeneration"] == body["metadata"]["generation"], kind


def test_flux_and_argo_read_progress_then_health_from_the_real_operator(start_operator, custom, kube, emulator,
                                                                        example, check_moed):
    argo = ArgoHealth(HEALTH_LUA.read_text())
    start_operator()
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                           check_moed(example("tiny-cpu", **{"spec.parallelism.replicas": 2})))
    # groups created but not ready (nothing plays the StatefulSet controller yet): loading
    wait_for(lambda: len(emulator.objects(STS, NS)) == 2, what="2 groups")
    loading = wait_for(lambda: (b := _get(custom)) and (b.get("status") or {}).get("conditions") and b,
                       what="conditions")
    _check_kstatus_fields(loading)
    assert kstatus_assess(loading) == "InProgress"
    assert argo(loading)[0] == "Progressing"
    conditions = {c["type"]: c for c in loading["status"]["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Reconciling"]["status"], conditions["Stalled"]["status"]) \
        == ("False", "True", "False")

    with ReadyController(kube, emulator):
        healthy = wait_for(lambda: (b := _get(custom)) and kstatus_assess(b) == "Current" and b, what="Current")
    _check_kstatus_fields(healthy)
    assert healthy["status"]["phase"] == "Ready" and healthy["status"]["readyReplicas"] == 2
    status, message = argo(healthy)
    assert status == "Healthy" and "2/2" in message

    # an EP change rolls the groups; with nothing marking the new groups ready it stays InProgress
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                          {"spec": {"parallelism": {"expertEP": 2, "attentionTP": 1}}})
    assert kstatus_assess(_get(custom)) == "InProgress"  # observed or not, never Current now
    wait_for(_observed(custom), what="generation 2 observed")
    rolling = wait_for(lambda: (b := _get(custom)) and b["status"]["plan"]["expertEP"] == 2 and b, what="new plan")
    _check_kstatus_fields(rolling)
    assert kstatus_assess(rolling) == "InProgress" and argo(rolling)[0] == "Progressing"

    # an invalid spec: Stalled, kstatus Failed, Argo Degraded naming the field. The CRD refuses an unknown
    # field with 422 like a real API server; admission off plays an older CRD that let it in.
    bad = example("tiny-cpu", **{"metadata.name": "bad", "spec.parallelism.sharding": "auto"})
    emulator.set_admission(False)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, bad)
    finally:
        emulator.set_admission(True)
    stalled = wait_for(lambda: (b := _get(custom, "bad")) and (b.get("status") or {}).get("phase") == "Failed" and b,
                       what="bad spec Failed")
    _check_kstatus_fields(stalled)
    assert kstatus_assess(stalled) == "Failed"
    status, message = argo(stalled)
    assert status == "Degraded" and message.startswith("spec.parallelism.sharding")


def test_restart_budget_spent_is_stalled_and_degraded(kube, custom, emulator, example, check_moed):
    """The reconcile on the emulator: one failure with maxRestarts 0 spends the budget."""
    argo = ArgoHealth(HEALTH_LUA.read_text())
    body = example("tiny-cpu", **{"spec.engine.restartBudget": {"maxRestarts": 0, "window": "30m"}})
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(body))
    reconcile(kube, _get(custom))
    sts = emulator.objects(STS, NS)["tiny-r0"]
    kube.patch("apps/v1", "statefulsets", NS, "tiny-r0", {"status": {"replicas": 1, "readyReplicas": 1}},
               subresource="status")
    reconcile(kube, _get(custom))
    assert kstatus_assess(_get(custom)) == "Current" and argo(_get(custom))[0] == "Healthy"
    pod = kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "tiny-r0-0", "namespace": NS,
        "labels": {"moeshard.io/deployment": "tiny", "moeshard.io/replica": "0",
                   "app.kubernetes.io/name": "moeshard-engine"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "tiny-r0",
                             "uid": sts["metadata"]["uid"], "controller": True}]},
        "spec": {"containers": [{"name": "engine", "image": "x"}]}})
    kube.patch("v1", "pods", NS, pod["metadata"]["name"], {"status": {
        "phase": "Running", "containerStatuses": [{"name": "engine", "restartCount": 1, "ready": False, "image": "x",
                                                   "imageID": ""}]}}, subresource="status")
    reconcile(kube, _get(custom))
    failed = _get(custom)
    _check_kstatus_fields(failed)
    conditions = {c["type"]: c for c in failed["status"]["conditions"]}
    assert (conditions["Stalled"]["status"], conditions["Stalled"]["reason"]) == ("True", "RestartBudgetExceeded")
    assert conditions["Ready"]["status"] == "False" and conditions["Reconciling"]["status"] == "False"
    assert kstatus_assess(failed) == "Failed"
    status, message = argo(failed)
    assert status == "Degraded" and "restartBudget" in message


def test_missing_leaderworkerset_crd_is_stalled(kube, custom, emulator, example, check_moed):
    body = example("tiny-cpu", **{"spec.engine.groupKind": "LeaderWorkerSet"})
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(body))
    reconcile(kube, _get(custom))
    pending = _get(custom)
    _check_kstatus_fields(pending)
    assert pending["status"]["phase"] == "Pending" and kstatus_assess(pending) == "Failed"
    assert ArgoHealth(HEALTH_LUA.read_text())(pending)[0] == "Degraded"


def test_argo_health_edges_and_the_argocd_cm_snippet_carries_the_same_lua():
    script = HEALTH_LUA.read_text()
    snippet = yaml.safe_load(ARGOCD_CM.read_text())
    assert snippet["data"]["resource.customizations.health.moeshard.io_MoEDeployment"] == script
    argo = ArgoHealth(script)
    fresh = {"metadata": {"name": "x", "generation": 1}, "spec": {}}
    assert argo(fresh)[0] == "Progressing"
    ready = [{"type": "Ready", "status": "True", "reason": "AllGroupsReady", "message": "0/0 replica groups ready"},
             {"type": "Reconciling", "status": "False", "reason": "ReconcileComplete", "message": ""}]
    stale = {"metadata": {"generation": 3}, "status": {"observedGeneration": 2, "replicas": 1, "conditions": ready}}
    assert argo(stale) == ("Progressing", "Waiting for the operator to observe generation 3")
    zero = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "replicas": 0, "conditions": ready}}
    assert argo(zero)[0] == "Suspended"
