"""API validation, the generated CRD, and the agreement between Python and CEL rules."""

from __future__ import annotations

import copy
from pathlib import Path

import celpy
import kubernetes_validate
import pytest
import yaml

from moeshard.operator.api import SpecError, parse_resource, parse_spec
from moeshard.operator.crd import SPEC_RULES, build_crd, crd_yaml
from support.kube_admission import apply_defaults, schema_causes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
W = {"weights": {"uri": "hf://Qwen/Qwen3-235B-A22B"}}  # required in every model section
BASE = {"model": {"preset": "qwen3-235b-a22b", **W}, "hardware": {"profile": "gb200-nvl72"}}


def _with(**sections):
    spec = copy.deepcopy(BASE)
    for path, value in sections.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return spec


# (spec, field the error must name)
BAD_SPECS = [
    (_with(parallelism__expertEP=12), "spec.parallelism.expertEP"),
    (_with(parallelism__expertEP=256), "spec.parallelism.expertEP"),
    (_with(parallelism__expertEP=16, parallelism__attentionTP=3), "spec.parallelism.attentionTP"),
    (_with(parallelism__attentionTP=8), "spec.parallelism.attentionTP"),
    (_with(parallelism__replicas=-1), "spec.parallelism.replicas"),
    (_with(model={**W, "preset": "gpt-5"}), "spec.model.preset"),
    (_with(model={**W, }), "spec.model"),
    (_with(model={**W, "preset": "mixtral-8x7b", "architecture": {"type": "mixtral"}}), "spec.model.architecture.numLayers"),
    (_with(hardware={"profile": "tpu-v5"}), "spec.hardware.profile"),
    (_with(hardware={"profile": "h100-hgx", "custom": {"gpusPerNode": 8, "gpusPerDomain": 12}}), "spec.hardware.custom.gpusPerDomain"),
    (_with(loadBalancing__interval="5 minutes"), "spec.loadBalancing.interval"),
    (_with(loadBalancing__redundantSlots=-4), "spec.loadBalancing.redundantSlots"),
    (_with(loadBalancing__prometheusURL="prometheus:9090"), "spec.loadBalancing.prometheusURL"),
    (_with(workload__prefillTokens=0), "spec.workload.prefillTokens"),
    (_with(engine__groupKind="Deployment"), "spec.engine.groupKind"),
    (_with(model={**W, "architecture": {"type": "qwen3_moe", "numLayers": 2, "hiddenSize": 64, "numExperts": 4,
                                   "topK": 8, "expertIntermediateSize": 32, "numAttentionHeads": 4,
                                   "numKVHeads": 2, "headDim": 16, "vocabSize": 128}}), "spec.model.architecture.topK"),
    (_with(model={**W, "preset": "qwen3-235b-a22b", "weights": {"uri": "ftp://x"}}), "spec.model.weights.uri"),
    (_with(model={**W, "preset": "deepseek-v3"}), "spec.model.preset"),
    (_with(model={**W, "architecture": {"type": "deepseek_v3", "numLayers": 4, "hiddenSize": 64, "numExperts": 8,
                                   "topK": 2, "expertIntermediateSize": 32, "numAttentionHeads": 4,
                                   "numKVHeads": 4, "headDim": 16, "vocabSize": 128}}), "spec.model.architecture.type"),
    (_with(model={**W, "architecture": {"type": "qwen3_moe", "numLayers": 4, "hiddenSize": 64, "numExperts": 8,
                                   "topK": 2, "expertIntermediateSize": 32, "numAttentionHeads": 4,
                                   "numKVHeads": 4, "headDim": 16, "vocabSize": 128, "firstDenseLayers": 1}}),
     "spec.model.architecture.firstDenseLayers"),
    (_with(engine__port=29500), "spec.engine.port"),
    (_with(loadBalancing__interval="0m0s"), "spec.loadBalancing.interval"),
    (_with(loadBalancing__window="0s"), "spec.loadBalancing.window"),
    (_with(model={**W, "preset": "qwen3-235b-a22b", "architecture": {
        "type": "qwen3_moe", "numLayers": 2, "hiddenSize": 64, "numExperts": 8, "topK": 2,
        "expertIntermediateSize": 32, "numAttentionHeads": 4, "numKVHeads": 2, "headDim": 16, "vocabSize": 128}}),
     "spec.model"),
]
# Strict types and the API server's own patterns (issue 10): Python, the schema and CEL refuse them alike.
BAD_SPECS += [
    (_with(parallelism__replicas="2"), "spec.parallelism.replicas"),
    (_with(parallelism__replicas=False), "spec.parallelism.replicas"),
    (_with(parallelism__allowCrossDomain="true"), "spec.parallelism.allowCrossDomain"),
    (_with(workload__contextLength="4096"), "spec.workload.contextLength"),
    (_with(engine__resources__memory="256GB"), "spec.engine.resources.memory"),
    (_with(engine__resources__cpu="32 cores"), "spec.engine.resources.cpu"),
    (_with(engine__resources__cpu=0.5), "spec.engine.resources.cpu"),
    (_with(engine__resources__cpu=True), "spec.engine.resources.cpu"),
    (_with(engine__scheduling__kueueQueue="gpu queue"), "spec.engine.scheduling.kueueQueue"),
    (_with(engine__scheduling__kueueQueue="q" * 64), "spec.engine.scheduling.kueueQueue"),
    (_with(engine__scheduling__priorityClassName="High Priority"), "spec.engine.scheduling.priorityClassName"),
    (_with(engine__scheduling__nodeSelector={"gpu": "H100 SXM"}), "spec.engine.scheduling.nodeSelector.gpu"),
    (_with(engine__scheduling__nodeSelector={"gpu type": "h100"}), "spec.engine.scheduling.nodeSelector"),
    (_with(engine__scheduling__topologyAnnotations={"-bad": "x"}), "spec.engine.scheduling.topologyAnnotations"),
    (_with(engine__scheduling__tolerations=[{"key": "a b"}]), "spec.engine.scheduling.tolerations.0.key"),
    (_with(engine__scheduling__tolerations=[{"value": "a b"}]), "spec.engine.scheduling.tolerations.0.value"),
    (_with(hardware__custom={"memoryGB": True}), "spec.hardware.custom.memoryGB"),
]
# spec.model.weights: required, and its cache volume's fields (operator/api_weights.py).
BAD_SPECS += [
    (_with(model={"preset": "qwen3-235b-a22b"}), "spec.model.weights"),
    (_with(model__weights={"uri": "hf://Qwen/Qwen3-235B-A22B", "cache": {"accessMode": "ReadWriteAll"}}),
     "spec.model.weights.cache.accessMode"),
    (_with(model__weights={"uri": "hf://Qwen/Qwen3-235B-A22B", "cache": {"storageClassName": "Fast SSD"}}),
     "spec.model.weights.cache.storageClassName"),
    (_with(model__weights={"uri": "hf://Qwen/Qwen3-235B-A22B", "cache": {"size": "500GB"}}),
     "spec.model.weights.cache.size"),
    (_with(model__weights={"uri": "hf://Qwen/Qwen3-235B-A22B", "revision": "main branch"}),
     "spec.model.weights.revision"),
]
UNKNOWN_FIELD = (_with(parallelism__expertEp=16), "spec.parallelism.expertEp")


