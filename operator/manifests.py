"""Desired child objects of a MoEDeployment: pure functions returning plain dicts.

Nothing here talks to the API server. The operator (handlers.py) and
``moeshard render`` call the same builders, so what ``render`` prints is what
the operator creates.

Objects of one MoEDeployment ``NAME`` with R replicas (DP groups), each group
of P pods x G GPUs (P x G = EP ranks):

    PersistentVolumeClaim NAME-weights-KEY       hf:// weights cache (weights.py; KEY hashes uri, revision, cache)
    Job                   NAME-weights-KEY       downloads the hf:// checkpoint into it once (weights.py)
    ConfigMap             NAME-config            plan.json + placement.json (mounted at /etc/moeshard)
    Service               NAME                   rank 0 of every group (the completions API)
    per replica r < R:
      Service (headless)  NAME-r<r>-ranks        stable pod DNS; pod 0 is the rendezvous
      StatefulSet         NAME-r<r>              P pods, parallel start (or a LeaderWorkerSet of size P)
      PodDisruptionBudget NAME-r<r>              no voluntary eviction from a healthy group
      NetworkPolicy       NAME-r<r>              group-only ingress but HTTP (only with engine.networkPolicy)
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
from typing import Any

from moeshard.core import naming
from moeshard.core.engine_env import POD_INDEX_LABEL, RENDEZVOUS_PORT
from moeshard.core.placement import PLACEMENT_KEY, Placement, check_fits, initial_placement

from .api import API_VERSION, KIND
from .backends import PodContext, get_backend
from .deployment import Deployment, GroupRef

CLIQUE_LABEL = "nvidia.com/gpu.clique"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
HASH_ANNOTATION = "moeshard.io/desired-hash"
# With spec.autoscaling the front Service also selects this label, which the operator sets on rank 0 of
# every desired group ("true") and turns "false" on a group it drains before a scale-in removes it.
SERVING_LABEL = "moeshard.io/serving"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
COMPUTE_DOMAIN_API_VERSION = "resource.nvidia.com/v1beta1"
COMPUTE_DOMAIN_CLAIM = "compute-domain"
COMPONENT_ENGINE = "engine"
COMPONENT_CONFIG = "config"
COMPONENT_SERVICE = "service"
COMPONENT_WEIGHTS = "weights"
ENGINE_UID = 65532  # the engine image's user (images/engine/Containerfile)


def pod_security_context() -> dict[str, Any]:
    """Restricted pod security (containers add a read-only root and dropped capabilities, backends/)."""
    return {"runAsNonRoot": True, "runAsUser": ENGINE_UID, "runAsGroup": ENGINE_UID, "fsGroup": ENGINE_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


# Kinds the operator writes: kind -> (apiVersion, plural). kube.py routes by this table.
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "StatefulSet": ("apps/v1", "statefulsets"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Job": ("batch/v1", "jobs"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "LeaderWorkerSet": (LWS_API_VERSION, "leaderworkersets"),
    "ComputeDomain": (COMPUTE_DOMAIN_API_VERSION, "computedomains"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects"),
    KIND: (API_VERSION, "moedeployments"),
}
# Kinds created once and never patched (an immutable claim spec and Job template): list, create, delete only.
CREATE_ONLY_KINDS = frozenset({"Job", "PersistentVolumeClaim"})
# Kinds kubernetes-validate has no schema for (custom resources of other projects).
CUSTOM_KINDS = frozenset({"LeaderWorkerSet", "ComputeDomain", "ScaledObject", KIND})


# --------------------------------------------------------------------------- common metadata


def build_owner_reference(d: Deployment) -> dict[str, Any]:
    """ownerReference making the MoEDeployment the controller of a child (GC deletes children)."""
    return {
        "apiVersion": API_VERSION, "kind": KIND, "name": d.name, "uid": d.uid,
        "controller": True, "blockOwnerDeletion": True,
    }


def child_metadata(d: Deployment, name: str, component: str, group: GroupRef | None = None) -> dict[str, Any]:
    labels = naming.base_labels(d.name) | {naming.LABEL_COMPONENT: component}
    if group is not None:
        labels[naming.LABEL_REPLICA] = str(group.index)
    return {
        "name": name, "namespace": d.namespace, "labels": labels,
        "ownerReferences": [build_owner_reference(d)],
    }


def group_labels(d: Deployment, group: GroupRef) -> dict[str, str]:
    """Labels selecting the pods of one replica group (StatefulSet selector, PDB, clique affinity)."""
    return {
        naming.LABEL_NAME: "moeshard-engine",
        naming.LABEL_DEPLOYMENT: d.name,
        naming.LABEL_REPLICA: str(group.index),
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
    try:
        check_fits(placement, build_initial_placement(d))
    except ValueError:
        return False
    return True


def build_config_map(d: Deployment, placement: Placement | None) -> dict[str, Any]:
    """ConfigMap with the engine's files (placement None: keep the live placement.json)."""
    return with_hash({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": child_metadata(d, naming.config_map_name(d.name), COMPONENT_CONFIG),
        "data": get_backend(d.spec.engine.backend).config_data(d, placement),
    })


