"""Desired child objects of a MoEDeployment: pure functions returning plain dicts.

Nothing here talks to the API server. The operator (handlers.py) and
``moeshard render`` call the same builders, so what ``render`` prints is what
the operator creates.

Objects of one MoEDeployment ``NAME`` with R replicas (DP groups), each group
of P pods x G GPUs (P x G = EP ranks):

    ConfigMap             NAME-config            plan.json + placement.json (mounted at /etc/moeshard)
    Service               NAME                   rank 0 of every group (the completions API)
    per replica r < R:
      Service (headless)  NAME-r<r>-ranks        stable pod DNS; pod 0 is the rendezvous
      StatefulSet         NAME-r<r>              P pods, parallel start (or a LeaderWorkerSet of size P)
      PodDisruptionBudget NAME-r<r>              no voluntary eviction from a healthy group
      ComputeDomain       NAME-r<r>              NVIDIA DRA IMEX domain (only with scheduling.computeDomain)

Placement rules (from the plan, see planner.py):
  * a pod never holds more GPUs than one node; an attention TP group never
    crosses a pod (TP <= GPUs per pod, the API checks TP <= GPUs per node);
  * a group of several pods that must stay inside one NVLink domain larger
    than a node (GB200 NVL72) gets a REQUIRED pod affinity on
    ``nvidia.com/gpu.clique`` selecting the group's own pods;
  * a group the plan lets cross the fabric (``crossesFabric``) gets no clique
    affinity: it cannot fit one domain anyway.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from . import naming
from .api import API_VERSION, KIND, MoEDeploymentSpec
from .engine_env import (
    CONFIG_MOUNT, MODEL_MOUNT, POD_INDEX_LABEL, PREFIX, READY_FILE, RENDEZVOUS_PORT, build_engine_env,
)
from .hardware import HardwareProfile
from .placement import PLACEMENT_KEY, PLAN_KEY, Placement, initial_placement
from .planner import Plan, ranks_per_domain

CLIQUE_LABEL = "nvidia.com/gpu.clique"
GPU_RESOURCE = "nvidia.com/gpu"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
HASH_ANNOTATION = "moeshard.io/desired-hash"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
COMPUTE_DOMAIN_API_VERSION = "resource.nvidia.com/v1beta1"
COMPUTE_DOMAIN_CLAIM = "compute-domain"
ENGINE_CONTAINER = "engine"
ENGINE_COMMAND = ["moeshard", "engine", "serve"]
FETCH_COMMAND = ["moeshard", "engine", "fetch"]
COMPONENT_ENGINE = "engine"
COMPONENT_CONFIG = "config"
COMPONENT_SERVICE = "service"

# Kinds the operator writes: kind -> (apiVersion, plural). kube.py routes by this table.
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "StatefulSet": ("apps/v1", "statefulsets"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "LeaderWorkerSet": (LWS_API_VERSION, "leaderworkersets"),
    "ComputeDomain": (COMPUTE_DOMAIN_API_VERSION, "computedomains"),
    KIND: (API_VERSION, "moedeployments"),
}
# Kinds kubernetes-validate has no schema for (custom resources of other projects).
CUSTOM_KINDS = frozenset({"LeaderWorkerSet", "ComputeDomain", KIND})


@dataclass(frozen=True)
class Deployment:
    """One MoEDeployment as the builders see it: identity, validated spec and plan."""

    name: str
    namespace: str
    uid: str
    spec: MoEDeploymentSpec
    plan: Plan

    @property
    def hardware(self) -> HardwareProfile:
        return self.plan.hardware

    @property
    def replicas(self) -> int:
        return self.plan.chosen.replicas

    @property
    def pods_per_replica(self) -> int:
        return self.plan.chosen.pods_per_replica

    @property
    def gpus_per_pod(self) -> int:
        return self.plan.chosen.gpus_per_pod

    @property
    def uses_lws(self) -> bool:
        return self.spec.engine.group_kind == "LeaderWorkerSet"


# --------------------------------------------------------------------------- common metadata


def build_owner_reference(d: Deployment) -> dict[str, Any]:
    """ownerReference making the MoEDeployment the controller of a child (GC deletes children)."""
    return {
        "apiVersion": API_VERSION, "kind": KIND, "name": d.name, "uid": d.uid,
        "controller": True, "blockOwnerDeletion": True,
    }


def _metadata(d: Deployment, name: str, component: str, replica: int | None = None) -> dict[str, Any]:
    labels = naming.base_labels(d.name) | {naming.LABEL_COMPONENT: component}
    if replica is not None:
        labels[naming.LABEL_REPLICA] = str(replica)
    return {
        "name": name, "namespace": d.namespace, "labels": labels,
        "ownerReferences": [build_owner_reference(d)],
    }


def group_labels(d: Deployment, replica: int) -> dict[str, str]:
    """Labels selecting the pods of one replica group (StatefulSet selector, PDB, clique affinity)."""
    return {
        naming.LABEL_NAME: "moeshard-engine",
        naming.LABEL_DEPLOYMENT: d.name,
        naming.LABEL_REPLICA: str(replica),
    }


def desired_hash(obj: dict[str, Any]) -> str:
    """Hash of a desired object, stored in its ``moeshard.io/desired-hash`` annotation.

    The apply layer compares it with the live object's annotation: equal means
    no write. A ConfigMap's placement.json is left out: after version 0 the
    balancer owns it.
    """
    body = json.loads(json.dumps(obj))
    meta = body.get("metadata", {})
    meta.get("annotations", {}).pop(HASH_ANNOTATION, None)
    if meta.get("annotations") == {}:
        del meta["annotations"]
    if obj.get("kind") == "ConfigMap":
        body.get("data", {}).pop(PLACEMENT_KEY, None)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """The object with its desired-hash annotation set."""
    obj.setdefault("metadata", {}).setdefault("annotations", {})[HASH_ANNOTATION] = desired_hash(obj)
    return obj


# --------------------------------------------------------------------------- config


def build_initial_placement(d: Deployment, version: int = 0) -> Placement:
    """Placement before any load is known: experts in order over the EP ranks."""
    c = d.plan.chosen
    model = d.plan.model
    return initial_placement(model.moe_layers, model.num_experts, c.expert_ep, c.slots_per_gpu).with_version(version)


def placement_fits(d: Deployment, placement: Placement) -> bool:
    """Whether a live placement still matches the plan (same ranks, slots, experts, layers)."""
    c = d.plan.chosen
    return (
        placement.num_gpus == c.expert_ep and placement.slots_per_gpu == c.slots_per_gpu
        and placement.num_experts == d.plan.model.num_experts and placement.num_layers == d.plan.model.moe_layers
    )


def build_config_map(d: Deployment, placement: Placement | None) -> dict[str, Any]:
    """ConfigMap with plan.json and, when given, placement.json (omitted: keep the live one)."""
    data = {PLAN_KEY: json.dumps(d.plan.to_json(), sort_keys=True, separators=(",", ":"))}
    if placement is not None:
        data[PLACEMENT_KEY] = placement.to_json()
    return with_hash({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _metadata(d, naming.config_map_name(d.name), COMPONENT_CONFIG),
        "data": data,
    })


# --------------------------------------------------------------------------- services


def rank0_selector(d: Deployment) -> dict[str, str]:
    """Selector of pod 0 of every group: the pods that serve the completions API."""
    index_label = LWS_WORKER_INDEX_LABEL if d.uses_lws else POD_INDEX_LABEL
    return {naming.LABEL_NAME: "moeshard-engine", naming.LABEL_DEPLOYMENT: d.name, index_label: "0"}


def build_service(d: Deployment) -> dict[str, Any]:
    """ClusterIP Service in front of rank 0 of every replica group."""
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(d, naming.service_name(d.name), COMPONENT_SERVICE),
        "spec": {
            "type": "ClusterIP",
            "selector": rank0_selector(d),
            "ports": [{"name": "http", "port": d.spec.engine.port, "targetPort": "http", "protocol": "TCP"}],
        },
    })


def build_headless_service(d: Deployment, replica: int) -> dict[str, Any]:
    """Headless Service giving the pods of one group stable DNS names (pod 0 = rendezvous)."""
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(d, naming.headless_service_name(d.name, replica), COMPONENT_ENGINE, replica),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks must resolve each other before they are ready
            "selector": group_labels(d, replica),
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    })


def rendezvous_host(d: Deployment, replica: int) -> str:
    """DNS name of pod 0 of a group."""
    group = naming.group_name(d.name, replica)
    if d.uses_lws:  # LWS names the leader <lws>-<group index> behind a headless Service named <lws>
        return f"{group}-0.{group}.{d.namespace}.svc"
    return f"{group}-0.{naming.headless_service_name(d.name, replica)}.{d.namespace}.svc"


# --------------------------------------------------------------------------- engine pods


def _model_volume(spec: MoEDeploymentSpec) -> dict[str, Any]:
    weights = spec.model.weights
    if weights is None or weights.uri.startswith("hf://"):
        # hf://: an init container downloads into it (build_fetch_container).
        return {"name": "model", "emptyDir": {}}
    if weights.uri.startswith("pvc://"):
        claim = weights.uri.removeprefix("pvc://").split("/", 1)[0]
        return {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return {"name": "model", "hostPath": {"path": weights.uri.removeprefix("file://"), "type": "Directory"}}


def _model_mount(spec: MoEDeploymentSpec) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": "model", "mountPath": MODEL_MOUNT}
    weights = spec.model.weights
    if weights is not None and weights.uri.startswith("pvc://"):
        mount["readOnly"] = True
        sub_path = weights.uri.removeprefix("pvc://").partition("/")[2].strip("/")
        if sub_path:
            mount["subPath"] = sub_path
    elif weights is not None and weights.uri.startswith("file://"):
        mount["readOnly"] = True
    return mount


def build_fetch_container(d: Deployment) -> dict[str, Any] | None:
    """Init container downloading hf:// weights into the model volume (None for other sources)."""
    weights = d.spec.model.weights
    if weights is None or not weights.uri.startswith("hf://"):
        return None
    command = [*FETCH_COMMAND, "--uri", weights.uri, "--out", MODEL_MOUNT]
    if weights.revision:
        command += ["--revision", weights.revision]
    container: dict[str, Any] = {
        "name": "fetch-weights",
        "image": d.spec.engine.image,
        "imagePullPolicy": d.spec.engine.image_pull_policy,
        "command": command,
        "env": [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}],
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}],
    }
    if weights.token_secret:
        container["env"].append({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": weights.token_secret, "key": "HF_TOKEN"}},
        })
    return container


