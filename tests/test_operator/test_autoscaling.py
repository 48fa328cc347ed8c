"""spec.autoscaling: Python vs CEL, the HPA / ScaledObject builders, the reconcile of them, drained scale-in.

The ScaledObject is checked against ``KEDA_SCALED_OBJECT_SCHEMA`` below: the
fields we use, with their types and required keys, written from KEDA's
ScaledObject specification (keda.sh/docs/latest/reference/scaledobject-spec,
and the prometheus scaler page: serverAddress, query, threshold are strings;
a trigger's metricType is AverageValue, Value or Utilization).
"""

from __future__ import annotations

import copy
import pathlib
import subprocess
import shutil

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from moeshard.core.placement import parse_placement
from moeshard.operator.api import SpecError, parse_resource, parse_spec
from moeshard.operator.autoscaling import (
    SIGNALS, build_autoscaler, build_hpa, build_recording_rules, build_scaled_object, quantity,
)
from moeshard.operator.crd import SPEC_RULES
from moeshard.operator.deployment import Deployment
from moeshard.operator.handlers import reconcile
from moeshard.operator.scaling import DRAINING_ANNOTATION
from moeshard.operator.manifests import SERVING_LABEL
from moeshard.operator.planner import plan_for_spec
from support.kube_emulator import KEDA_RESOURCE

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "autoscaling").glob("*.yaml"))
MOED_EXAMPLES = [p for p in EXAMPLES if yaml.safe_load(p.read_text()).get("kind") == "MoEDeployment"]
GROUP, VERSION, PLURAL, NS = "moeshard.io", "v1alpha1", "moedeployments", "test"
STS, SVC, PDB, CM, PODS = "apps/v1/statefulsets", "v1/services", "policy/v1/poddisruptionbudgets", "v1/configmaps", "v1/pods"
HPA, SO = "autoscaling/v2/horizontalpodautoscalers", "keda.sh/v1alpha1/scaledobjects"
BASE = {"model": {"preset": "qwen3-235b-a22b", "weights": {"uri": "pvc://models/qwen3-235b"}}, "hardware": {"profile": "gb200-nvl72"}}
AUTO = {"maxReplicas": 4, "target": {"waitingRequestsPerReplica": 8}}

_STRING = {"type": "string", "minLength": 1}
_COUNT = {"type": "integer", "minimum": 0}
KEDA_SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": _STRING, "kind": _STRING, "name": _STRING,
                                                  "envSourceContainerName": _STRING}},
                "pollingInterval": _COUNT, "cooldownPeriod": _COUNT, "initialCooldownPeriod": _COUNT,
                "idleReplicaCount": _COUNT, "minReplicaCount": _COUNT, "maxReplicaCount": _COUNT,
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "name": _STRING,
                        "behavior": {"type": "object", "additionalProperties": False, "properties": {
                            "scaleUp": {"$ref": "#/$defs/rules"}, "scaleDown": {"$ref": "#/$defs/rules"}}},
                    }},
                }},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": _STRING, "name": _STRING, "useCachedMetrics": {"type": "boolean"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "authenticationRef": {"type": "object", "required": ["name"]},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                    "if": {"properties": {"type": {"const": "prometheus"}}},
                    "then": {"properties": {"metadata": {
                        "required": ["serverAddress", "query", "threshold"],
                        "properties": {"serverAddress": {"type": "string", "pattern": "^https?://"},
                                       "query": _STRING, "threshold": {"type": "string", "pattern": r"^[0-9.]+$"},
                                       "activationThreshold": {"type": "string"}}}}},
                }},
            },
        },
    },
    "$defs": {"rules": {"type": "object", "additionalProperties": False, "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["type", "value", "periodSeconds"], "additionalProperties": False,
            "properties": {"type": {"enum": ["Pods", "Percent"]}, "value": {"type": "integer", "minimum": 1},
                           "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800}}}},
    }}},
}


# --------------------------------------------------------------------------- API: Python and CEL agree


def _cel_failures(spec: dict) -> list[str]:
    env = celpy.Environment()
    failures = []
    for path, rules in SPEC_RULES.items():
        if not path.startswith("spec.autoscaling"):
            continue
        node = {"spec": spec}
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        for rule in rules if node is not None else []:
            if not bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(node)})):
                failures.append(rule["message"])
    return failures


