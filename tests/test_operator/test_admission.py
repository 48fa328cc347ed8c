"""The emulator admits like an API server (support/kube_admission.py): each piece on its own, over HTTP
where the client's view matters, on the functions where the dialect does."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from moeshard.operator.kube import KubeError
from support.kube_admission import Admission, AdmissionError, Cause, apply_defaults, builtin_causes, schema_causes

NS = "test"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"
MINIMAL = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MoEDeployment", "metadata": {"name": "mini"},
           "spec": {"model": {"preset": "qwen3-30b-a3b", "weights": {"uri": "pvc://models/qwen3-30b"}},
                    "hardware": {"profile": "h100-hgx"}}}


def _refusal(call) -> dict:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 422
    return json.loads(info.value.body)


def _moed(**spec_changes) -> dict:
    body = json.loads(json.dumps(MINIMAL))
    for path, value in spec_changes.items():
        node = body["spec"]
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return body


# --------------------------------------------------------------------------- over HTTP


def test_defaults_fill_every_section_so_scale_and_columns_have_values(custom):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _moed())
    spec = created["spec"]
    assert spec["parallelism"]["replicas"] == 1  # the DP printer column, the scale subresource
    assert spec["engine"]["resources"] == {"cpu": "8", "memory": "64Gi"}
    assert spec["workload"]["contextLength"] == 4096 and spec["loadBalancing"]["interval"] == "5m"
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "mini")
    assert scale["spec"] == {"replicas": 1}


def test_refusal_has_the_api_servers_status_shape(custom):
    status = _refusal(lambda: custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, _moed(parallelism__replicas="2")))
    assert (status["kind"], status["status"], status["reason"], status["code"]) == ("Status", "Failure", "Invalid", 422)
    assert status["message"].startswith('MoEDeployment.moeshard.io "mini" is invalid: spec.parallelism.replicas: ')
    assert status["details"]["kind"] == "MoEDeployment" and status["details"]["name"] == "mini"
    assert status["details"]["causes"] == [{
        "reason": "FieldValueTypeInvalid", "field": "spec.parallelism.replicas",
        "message": 'Invalid value: "2": spec.parallelism.replicas in body must be of type integer: "2"'}]


@pytest.mark.parametrize("change, field, reason", [
    ({"parallelism__replicas": True}, "spec.parallelism.replicas", "FieldValueTypeInvalid"),
    ({"hardware__profile": "tpu-v5"}, "spec.hardware.profile", "FieldValueNotSupported"),
    ({"engine__resources__memory": "256GB"}, "spec.engine.resources.memory", "FieldValueInvalid"),
    ({"engine__resources__cpu": 1.5}, "spec.engine.resources.cpu", "FieldValueTypeInvalid"),
    ({"engine__scheduling__kueueQueue": "q" * 64}, "spec.engine.scheduling.kueueQueue", "FieldValueTooLong"),
    ({"parallelism__replicas": -1}, "spec.parallelism.replicas", "FieldValueInvalid"),
    ({"parallelism__surprise": 1}, "spec.parallelism.surprise", "FieldValueInvalid"),
    ({"hardware": {}}, "spec.hardware.profile", "FieldValueRequired"),
    ({"parallelism__expertEP": 5}, "spec.parallelism.expertEP", "FieldValueInvalid"),  # a CEL rule
    ({"engine__scheduling__nodeSelector": {"gpu type": "h100"}}, "spec.engine.scheduling.nodeSelector",
     "FieldValueInvalid"),  # a CEL rule over map keys
])
def test_schema_and_cel_refuse_naming_the_field(custom, change, field, reason):
    status = _refusal(lambda: custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _moed(**change)))
    assert [(c["field"], c["reason"]) for c in status["details"]["causes"]] == [(field, reason)]


def test_root_cel_rule_names_metadata_name(custom):
    body = _moed()
    body["metadata"]["name"] = "7b-model"
    status = _refusal(lambda: custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body))
    assert status["details"]["causes"][0]["field"] == "metadata.name"


def test_patch_is_admitted_on_the_merged_object_and_defaulted(custom):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _moed())
    _refusal(lambda: custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "mini", {"spec": {"workload": {"decodeBatch": "64"}}}))
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "mini", {"spec": {"workload": None}})
    assert patched["spec"]["workload"]["decodeBatch"] == 64  # removed, then defaulted again


def test_unchanged_invalid_fields_are_ratcheted_and_admission_can_be_switched_off(custom, emulator):
    emulator.set_admission(False)
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _moed(parallelism__replicas="2"))
    emulator.set_admission(True)
    status = custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "mini",
                                                          {"status": {"phase": "Failed"}})
    assert status["status"]["phase"] == "Failed"  # the old invalid value is not re-judged
    _refusal(lambda: custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "mini", {"spec": {"parallelism": {"replicas": "3"}}}))


def test_builtin_kinds_are_checked_with_kubernetes_validate(kube):
    """Raw JSON through the operator's own client (the official client refuses a string count itself)."""
    bad = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"},
           "spec": {"replicas": "2", "serviceName": "s", "selector": {"matchLabels": {"a": "b"}},
                    "template": {"metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    bad["metadata"]["namespace"] = NS
    with pytest.raises(KubeError) as info:
        kube.create(bad)
    assert info.value.status == 422 and info.value.reason == "Invalid"
    assert info.value.message.startswith('StatefulSet.apps "s" is invalid: spec.replicas: ')
    bad["spec"]["replicas"] = 2
    assert kube.create(bad)["spec"]["replicas"] == 2


def test_a_policy_refuses_and_nothing_is_stored(api, emulator):
    """Tests play an admission policy (used for the operator's ApplyRejected)."""
    def policy(plural, obj):
        return [Cause("FieldValueForbidden", "metadata.name", "denied by policy")] if plural == "configmaps" else []

    emulator.call(lambda em: em.admission.policies.append(policy))
    status = _refusal(lambda: client.CoreV1Api(api).create_namespaced_config_map(NS, {"metadata": {"name": "a"}}))
    assert status["message"] == 'ConfigMap "a" is invalid: metadata.name: denied by policy'
    assert emulator.objects("v1/configmaps", NS) == {}


# --------------------------------------------------------------------------- the dialect, directly


def test_int_or_string_nullable_and_preserve_unknown_fields():
    quantity = {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+$"}
    assert schema_causes(8, quantity, "q") == [] and schema_causes("8", quantity, "q") == []
    assert [c.reason for c in schema_causes(8.5, quantity, "q")] == ["FieldValueTypeInvalid"]
    assert [c.reason for c in schema_causes(True, quantity, "q")] == ["FieldValueTypeInvalid"]
    assert schema_causes(None, {"type": "string", "nullable": True}, "n") == []
    assert [c.reason for c in schema_causes(None, {"type": "string"}, "n")] == ["FieldValueTypeInvalid"]
    loose = {"type": "object", "properties": {"a": {"type": "integer"}}, "x-kubernetes-preserve-unknown-fields": True}
    assert schema_causes({"a": 1, "b": "anything"}, loose, "o") == []
    strict = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert [c.field for c in schema_causes({"a": 1, "b": 2}, strict, "o")] == ["o.b"]


def test_bounds_lengths_and_items():
    assert [c.reason for c in schema_causes(0, {"type": "number", "minimum": 0, "exclusiveMinimum": True}, "x")] == [
        "FieldValueInvalid"]
    assert schema_causes(0, {"type": "number", "minimum": 0}, "x") == []
    assert [c.reason for c in schema_causes([1, 2, 3], {"type": "array", "maxItems": 2}, "l")] == ["FieldValueTooMany"]
    assert [c.field for c in schema_causes(["a", 1], {"type": "array", "items": {"type": "string"}}, "l")] == ["l[1]"]
    assert [c.reason for c in schema_causes("", {"type": "string", "minLength": 1}, "s")] == ["FieldValueInvalid"]


def test_defaults_apply_top_down_into_defaulted_sections():
    schema = {"type": "object", "properties": {"p": {"type": "object", "default": {}, "properties": {
        "r": {"type": "integer", "default": 1}, "q": {"type": "object", "properties": {"z": {"default": 2}}}}}}}
    assert apply_defaults({}, schema) == {"p": {"r": 1}}  # q has no default: not created
    assert apply_defaults({"p": {"q": {}}}, schema) == {"p": {"r": 1, "q": {"z": 2}}}


def test_builtin_causes_skip_kinds_without_a_schema_and_admission_error_lists_causes():
    assert builtin_causes({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}) == []
    causes = builtin_causes({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
    assert causes and causes[0].field == "spec"
    error = AdmissionError("Pod", "", "p", causes * 2)
    assert error.message.startswith('Pod "p" is invalid: [') and error.status()["details"]["group"] == ""
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"any": 1}}
    assert Admission().admit("example.com", "v1", "widgets", widget) == widget  # no schema anywhere: admitted