def build_engine_container(d: Deployment, replica: int) -> dict[str, Any]:
    """The engine container of every pod of group ``replica`` (env from engine_env.build_engine_env)."""
    engine, hw = d.spec.engine, d.hardware
    c = d.plan.chosen
    env = build_engine_env(
        deployment=d.name, namespace=d.namespace, replica_index=replica,
        pods_per_group=c.pods_per_replica, gpus_per_pod=c.gpus_per_pod,
        gpus_per_domain=ranks_per_domain(c.expert_ep, hw),  # the domain size the planner used for this EP
        attention_tp=c.attention_tp, expert_ep=c.expert_ep, rendezvous_host=rendezvous_host(d, replica),
        port=engine.port, device="cuda" if hw.uses_gpus else "cpu",
    )
    if d.uses_lws:  # LWS numbers pods with its own label, not the StatefulSet pod-index label
        for entry in env:
            if entry["name"] == PREFIX + "POD_INDEX":
                entry["valueFrom"] = {"fieldRef": {"fieldPath": f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']"}}
    limits: dict[str, Any] = {"cpu": engine.resources.cpu, "memory": engine.resources.memory}
    if hw.uses_gpus:
        limits[GPU_RESOURCE] = str(c.gpus_per_pod)
    resources: dict[str, Any] = {"requests": dict(limits), "limits": limits}
    if engine.scheduling.compute_domain:
        resources["claims"] = [{"name": COMPUTE_DOMAIN_CLAIM}]
    container = {
        "name": ENGINE_CONTAINER,
        "image": engine.image,
        "imagePullPolicy": engine.image_pull_policy,
        "command": list(ENGINE_COMMAND),
        "env": env,
        "ports": [
            {"name": "http", "containerPort": engine.port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": resources,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            _model_mount(d.spec),
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if c.pods_per_replica == 1:
        # Only pod 0 runs the HTTP server (/healthz, /readyz; see engine/serving.py), so HTTP probes fit a
        # one-pod group.
        container["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                                       "failureThreshold": 3}
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                                      "failureThreshold": 6, "initialDelaySeconds": 30}
    else:
        # A multi-pod group shares one template and only pod 0 serves HTTP: every pod is ready once its
        # local rank 0 has loaded its experts and the whole group has joined (the engine writes READY_FILE
        # after the group's first collective), so a rolled group does not count as serving while loading.
        container["readinessProbe"] = {"exec": {"command": ["test", "-f", READY_FILE]}, "periodSeconds": 5,
                                       "failureThreshold": 3}
    return container


def build_group_affinity(d: Deployment, replica: int) -> dict[str, Any] | None:
    """Required pod affinity on nvidia.com/gpu.clique when a multi-pod group must share one NVLink domain."""
    c = d.plan.chosen
    if c.pods_per_replica <= 1 or c.crosses_fabric or not d.hardware.uses_gpus:
        return None
    return {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": group_labels(d, replica)},
                "topologyKey": CLIQUE_LABEL,
            }],
        },
    }


def build_pod_template(d: Deployment, replica: int) -> dict[str, Any]:
    """Pod template shared by every pod of one replica group."""
    sched = d.spec.engine.scheduling
    labels = naming.base_labels(d.name) | group_labels(d, replica) | {naming.LABEL_COMPONENT: COMPONENT_ENGINE}
    if sched.kueue_queue:
        labels[KUEUE_QUEUE_LABEL] = sched.kueue_queue
    metadata: dict[str, Any] = {"labels": labels}
    if sched.topology_annotations:
        metadata["annotations"] = dict(sched.topology_annotations)
    pod: dict[str, Any] = {
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "containers": [build_engine_container(d, replica)],
        "volumes": [
            {"name": "config", "configMap": {"name": naming.config_map_name(d.name)}},
            _model_volume(d.spec),
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL / gloo shared memory
        ],
    }
    fetch = build_fetch_container(d)
    if fetch is not None:
        pod["initContainers"] = [fetch]
    if sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    affinity = build_group_affinity(d, replica)
    if affinity:
        pod["affinity"] = affinity
    if sched.compute_domain:
        pod["resourceClaims"] = [{
            "name": COMPUTE_DOMAIN_CLAIM,
            "resourceClaimTemplateName": compute_domain_claim_template(d, replica),
        }]
    return {"metadata": metadata, "spec": pod}


def _group_metadata(d: Deployment, replica: int) -> dict[str, Any]:
    meta = _metadata(d, naming.group_name(d.name, replica), COMPONENT_ENGINE, replica)
    if d.spec.engine.scheduling.kueue_queue:
        meta["labels"][KUEUE_QUEUE_LABEL] = d.spec.engine.scheduling.kueue_queue
    return meta


def build_group_statefulset(d: Deployment, replica: int) -> dict[str, Any]:
    """StatefulSet running group ``replica``: P pods started together, pod 0 the rendezvous.

    ``updateStrategy: OnDelete``: the operator replaces whole groups itself
    (a rank cannot rejoin a running torch.distributed group), one group at a
    time, so the StatefulSet controller must not roll pods one by one.
    """
    return with_hash({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _group_metadata(d, replica),
        "spec": {
            "replicas": d.pods_per_replica,
            "podManagementPolicy": "Parallel",
            "serviceName": naming.headless_service_name(d.name, replica),
            "selector": {"matchLabels": group_labels(d, replica)},
            "updateStrategy": {"type": "OnDelete"},
            "template": build_pod_template(d, replica),
        },
    })


def build_group_leaderworkerset(d: Deployment, replica: int) -> dict[str, Any]:
    """LeaderWorkerSet (one group of size P) running group ``replica``; LWS restarts the group as a unit."""
    return with_hash({
        "apiVersion": LWS_API_VERSION, "kind": "LeaderWorkerSet",
        "metadata": _group_metadata(d, replica),
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": d.pods_per_replica,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": build_pod_template(d, replica),
            },
        },
    })