@pytest.mark.parametrize("spec, field", BAD_SPECS + [UNKNOWN_FIELD])
def test_bad_spec_names_its_field_in_one_line(spec, field):
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.field == field
    assert "\n" not in str(info.value) and str(info.value).startswith(field + ": ")


def test_resource_envelope_errors():
    body = {"apiVersion": "moeshard.io/v1alpha1", "kind": "MoEDeployment", "metadata": {"name": "Bad_Name"}, "spec": BASE}
    with pytest.raises(SpecError) as info:
        parse_resource(body)
    assert info.value.field == "metadata.name"
    with pytest.raises(SpecError) as info:
        parse_resource({**body, "apiVersion": "v1"})
    assert info.value.field == "apiVersion"


# --------------------------------------------------------------------------- CRD


def _crd_schema():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_is_in_sync():
    text = crd_yaml()
    for path in ("crds/moedeployments.yaml", "charts/moeshard/crds/moedeployments.yaml"):
        assert (ROOT / path).read_text() == text, f"{path} is stale: run `moeshard crd`"


def test_crd_validates_as_kubernetes_object():
    kubernetes_validate.validate(build_crd(), "1.33", strict=True)


def _walk(schema, path="$"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural_and_explained():
    schema = _crd_schema()
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        if path != "$.metadata" and not path.endswith("{}"):
            assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if path.startswith(("$.spec", "$.status")) and not path.endswith("[]") and not path.endswith("{}"):
            assert node.get("description"), f"{path} has no description (kubectl explain)"


def _cel_failures(spec: dict) -> list[str]:
    env = celpy.Environment()
    failures = []
    for path, rules in SPEC_RULES.items():
        node = {"spec": spec}
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            continue
        for rule in rules:
            result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(node)})
            if not bool(result):
                failures.append(rule["message"])
    return failures