def _schema_errors(crd: dict, spec: dict) -> list[str]:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(spec)]


@pytest.mark.parametrize("auto, field, ok", [
    (AUTO, None, True),
    (AUTO | {"engine": "keda", "minReplicas": 0}, None, True),
    (AUTO | {"scaleDownStabilization": "1h"}, None, True),
    (AUTO | {"minReplicas": 5}, "spec.autoscaling.minReplicas", False),
    (AUTO | {"minReplicas": 0}, "spec.autoscaling.minReplicas", False),
    (AUTO | {"scaleDownStabilization": "1h1s"}, "spec.autoscaling.scaleDownStabilization", False),
    (AUTO | {"target": {}}, "spec.autoscaling.target", False),
    (AUTO | {"target": {"kvCacheUsage": 0.5, "timeToFirstTokenP90Seconds": 2}}, "spec.autoscaling.target", False),
    (AUTO | {"target": {"kvCacheUsage": 1.5}}, "spec.autoscaling.target.kvCacheUsage", False),
    (AUTO | {"engine": "vpa"}, "spec.autoscaling.engine", False),
    (AUTO | {"engine": "keda", "wakeQuery": "sum(gateway_waiting)"}, None, True),
    (AUTO | {"wakeQuery": "sum(gateway_waiting)"}, "spec.autoscaling.wakeQuery", False),
    ({"target": {"kvCacheUsage": 0.5}}, "spec.autoscaling.maxReplicas", False),
])
def test_python_and_the_crd_agree_on_autoscaling(crd, auto, field, ok):
    spec = copy.deepcopy(BASE) | {"autoscaling": auto}
    crd_errors = _schema_errors(crd, spec) or _cel_failures(spec)
    if ok:
        parse_spec(spec)
        assert not crd_errors
        return
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert err.value.field.startswith(field), err.value
    assert crd_errors, f"the CRD would accept a bad {field}"


# --------------------------------------------------------------------------- builders


def _deployment(auto: dict, name: str = "tiny", namespace: str = NS) -> Deployment:
    spec = parse_spec(copy.deepcopy(BASE) | {"autoscaling": auto})
    return Deployment(name, namespace, "uid-1", spec, plan_for_spec(spec))


@pytest.mark.parametrize("target", [{"waitingRequestsPerReplica": 8}, {"kvCacheUsage": 0.8},
                                    {"timeToFirstTokenP90Seconds": 1.5}])
def test_hpa_is_a_valid_autoscaling_v2_object_on_the_scale_subresource(target):
    d = _deployment(AUTO | {"target": target, "minReplicas": 2, "scaleDownStabilization": "7m"})
    hpa = build_hpa(d)
    kubernetes_validate.validate(hpa, "1.33", strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "moeshard.io/v1alpha1", "kind": "MoEDeployment",
                                             "name": "tiny"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["metric"]["name"] == SIGNALS[next(iter(target))].record
    assert metric["metric"]["selector"]["matchLabels"] == {"moeshard_namespace": NS, "moeshard_deployment": "tiny"}
    assert metric["target"] == {"type": "Value", "value": quantity(next(iter(target.values())))}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 420
    assert build_autoscaler(d) == hpa


def test_scaled_object_matches_the_keda_fields_it_uses():
    d = _deployment(AUTO | {"engine": "keda", "minReplicas": 0, "target": {"kvCacheUsage": 0.75}})
    so = build_scaled_object(d)
    jsonschema.Draft202012Validator(KEDA_SCALED_OBJECT_SCHEMA).validate(so)
    trigger = so["spec"]["triggers"][0]
    assert trigger["metadata"]["query"] == 'moeshard_kv_cache_usage_per_replica{moeshard_namespace="test",moeshard_deployment="tiny"}'
    assert trigger["metadata"]["serverAddress"] == d.spec.load_balancing.prometheus_url
    assert so["spec"]["minReplicaCount"] == 0 and build_autoscaler(d) == so and len(so["spec"]["triggers"]) == 1
    woken = build_scaled_object(_deployment(AUTO | {"engine": "keda", "minReplicas": 0, "wakeQuery": "sum(gw)"}))
    jsonschema.Draft202012Validator(KEDA_SCALED_OBJECT_SCHEMA).validate(woken)
    assert [t["metadata"]["query"] for t in woken["spec"]["triggers"]][1] == "sum(gw)"
    assert woken["spec"]["triggers"][1]["metadata"]["activationThreshold"] == "0"
    assert build_autoscaler(_deployment(AUTO | {"enabled": False})) is None


def test_crd_scale_subresource_is_what_an_hpa_reads(crd):
    scale = crd["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.parallelism.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"replicas", "readyReplicas", "selector", "drainingReplicas", "observedGeneration"} <= set(status)


def test_quantities():
    assert [quantity(v) for v in (8, 0.8, 2.5, 0.0001)] == ["8", "800m", "2500m", "1m"]
    with pytest.raises(ValueError):
        quantity(0)


def test_recording_rules_example_is_generated_and_promtool_accepts_it(tmp_path):
    doc = yaml.safe_load((ROOT / "examples" / "autoscaling" / "recording-rules.yaml").read_text())
    assert doc["spec"] == build_recording_rules()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(doc["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", MOED_EXAMPLES, ids=lambda p: p.name)
def test_autoscaling_examples_pass_python_schema_cel_and_render(path, crd, check_builtin):
    from moeshard.operator.commands.render import render_objects

    body = yaml.safe_load(path.read_text())
    parse_resource(body)
    assert not _schema_errors(crd, body["spec"]) and not _cel_failures(body["spec"])
    objs = render_objects(body)
    autoscaler = objs[-1]
    if autoscaler["kind"] == "ScaledObject":
        jsonschema.Draft202012Validator(KEDA_SCALED_OBJECT_SCHEMA).validate(autoscaler)
    else:
        check_builtin(autoscaler)
    front = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == body["metadata"]["name"])
    assert front["spec"]["selector"][SERVING_LABEL] == "true"


# --------------------------------------------------------------------------- reconcile


def _create(custom, body):
    return custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)


def _live(custom, name="tiny"):
    return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _patch(custom, spec, name="tiny"):
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, {"spec": spec})