def build_group(d: Deployment, replica: int) -> dict[str, Any]:
    """The group object the spec asks for (engine.groupKind)."""
    return build_group_leaderworkerset(d, replica) if d.uses_lws else build_group_statefulset(d, replica)


def build_pod_disruption_budget(d: Deployment, replica: int) -> dict[str, Any]:
    """PDB of one group: a healthy group loses no pod to a voluntary eviction.

    Evicting one rank takes the whole group down (its collectives break), so a
    budget of "one pod" would still cost a group. Unhealthy pods may be evicted
    (``AlwaysAllow``) so a broken group never blocks a node drain.
    """
    return with_hash({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _metadata(d, naming.group_name(d.name, replica), COMPONENT_ENGINE, replica),
        "spec": {
            "minAvailable": d.pods_per_replica,
            "selector": {"matchLabels": group_labels(d, replica)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    })


def compute_domain_claim_template(d: Deployment, replica: int) -> str:
    return f"{naming.group_name(d.name, replica)}-imex"


def build_compute_domain(d: Deployment, replica: int) -> dict[str, Any]:
    """NVIDIA DRA ComputeDomain of one group (IMEX channels for multi-node NVLink)."""
    return with_hash({
        "apiVersion": COMPUTE_DOMAIN_API_VERSION, "kind": "ComputeDomain",
        "metadata": _metadata(d, naming.group_name(d.name, replica), COMPONENT_ENGINE, replica),
        "spec": {
            "numNodes": d.pods_per_replica,
            "channel": {"resourceClaimTemplate": {"name": compute_domain_claim_template(d, replica)}},
        },
    })


# --------------------------------------------------------------------------- everything


def build_replica_objects(d: Deployment, replica: int) -> list[dict[str, Any]]:
    """Objects of one replica group, in creation order (group object last)."""
    objs = [build_headless_service(d, replica), build_pod_disruption_budget(d, replica)]
    if d.spec.engine.scheduling.compute_domain:
        objs.append(build_compute_domain(d, replica))
    objs.append(build_group(d, replica))
    return objs


def build_all(d: Deployment, placement: Placement | None = None) -> list[dict[str, Any]]:
    """Every child object, in creation order: ConfigMap, Service, then each replica's objects.

    ``placement`` defaults to the initial (version 0) placement.
    """
    objs = [build_config_map(d, placement or build_initial_placement(d)), build_service(d)]
    for replica in range(d.replicas):
        objs.extend(build_replica_objects(d, replica))
    return objs


def object_key(obj: dict[str, Any]) -> tuple[str, str]:
    """(kind, name) of an object."""
    return obj["kind"], obj["metadata"]["name"]
