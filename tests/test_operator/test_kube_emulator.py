"""Each behaviour KubeEmulator adds to kmock's KubernetesEmulator, checked over HTTP with the official client."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

NS = "test"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"


def _moed(example, name: str = "tiny") -> dict:
    body = example("tiny-cpu")
    body["metadata"]["name"] = name
    return body


def test_create_sets_identity_and_answers_201(api):
    core = client.CoreV1Api(api)
    created, status_code, _ = core.create_namespaced_config_map_with_http_info(
        NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}})
    assert status_code == 201
    meta = created.metadata
    assert meta.uid and meta.resource_version and meta.generation == 1 and meta.creation_timestamp
    assert meta.namespace == NS
    second = core.create_namespaced_config_map(NS, {"metadata": {"name": "b"}})
    assert int(second.metadata.resource_version) > int(meta.resource_version)
    assert second.metadata.uid != meta.uid


def test_create_of_an_existing_name_is_409(api):
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "a"}})
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "a"}})
    assert err.value.status == 409


def test_generate_name_is_honoured(api):
    event = client.CoreV1Api(api).create_namespaced_event(NS, {
        "metadata": {"generateName": "kopf-event-"}, "involvedObject": {"name": "x"}, "reason": "R"})
    assert event.metadata.name.startswith("kopf-event-") and len(event.metadata.name) > len("kopf-event-")


def test_status_subresource_is_kept_apart_from_spec(custom, example, check_moed):
    body = check_moed(_moed(example)) | {"status": {"phase": "Ready"}}
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    assert "status" not in created  # status on create is ignored
    # status in a main-object patch is ignored; the spec change bumps generation
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"parallelism": {"replicas": 2}}, "status": {"phase": "Ready"}})
    assert "status" not in patched and patched["metadata"]["generation"] == 2
    # spec in a status patch is ignored; generation stays
    patched = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"parallelism": {"replicas": 5}}, "status": {"phase": "Ready"}})
    assert patched["status"] == {"phase": "Ready"}
    assert patched["spec"]["parallelism"]["replicas"] == 2 and patched["metadata"]["generation"] == 2


def test_generation_grows_only_on_spec_changes(custom, example, check_moed):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_moed(example)))
    rv0 = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")["metadata"]["resourceVersion"]
    labelled = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                                     {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > int(rv0)
    same = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny",
                                                 {"spec": {"parallelism": {"replicas": 1}}})
    assert same["metadata"]["generation"] == 1  # replicas was 1 already


def test_stale_resource_version_is_409(kube, emulator):
    cm = kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": NS}})
    rv = cm["metadata"]["resourceVersion"]
    kube.patch("v1", "configmaps", NS, "a", {"metadata": {"resourceVersion": rv}, "data": {"k": "1"}})
    with pytest.raises(Exception) as err:
        kube.patch("v1", "configmaps", NS, "a", {"metadata": {"resourceVersion": rv}, "data": {"k": "2"}})
    assert err.value.status == 409
    assert emulator.emulator.conflicts == ["ConfigMap/a"]
    assert kube.get("v1", "configmaps", NS, "a")["data"] == {"k": "1"}


def test_json_patch_test_failure_is_422(kube):
    cm = kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": NS}})
    rv = cm["metadata"]["resourceVersion"]
    ok = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
          {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
    done = kube.request("PATCH", f"/api/v1/namespaces/{NS}/configmaps/a", ok,
                        content_type="application/json-patch+json")
    assert done["metadata"]["finalizers"] == ["x"]
    with pytest.raises(Exception) as err:  # same rv again: stale now
        kube.request("PATCH", f"/api/v1/namespaces/{NS}/configmaps/a", ok, content_type="application/json-patch+json")
    assert err.value.status == 422


def test_scale_subresource_maps_to_spec_parallelism_replicas(custom, example, check_moed):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(_moed(example)))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "tiny",
                                                 {"status": {"replicas": 1, "selector": "a=b"}})
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny")
    assert scale["kind"] == "Scale" and scale["spec"] == {"replicas": 1}
    assert scale["status"] == {"replicas": 1, "selector": "a=b"}
    scaled = custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny", {"spec": {"replicas": 3}})
    assert scaled["spec"]["replicas"] == 3
    body = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")
    assert body["spec"]["parallelism"]["replicas"] == 3 and body["metadata"]["generation"] == 2


def test_discovery_declares_namespaces_and_the_crd_subresources(kube):
    core = kube.request("GET", "/api/v1")
    assert "namespaces" in {r["name"] for r in core["resources"]}
    assert kube.request("GET", "/api/v1/namespaces")["items"][0]["metadata"]["name"] == NS
    ours = {r["name"]: r for r in kube.request("GET", f"/apis/{GROUP}/{VERSION}")["resources"]}
    assert {"moedeployments", "moedeployments/status", "moedeployments/scale"} <= set(ours)
    assert ours["moedeployments"]["namespaced"] is True and ours["moedeployments"]["kind"] == "MoEDeployment"


def test_list_honours_equality_label_selectors(kube):
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "x"}), ("c", {"app": "y"})):
        kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS,
                                                                           "labels": labels}})

    def names(selector):
        data = kube.request("GET", f"/api/v1/namespaces/{NS}/configmaps", query={"labelSelector": selector})
        return sorted(i["metadata"]["name"] for i in data["items"])

    assert names("app=x") == ["a", "b"]
    assert names("app==x,tier=1") == ["a"]
    assert names("app!=x") == ["c"]
    assert names("tier") == ["a"] and names("!tier") == ["b", "c"]