def _scale(custom, replicas, name="tiny"):
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, name, {"spec": {"replicas": replicas}})


def _play_controllers(kube, emulator, name="tiny"):
    """The StatefulSet controller and kubelet: each group ready, with its rank-0 pod."""
    for sts_name, sts in emulator.objects(STS, NS).items():
        n = sts["spec"]["replicas"]
        kube.patch("apps/v1", "statefulsets", NS, sts_name, {"status": {"replicas": n, "readyReplicas": n}},
                   subresource="status")
        pod_name = f"{sts_name}-0"
        if pod_name not in emulator.objects(PODS, NS):
            labels = dict(sts["spec"]["template"]["metadata"]["labels"]) | {"apps.kubernetes.io/pod-index": "0"}
            kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": pod_name, "namespace": NS, "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts_name,
                                     "uid": sts["metadata"]["uid"], "controller": True}]},
                "spec": {"containers": [{"name": "engine", "image": "x"}]}})


def _serving(emulator) -> dict[str, str]:
    return {n: p["metadata"]["labels"].get(SERVING_LABEL) for n, p in emulator.objects(PODS, NS).items()}


def test_the_autoscaler_follows_the_section(kube, custom, emulator, example, check_moed, check_builtin):
    _create(custom, check_moed(example("tiny-cpu", **{"spec.autoscaling": AUTO})))
    reconcile(kube, _live(custom))
    hpa = emulator.objects(HPA, NS)["tiny"]
    check_builtin(hpa)
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == _live(custom)["metadata"]["uid"]
    writes = kube.writes
    reconcile(kube, _live(custom))
    assert kube.writes == writes + 1  # only the status (Reconciling until the group is ready): HPA unchanged

    _patch(custom, {"autoscaling": {"engine": "keda"}})  # KEDA's CRD is missing: a Warning, no autoscaler
    outcome = reconcile(kube, _live(custom))
    assert ("Warning", "KEDAMissing") in {e[:2] for e in outcome.events}
    assert emulator.objects(HPA, NS) == {} and "spec.parallelism.replicas" not in str(outcome.events)
    emulator.call(lambda em: em.resources.__setitem__(*KEDA_RESOURCE))
    reconcile(kube, _live(custom))
    assert sorted(emulator.objects(SO, NS)) == ["tiny"]
    jsonschema.Draft202012Validator(KEDA_SCALED_OBJECT_SCHEMA).validate(emulator.objects(SO, NS)["tiny"])

    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"autoscaling": None}})
    reconcile(kube, _live(custom))
    assert emulator.objects(SO, NS) == {} and emulator.objects(HPA, NS) == {}