# --------------------------------------------------------------------------- services


def rank0_selector(d: Deployment) -> dict[str, str]:
    """Selector of pod 0 of every group: the pods that serve the completions API."""
    return {naming.LABEL_NAME: "moeshard-engine", naming.LABEL_DEPLOYMENT: d.name, pod_index_label(d): "0"}


def pod_index_label(d: Deployment) -> str:
    """The pod label holding a pod's index inside its group (set by the StatefulSet or LWS controller)."""
    return LWS_WORKER_INDEX_LABEL if d.uses_lws else POD_INDEX_LABEL


def build_service(d: Deployment) -> dict[str, Any]:
    """ClusterIP Service in front of rank 0 of every replica group (that is not draining, with autoscaling)."""
    selector = rank0_selector(d) | ({SERVING_LABEL: "true"} if d.spec.autoscaling is not None else {})
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": child_metadata(d, naming.service_name(d.name), COMPONENT_SERVICE),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": d.spec.engine.port, "targetPort": "http", "protocol": "TCP"}],
        },
    })


def build_headless_service(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """Headless Service giving the pods of one group stable DNS names (pod 0 = rendezvous)."""
    return with_hash({
        "apiVersion": "v1", "kind": "Service",
        "metadata": child_metadata(d, naming.headless_service_name(d.name, group.index), COMPONENT_ENGINE, group),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks must resolve each other before they are ready
            "selector": group_labels(d, group),
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    })


def rendezvous_host(d: Deployment, group: GroupRef) -> str:
    """DNS name of pod 0 of a group."""
    name = naming.group_name(d.name, group.index)
    if d.uses_lws:  # LWS names the leader <lws>-<group index> behind a headless Service named <lws>
        return f"{name}-0.{name}.{d.namespace}.svc"
    return f"{name}-0.{naming.headless_service_name(d.name, group.index)}.{d.namespace}.svc"


# --------------------------------------------------------------------------- engine pods


def build_group_affinity(d: Deployment, group: GroupRef) -> dict[str, Any] | None:
    """Required pod affinity on nvidia.com/gpu.clique when a multi-pod group must share one NVLink domain."""
    c = group.candidate
    if c.pods_per_replica <= 1 or c.crosses_fabric or not d.hardware.uses_gpus:
        return None
    return {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": group_labels(d, group)},
                "topologyKey": CLIQUE_LABEL,
            }],
        },
    }