def _schema_errors(spec: dict) -> list[str]:
    """The structural schema in the API server's dialect (int-or-string, defaults) -- not plain JSON Schema."""
    schema = _crd_schema()["properties"]["spec"]
    return [c.message for c in schema_causes(apply_defaults(copy.deepcopy(spec), schema), schema, "spec")]


@pytest.mark.parametrize("spec, field", BAD_SPECS)
def test_api_server_rejects_what_python_rejects(spec, field):
    """The CRD (schema + CEL) refuses every spec the Python models refuse."""
    assert _schema_errors(spec) or _cel_failures(spec), f"the CRD would accept a spec with a bad {field}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_python_crd_schema_cel_and_the_planner(path):
    body = yaml.safe_load(path.read_text())
    spec = parse_resource(body)
    assert not _schema_errors(body["spec"])
    assert not _cel_failures(body["spec"])
    from moeshard.operator.planner import plan_for_spec

    assert plan_for_spec(spec).chosen.feasible


@pytest.mark.parametrize("name, ok", [("qwen3", True), ("a" * 40, True), ("7b-mixtral", False), ("a" * 41, False),
                                      ("Qwen", False), ("x-", False)])
def test_name_rule_in_python_and_cel_agree(name, ok):
    from moeshard.operator.crd import NAME_RULE

    env = celpy.Environment()
    body = {"apiVersion": "moeshard.io/v1alpha1", "kind": "MoEDeployment", "metadata": {"name": name}, "spec": BASE}
    cel_ok = bool(env.program(env.compile(NAME_RULE["rule"])).evaluate({"self": celpy.json_to_cel(body)}))
    try:
        parse_resource(body)
        python_ok = True
    except SpecError as exc:
        python_ok = False
        assert exc.field == "metadata.name"
    assert cel_ok == python_ok == ok


KEYS = [("nvidia.com/gpu.product", True), ("gpu", True), ("a.b-c_d", True), ("example.com/" + "n" * 63, True),
        ("gpu type", False), ("-gpu", False), ("Example.com/gpu", False), ("n" * 64, False), ("a/b/c", False),
        ("example.com/", False), ("x" * 320 + ".io/n", False)]


@pytest.mark.parametrize("key, ok", KEYS, ids=lambda v: str(v)[:20])
def test_qualified_key_rule_in_python_and_cel_agree(key, ok):
    spec = _with(engine__scheduling__nodeSelector={key: "v"})
    try:
        parse_spec(spec)
        python_ok = True
    except SpecError as exc:
        python_ok = False
        assert exc.field == "spec.engine.scheduling.nodeSelector"
    cel_ok = not _cel_failures(spec)
    assert python_ok == cel_ok == ok


VALUES = [("8", True), (8, True), ("500m", True), ("64Gi", True), ("1.5", True), ("1e3", True), ("0", True),
          ("256GB", False), ("32 cores", False), ("-1", False), ("", False), (0.5, False), (True, False), ("Gi", False)]


@pytest.mark.parametrize("value, ok", VALUES, ids=repr)
def test_quantity_in_python_and_schema_agree(value, ok):
    spec = _with(engine__resources__memory=value)
    try:
        parse_spec(spec)
        python_ok = True
    except SpecError as exc:
        python_ok = False
        assert exc.field == "spec.engine.resources.memory"
    assert python_ok == (not _schema_errors(spec)) == ok


def test_every_section_defaults_to_an_empty_object_in_the_crd():
    """default: {} so the API server fills a missing section (scale subresource, printer columns)."""
    spec = _crd_schema()["properties"]["spec"]
    for section in ("parallelism", "workload", "loadBalancing", "engine"):
        assert spec["properties"][section]["default"] == {}, section
    for section in ("resources", "scheduling", "restartBudget"):
        assert spec["properties"]["engine"]["properties"][section]["default"] == {}, section
    minimal = apply_defaults(copy.deepcopy(BASE), spec)
    assert minimal["parallelism"]["replicas"] == 1
    assert parse_spec(minimal) == parse_spec(BASE)  # the CRD's defaults are the models' defaults
