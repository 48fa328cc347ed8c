"""Pure builders and ``moeshard render``: shapes per hardware, scheduling hooks, validity."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from moeshard.core import naming
from moeshard.core.naming import GPU_RESOURCE
from moeshard.operator.deployment import Deployment
from moeshard.operator.api import parse_resource
from moeshard.cli.main import main
from moeshard.operator.commands.render import PLACEHOLDER_UID, render_objects
from moeshard.core.engine_env import EngineEnvironment
from moeshard.operator.manifests import (
    CLIQUE_LABEL, HASH_ANNOTATION, KUEUE_QUEUE_LABEL, build_all, desired_hash,
)
from moeshard.core.placement import parse_placement
from moeshard.operator.planner import plan_for_spec
from moeshard.operator.weights import build_weights_objects

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))


def _qwen(profile: str, **spec_changes) -> dict:
    body = {
        "apiVersion": "moeshard.io/v1alpha1", "kind": "MoEDeployment",
        "metadata": {"name": "qwen3", "namespace": "serving", "uid": "1234"},
        "spec": {"model": {"preset": "qwen3-235b-a22b", "weights": {"uri": "pvc://models/qwen3-235b"}},
                 "hardware": {"profile": profile},
                 "parallelism": {"replicas": 2}},
    }
    body["spec"].update(spec_changes)
    return body


def _kinds(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def _container(sts):
    return sts["spec"]["template"]["spec"]["containers"][0]


def test_qwen3_on_gb200_is_two_groups_of_four_pods_of_four_gpus_with_clique_affinity(check_moed):
    objs = render_objects(check_moed(_qwen("gb200-nvl72")))
    groups = _kinds(objs, "StatefulSet")
    assert [g["metadata"]["name"] for g in groups] == ["qwen3-r0", "qwen3-r1"]
    for r, sts in enumerate(groups):
        assert sts["spec"]["replicas"] == 4
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["serviceName"] == f"qwen3-r{r}-ranks"
        assert _container(sts)["resources"]["limits"][GPU_RESOURCE] == "4"
        term = sts["spec"]["template"]["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]
        assert term == [{"topologyKey": CLIQUE_LABEL, "labelSelector": {"matchLabels": sts["spec"]["selector"]["matchLabels"]}}]
        assert sts["spec"]["selector"]["matchLabels"][naming.LABEL_REPLICA] == str(r)
        env = {e["name"]: e.get("value") for e in _container(sts)["env"]}
        assert (env["MOESHARD_EXPERT_EP"], env["MOESHARD_ATTENTION_TP"]) == ("16", "4")
        assert env["MOESHARD_RENDEZVOUS"] == f"qwen3-r{r}-0.qwen3-r{r}-ranks.serving.svc:29500"


def test_qwen3_on_h100_is_one_pod_of_eight_gpus_per_replica(check_moed):
    objs = render_objects(check_moed(_qwen("h100-hgx", parallelism={"replicas": 2, "expertEP": 8})))
    groups = _kinds(objs, "StatefulSet")
    assert len(groups) == 2
    for sts in groups:
        assert sts["spec"]["replicas"] == 1
        assert _container(sts)["resources"]["limits"][GPU_RESOURCE] == "8"
        assert "affinity" not in sts["spec"]["template"]["spec"]  # one pod: one node, one NVLink domain
        assert _container(sts)["readinessProbe"]["httpGet"]["path"] == "/readyz"  # pod 0 serves it


def test_group_past_the_hgx_domain_needs_permission_and_gets_no_clique_affinity(check_moed):
    with pytest.raises(Exception) as err:
        render_objects(_qwen("h100-hgx", parallelism={"replicas": 1, "expertEP": 16}))
    assert err.value.field.startswith("spec.parallelism")
    body = check_moed(_qwen("h100-hgx", parallelism={"replicas": 1, "expertEP": 16, "allowCrossDomain": True}))
    sts = _kinds(render_objects(body), "StatefulSet")[0]
    assert sts["spec"]["replicas"] == 2 and _container(sts)["resources"]["limits"][GPU_RESOURCE] == "8"
    assert "affinity" not in sts["spec"]["template"]["spec"]  # crosses the fabric: no clique to share


def test_cpu_profile_requests_no_gpus(example):
    objs = render_objects(example("tiny-cpu"))
    container = _container(_kinds(objs, "StatefulSet")[0])
    assert GPU_RESOURCE not in container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOESHARD_DEVICE"] == "cpu"


def test_engine_env_parses_back_for_every_pod_index(example):
    objs = render_objects(example("tiny-cpu", **{"spec.parallelism.replicas": 2}))
    for sts in _kinds(objs, "StatefulSet"):
        env = _container(sts)["env"]
        pod_index = next(e for e in env if e["name"] == "MOESHARD_POD_INDEX")
        assert pod_index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        for index in range(sts["spec"]["replicas"]):
            environ = {e["name"]: e.get("value", str(index)) for e in env}
            parsed = EngineEnvironment.from_environ(environ)
            assert parsed.replica_index == int(sts["metadata"]["labels"][naming.LABEL_REPLICA])
            assert parsed.pods_per_group * parsed.gpus_per_pod == parsed.expert_ep


def test_every_child_is_owned_labelled_and_hashed(example):
    objs = render_objects(example("tiny-cpu"))
    for obj in objs:
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "moeshard.io/v1alpha1", "kind": "MoEDeployment",
                                            "name": "tiny", "uid": PLACEHOLDER_UID, "controller": True,
                                            "blockOwnerDeletion": True}]
        assert meta["labels"][naming.LABEL_DEPLOYMENT] == "tiny"
        assert meta["annotations"][HASH_ANNOTATION] == desired_hash(obj)


def test_config_map_holds_the_plan_and_a_valid_version_zero_placement(example):
    body = example("tiny-cpu")
    cm = _kinds(render_objects(body), "ConfigMap")[0]
    plan = json.loads(cm["data"]["plan.json"])
    assert plan["chosen"]["expertEP"] == 4
    placement = parse_placement(cm["data"]["placement.json"])
    assert placement.version == 0 and placement.num_gpus == 4
    assert placement.num_slots == 8 + body["spec"]["loadBalancing"]["redundantSlots"]


def test_front_service_selects_rank_zero_of_every_group(example):
    objs = render_objects(example("tiny-cpu", **{"spec.parallelism.replicas": 3}))
    front = next(s for s in _kinds(objs, "Service") if s["metadata"]["name"] == "tiny")
    assert front["spec"]["selector"] == {naming.LABEL_NAME: "moeshard-engine", naming.LABEL_DEPLOYMENT: "tiny",
                                         "apps.kubernetes.io/pod-index": "0"}
    headless = [s for s in _kinds(objs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == ["tiny-r0-ranks", "tiny-r1-ranks", "tiny-r2-ranks"]
    pdbs = _kinds(objs, "PodDisruptionBudget")
    assert [p["spec"]["minAvailable"] for p in pdbs] == [1, 1, 1]


def test_scheduling_hooks_reach_the_pods(check_moed):
    scheduling = {
        "nodeSelector": {"pool": "gb200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "inference-high", "kueueQueue": "team-a",
        "topologyAnnotations": {"kueue.x-k8s.io/podset-required-topology": CLIQUE_LABEL},
        "computeDomain": True,
    }
    objs = render_objects(check_moed(_qwen("gb200-nvl72", engine={"scheduling": scheduling})))
    sts = _kinds(objs, "StatefulSet")[0]
    pod = sts["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"pool": "gb200"}
    assert pod["spec"]["tolerations"] == scheduling["tolerations"]
    assert pod["spec"]["priorityClassName"] == "inference-high"
    assert pod["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert sts["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert pod["metadata"]["annotations"] == scheduling["topologyAnnotations"]
    domains = _kinds(objs, "ComputeDomain")
    assert [d["spec"]["numNodes"] for d in domains] == [4, 4]
    claim = domains[0]["spec"]["channel"]["resourceClaimTemplate"]["name"]
    assert pod["spec"]["resourceClaims"] == [{"name": "compute-domain", "resourceClaimTemplateName": claim}]
    assert _container(sts)["resources"]["claims"] == [{"name": "compute-domain"}]


def test_leaderworkerset_group(check_moed):
    objs = render_objects(check_moed(_qwen("gb200-nvl72", engine={"groupKind": "LeaderWorkerSet"})))
    assert not _kinds(objs, "StatefulSet")
    lws = _kinds(objs, "LeaderWorkerSet")
    assert [l["spec"]["leaderWorkerTemplate"]["size"] for l in lws] == [4, 4]
    assert lws[0]["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    env = lws[0]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["env"]
    pod_index = next(e for e in env if e["name"] == "MOESHARD_POD_INDEX")
    assert "leaderworkerset.sigs.k8s.io/worker-index" in pod_index["valueFrom"]["fieldRef"]["fieldPath"]
    front = next(s for s in _kinds(objs, "Service") if s["metadata"]["name"] == "qwen3")
    assert front["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("variant", ["plain", "hooks"])
def test_every_built_in_object_passes_kubernetes_validate(name, variant, example, check_moed, check_builtin):
    body = example(name)
    if variant == "hooks":
        body["spec"].setdefault("engine", {})["scheduling"] = {
            "nodeSelector": {"a": "b"}, "priorityClassName": "p", "kueueQueue": "q", "computeDomain": True,
            "tolerations": [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute",
                             "tolerationSeconds": 30}],
            "topologyAnnotations": {"x/y": "z"},
        }
        body["spec"]["model"]["weights"] = {"uri": "file:///models/x"}
    check_moed(body)
    for obj in render_objects(body):
        check_builtin(obj)


def test_render_prints_exactly_the_builders_output(tmp_path, capsys, example):
    body = example("qwen3-235b-gb200")
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["render", str(path)]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    spec = parse_resource(body)
    d = Deployment(body["metadata"]["name"], body["metadata"]["namespace"], PLACEHOLDER_UID, spec, plan_for_spec(spec))
    assert printed == build_weights_objects(d) + build_all(d)


def test_render_names_the_bad_field(tmp_path, capsys, example):
    body = example("tiny-cpu", **{"spec.parallelism.expertEP": 5, "spec.parallelism.attentionTP": 1})
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["render", str(path)]) == 2
    assert "spec.parallelism.expertEP" in capsys.readouterr().err


@pytest.mark.parametrize("name, pods, gpus, clique", [("qwen3-235b-gb200", 4, 4, True), ("qwen3-235b-h100", 1, 8, False)])
def test_done_when_examples_render_the_expected_groups(name, pods, gpus, clique, example, check_moed):
    """Issue 5, done when: Qwen3-235B, 2 replicas: gb200 -> 2 groups of 4 pods x 4 GPUs with clique
    affinity; h100 -> 2 pods x 8 GPUs (the planner's own choice of EP)."""
    body = check_moed(example(name))
    assert body["spec"]["parallelism"]["replicas"] == 2 and "expertEP" not in body["spec"]["parallelism"]
    groups = _kinds(render_objects(body), "StatefulSet")
    assert len(groups) == 2
    for sts in groups:
        assert sts["spec"]["replicas"] == pods
        assert _container(sts)["resources"]["limits"][GPU_RESOURCE] == str(gpus)
        affinity = sts["spec"]["template"]["spec"].get("affinity", {})
        assert ("podAffinity" in affinity) == clique


def test_hf_weights_are_downloaded_by_one_job_into_a_claim_the_pods_mount_read_only(check_moed, check_builtin):
    weights = {"uri": "hf://Qwen/Qwen3-235B-A22B", "revision": "v1", "tokenSecret": "hf-token",
               "cache": {"storageClassName": "fast-rwx", "accessMode": "ReadOnlyMany"}}
    body = check_moed(_qwen("h100-hgx", model={"preset": "qwen3-235b-a22b", "weights": weights}))
    objs = render_objects(body)
    (claim,), (job,) = _kinds(objs, "PersistentVolumeClaim"), _kinds(objs, "Job")
    for obj in (claim, job):
        check_builtin(obj)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "1234"
    name = claim["metadata"]["name"]
    assert name == job["metadata"]["name"] and name.startswith("qwen3-weights-") and len(name) <= 63
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce", "ReadOnlyMany"]
    assert claim["spec"]["storageClassName"] == "fast-rwx"
    assert claim["spec"]["resources"]["requests"]["storage"] == "482Gi"  # 235B x 2 bytes + 10%, in Gi
    pod = job["spec"]["template"]["spec"]
    (fetch,) = pod["containers"]
    assert fetch["command"] == ["moeshard", "engine", "fetch", "--uri", "hf://Qwen/Qwen3-235B-A22B",
                                "--out", "/models", "--revision", "v1"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in fetch["env"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": name}} in pod["volumes"]
    assert job["spec"]["backoffLimit"] >= 1 and pod["restartPolicy"] == "Never"
    assert "moeshard.io/deployment" not in job["spec"]["template"]["metadata"]["labels"]  # not an engine pod
    for sts in _kinds(objs, "StatefulSet"):
        template = sts["spec"]["template"]["spec"]
        assert "initContainers" not in template
        assert {"name": "model", "persistentVolumeClaim": {"claimName": name, "readOnly": True}} in template["volumes"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in template["containers"][0]["volumeMounts"]
    # another revision is another cache (the old one is not overwritten while groups serve from it)
    other = _qwen("h100-hgx", model={"preset": "qwen3-235b-a22b", "weights": weights | {"revision": "v2"}})
    assert _kinds(render_objects(other), "Job")[0]["metadata"]["name"] != name


def test_pvc_weights_need_no_fetch(example):
    objs = render_objects(example("tiny-cpu"))
    sts = _kinds(objs, "StatefulSet")[0]
    assert "initContainers" not in sts["spec"]["template"]["spec"]
    assert not _kinds(objs, "Job") and not _kinds(objs, "PersistentVolumeClaim")


def test_engine_domain_size_is_the_planners_for_cross_domain_groups(check_moed):
    """GB200 NVL72 at EP 128: the planner splits the group into 2 domains of 64 ranks; the engine
    must be told 64 (not the rack's 72), or it refuses the world size."""
    from moeshard.engine.config import ParallelConfig  # the engine's own parser of the contract

    body = check_moed(_qwen("gb200-nvl72", parallelism={"replicas": 1, "expertEP": 128, "allowCrossDomain": True}))
    sts = _kinds(render_objects(body), "StatefulSet")[0]
    env = {e["name"]: e.get("value") for e in _container(sts)["env"]}
    assert env["MOESHARD_GPUS_PER_DOMAIN"] == "64"
    environ = {k: v for k, v in env.items() if v is not None} | {"MOESHARD_POD_INDEX": "31"}
    parallel = ParallelConfig.from_env(EngineEnvironment.from_environ(environ), local_rank=3)
    assert parallel.world_size == 128


def test_podmonitor_example_selects_the_pods_that_serve_metrics(example):
    """examples/monitoring/podmonitor.yaml must match rank 0 of a rendered group, on its named port."""
    monitor = yaml.safe_load((ROOT / "examples" / "monitoring" / "podmonitor.yaml").read_text())
    sts = _kinds(render_objects(example("tiny-cpu")), "StatefulSet")[0]
    template = sts["spec"]["template"]
    labels = dict(template["metadata"]["labels"]) | {"apps.kubernetes.io/pod-index": "0"}  # set by the controller
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in _container(sts)["ports"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_multi_pod_groups_are_ready_only_when_the_engine_says_so(check_moed):
    from moeshard.core.engine_env import READY_FILE

    sts = _kinds(render_objects(check_moed(_qwen("gb200-nvl72"))), "StatefulSet")[0]
    container = _container(sts)
    assert sts["spec"]["replicas"] == 4
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", READY_FILE]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOESHARD_READY_FILE"] == READY_FILE