def test_scale_in_drains_the_newest_group_then_deletes_it(kube, custom, emulator, example, check_moed):
    auto = AUTO | {"drainTimeout": "2m"}
    _create(custom, check_moed(example("tiny-cpu", **{"spec.autoscaling": auto, "spec.parallelism.replicas": 3})))
    for _ in range(2):
        reconcile(kube, _live(custom), now="2026-12-01T00:00:00Z")
        _play_controllers(kube, emulator)
    reconcile(kube, _live(custom), now="2026-12-01T00:00:00Z")
    assert _serving(emulator) == {"tiny-r0-0": "true", "tiny-r1-0": "true", "tiny-r2-0": "true"}
    assert emulator.objects(SVC, NS)["tiny"]["spec"]["selector"][SERVING_LABEL] == "true"
    assert _live(custom)["status"]["phase"] == "Ready"

    _scale(custom, 1)  # what an HPA does through /scale
    outcome = reconcile(kube, _live(custom), now="2026-12-01T00:01:00Z")
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1", "tiny-r2"]  # kept while draining
    assert _serving(emulator) == {"tiny-r0-0": "true", "tiny-r1-0": "false", "tiny-r2-0": "false"}
    assert [e[1] for e in outcome.events].count("DrainingGroup") == 2
    assert emulator.objects(STS, NS)["tiny-r2"]["metadata"]["annotations"][DRAINING_ANNOTATION] == "2026-12-01T00:01:00Z"
    status = _live(custom)["status"]
    assert status["drainingReplicas"] == 2 and status["replicas"] == 1 and status["readyReplicas"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Reconciling"]["reason"] == "DrainingGroups" and conditions["Ready"]["status"] == "True"
    assert not outcome.settled

    _scale(custom, 2)  # scaled out again while draining: group 1 serves again, group 2 keeps draining
    outcome = reconcile(kube, _live(custom), now="2026-12-01T00:02:00Z")
    assert "DrainCancelled" in [e[1] for e in outcome.events]
    assert _serving(emulator)["tiny-r1-0"] == "true"
    assert DRAINING_ANNOTATION not in emulator.objects(STS, NS)["tiny-r1"]["metadata"].get("annotations", {})

    reconcile(kube, _live(custom), now="2026-12-01T00:02:59Z")  # 1:59 into the drain: still there
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1", "tiny-r2"]
    outcome = reconcile(kube, _live(custom), now="2026-12-01T00:03:00Z")  # drainTimeout reached
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1"]
    assert sorted(emulator.objects(PDB, NS)) == ["tiny-r0", "tiny-r1"]
    assert "tiny-r2-ranks" not in emulator.objects(SVC, NS)
    assert _live(custom)["status"]["drainingReplicas"] == 0 and outcome.settled


def test_scale_to_zero_keeps_plan_and_placement_and_comes_back_with_the_same_version(kube, custom, emulator,
                                                                                    example, check_moed):
    auto = AUTO | {"engine": "keda", "minReplicas": 0, "drainTimeout": "0s"}
    _create(custom, check_moed(example("tiny-cpu", **{"spec.autoscaling": auto})))
    reconcile(kube, _live(custom))
    placement = parse_placement(emulator.objects(CM, NS)["tiny-config"]["data"]["placement.json"]).with_version(4)
    kube.patch("v1", "configmaps", NS, "tiny-config", {"data": {"placement.json": placement.to_json()}})
    _scale(custom, 0)
    reconcile(kube, _live(custom))  # marks the group draining (drainTimeout 0s: deleted on the next pass)
    reconcile(kube, _live(custom))
    assert emulator.objects(STS, NS) == {} and sorted(emulator.objects(CM, NS)) == ["tiny-config"]
    assert _live(custom)["status"]["phase"] == "Ready" and _live(custom)["status"]["replicas"] == 0
    _scale(custom, 1)
    reconcile(kube, _live(custom))
    assert sorted(emulator.objects(STS, NS)) == ["tiny-r0"]
    cm = emulator.objects(CM, NS)["tiny-config"]
    assert parse_placement(cm["data"]["placement.json"]).version == 4