def build_pod_template(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """Pod template shared by every pod of one group: topology from here, containers from the backend."""
    sched = d.spec.engine.scheduling
    labels = naming.base_labels(d.name) | group_labels(d, group) | {naming.LABEL_COMPONENT: COMPONENT_ENGINE}
    if sched.kueue_queue:
        labels[KUEUE_QUEUE_LABEL] = sched.kueue_queue
    metadata: dict[str, Any] = {"labels": labels}
    if sched.topology_annotations:
        metadata["annotations"] = dict(sched.topology_annotations)
    context = PodContext(
        rendezvous_host=rendezvous_host(d, group), pod_index_label=pod_index_label(d),
        compute_domain_claim=COMPUTE_DOMAIN_CLAIM if sched.compute_domain else None,
    )
    engine = get_backend(d.spec.engine.backend).pod(d, group, context)
    pod: dict[str, Any] = {
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the engine never calls the API server
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": 30,
        "containers": engine.containers,
        "volumes": engine.volumes,
    }
    if engine.init_containers:
        pod["initContainers"] = engine.init_containers
    if sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    affinity = build_group_affinity(d, group)
    if affinity:
        pod["affinity"] = affinity
    if sched.compute_domain:
        pod["resourceClaims"] = [{
            "name": COMPUTE_DOMAIN_CLAIM,
            "resourceClaimTemplateName": compute_domain_claim_template(d, group),
        }]
    return {"metadata": metadata, "spec": pod}


def _group_metadata(d: Deployment, group: GroupRef) -> dict[str, Any]:
    meta = child_metadata(d, naming.group_name(d.name, group.index), COMPONENT_ENGINE, group)
    if d.spec.engine.scheduling.kueue_queue:
        meta["labels"][KUEUE_QUEUE_LABEL] = d.spec.engine.scheduling.kueue_queue
    return meta


def build_group_statefulset(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """StatefulSet running one group: P pods started together, pod 0 the rendezvous.

    ``updateStrategy: OnDelete``: the operator replaces whole groups itself
    (a rank cannot rejoin a running torch.distributed group), one group at a
    time, so the StatefulSet controller must not roll pods one by one.
    """
    return with_hash({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _group_metadata(d, group),
        "spec": {
            "replicas": group.candidate.pods_per_replica,
            "podManagementPolicy": "Parallel",
            "serviceName": naming.headless_service_name(d.name, group.index),
            "selector": {"matchLabels": group_labels(d, group)},
            "updateStrategy": {"type": "OnDelete"},
            "template": build_pod_template(d, group),
        },
    })


def build_group_leaderworkerset(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """LeaderWorkerSet (one group of size P) running one group; LWS restarts the group as a unit."""
    return with_hash({
        "apiVersion": LWS_API_VERSION, "kind": "LeaderWorkerSet",
        "metadata": _group_metadata(d, group),
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": group.candidate.pods_per_replica,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": build_pod_template(d, group),
            },
        },
    })


def build_group(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """The group object the spec asks for (engine.groupKind)."""
    return build_group_leaderworkerset(d, group) if d.uses_lws else build_group_statefulset(d, group)


def build_network_policy(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """NetworkPolicy of one group (spec.engine.networkPolicy): the group's pods admit every port from
    each other (the rendezvous port and the ephemeral ports of NCCL / gloo sockets), and only the HTTP
    port (completions API, /metrics) from anywhere else."""
    return with_hash({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": child_metadata(d, naming.group_name(d.name, group.index), COMPONENT_ENGINE, group),
        "spec": {
            "podSelector": {"matchLabels": group_labels(d, group)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": group_labels(d, group)}}]},
                {"ports": [{"port": d.spec.engine.port, "protocol": "TCP"}]},
            ],
        },
    })


def build_pod_disruption_budget(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """PDB of one group: a healthy group loses no pod to a voluntary eviction.

    Evicting one rank takes the whole group down (its collectives break), so a
    budget of "one pod" would still cost a group. Unhealthy pods may be evicted
    (``AlwaysAllow``) so a broken group never blocks a node drain.
    """
    return with_hash({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": child_metadata(d, naming.group_name(d.name, group.index), COMPONENT_ENGINE, group),
        "spec": {
            "minAvailable": group.candidate.pods_per_replica,
            "selector": {"matchLabels": group_labels(d, group)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    })


def compute_domain_claim_template(d: Deployment, group: GroupRef) -> str:
    return f"{naming.group_name(d.name, group.index)}-imex"


def build_compute_domain(d: Deployment, group: GroupRef) -> dict[str, Any]:
    """NVIDIA DRA ComputeDomain of one group (IMEX channels for multi-node NVLink)."""
    return with_hash({
        "apiVersion": COMPUTE_DOMAIN_API_VERSION, "kind": "ComputeDomain",
        "metadata": child_metadata(d, naming.group_name(d.name, group.index), COMPONENT_ENGINE, group),
        "spec": {
            "numNodes": group.candidate.pods_per_replica,
            "channel": {"resourceClaimTemplate": {"name": compute_domain_claim_template(d, group)}},
        },
    })


# --------------------------------------------------------------------------- everything


def build_replica_objects(d: Deployment, group: GroupRef) -> list[dict[str, Any]]:
    """Objects of one group, in creation order (group object last)."""
    objs = [build_headless_service(d, group), build_pod_disruption_budget(d, group)]
    if d.spec.engine.network_policy:
        objs.append(build_network_policy(d, group))
    if d.spec.engine.scheduling.compute_domain:
        objs.append(build_compute_domain(d, group))
    objs.append(build_group(d, group))
    return objs


def build_all(d: Deployment, placement: Placement | None = None) -> list[dict[str, Any]]:
    """Every child object, in creation order: ConfigMap, Service, then each group's objects.

    ``placement`` defaults to the initial (version 0) placement.
    """
    objs = [build_config_map(d, placement or build_initial_placement(d)), build_service(d)]
    for group in d.groups():
        objs.extend(build_replica_objects(d, group))
    return objs


def object_key(obj: dict[str, Any]) -> tuple[str, str]:
    """(kind, name) of an object."""
    return obj["kind"], obj["metadata"]["name"]
