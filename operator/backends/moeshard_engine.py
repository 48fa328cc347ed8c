"""MoEShard's own EP/TP engine (moeshard.engine) behind the operator's EngineBackend seam.

Every pod of a group runs ``moeshard engine serve`` configured by the
environment contract of moeshard.core.engine_env; the ConfigMap carries
plan.json and the expert placement (placement.json) that the engine watches
and reloads; the engine exports ``moeshard_expert_tokens_total{layer,expert}``
which the balancer reads.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from moeshard.core.architectures import ModelArchitecture
from moeshard.core.engine_env import (
    CONFIG_MOUNT, HEARTBEAT_FILE, MODEL_MOUNT, READY_FILE, RENDEZVOUS_PORT, build_engine_env,
)
from moeshard.core.naming import (
    GPU_RESOURCE, METRIC_EXPERT_TOKENS, SCOPE_DEPLOYMENT, SCOPE_NAMESPACE, config_map_name, weights_cache_name,
)
from moeshard.core.placement import PLACEMENT_KEY, PLAN_KEY

from .base import EnginePod, PodContext

if TYPE_CHECKING:
    from moeshard.core.placement import Placement

    from ..api import MoEDeploymentSpec
    from ..deployment import Deployment, GroupRef

ENGINE_CONTAINER = "engine"
TMP_MOUNT = "/tmp"  # the only writable path of the read-only root: heartbeat, ready file, HF and Triton caches
PROBE_PERIOD_SECONDS = 10
ENGINE_COMMAND = ["moeshard", "engine", "serve"]
FETCH_COMMAND = ["moeshard", "engine", "fetch"]
FETCH_CONTAINER = "fetch-weights"
# A download is network- and disk-bound: two CPUs and 4Gi keep huggingface_hub's parallel workers busy.
FETCH_RESOURCES = {"cpu": "2", "memory": "4Gi"}
_LABEL_VALUE_FORBIDDEN = set('"\\\n')


def _model_volume(d: "Deployment") -> dict[str, Any]:
    weights = d.spec.model.weights
    if weights.downloaded:  # the cache volume the operator's download Job filled (operator/weights.py)
        claim = weights_cache_name(d.name, weights.cache_key())
        return {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    if weights.uri.startswith("pvc://"):
        claim = weights.uri.removeprefix("pvc://").split("/", 1)[0]
        return {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return {"name": "model", "hostPath": {"path": weights.uri.removeprefix("file://"), "type": "Directory"}}


def _model_mount(spec: "MoEDeploymentSpec") -> dict[str, Any]:
    mount: dict[str, Any] = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
    weights = spec.model.weights
    if weights.uri.startswith("pvc://"):
        sub_path = weights.uri.removeprefix("pvc://").partition("/")[2].strip("/")
        if sub_path:
            mount["subPath"] = sub_path
    return mount


def fetch_container(d: "Deployment") -> dict[str, Any]:
    """The container of the download Job (operator/weights.py): ``moeshard engine fetch`` of the hf:// source
    into the cache volume at MODEL_MOUNT, from the engine image, restricted like the engine container."""
    weights = d.spec.model.weights
    command = [*FETCH_COMMAND, "--uri", weights.uri, "--out", MODEL_MOUNT]
    if weights.revision:
        command += ["--revision", weights.revision]
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": d.spec.engine.image,
        "imagePullPolicy": d.spec.engine.image_pull_policy,
        "command": command,
        "env": [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}],
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}, {"name": "tmp", "mountPath": TMP_MOUNT}],
        "resources": {"requests": dict(FETCH_RESOURCES), "limits": dict(FETCH_RESOURCES)},  # Guaranteed QoS
        "securityContext": container_security_context(()),
    }
    if weights.token_secret:
        container["env"].append({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": weights.token_secret, "key": "HF_TOKEN"}},
        })
    return container


def container_security_context(capabilities: "tuple[str, ...] | list[str]") -> dict[str, Any]:
    """Restricted container security: read-only root, no privilege escalation, every capability dropped
    but ``capabilities`` (spec.engine.capabilities: what RDMA needs, see its description)."""
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if capabilities:
        caps["add"] = sorted(capabilities)
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": caps}


def _seconds(duration: str) -> int:
    from ..api import parse_duration  # the API imports the backends

    return max(1, int(parse_duration(duration)))


def heartbeat_probes(spec: "MoEDeploymentSpec") -> dict[str, Any]:
    """startupProbe (the first step within startupTimeout) and livenessProbe (a step boundary within
    stallTimeout) on every rank's heartbeat file (moeshard.engine.heartbeat); coreutils only, no Python."""
    stall = _seconds(spec.engine.stall_timeout)
    fresh = f'test $(( $(date +%s) - $(stat -c %Y {HEARTBEAT_FILE}) )) -lt {stall}'
    return {
        "startupProbe": {"exec": {"command": ["test", "-f", HEARTBEAT_FILE]}, "periodSeconds": PROBE_PERIOD_SECONDS,
                         "failureThreshold": -(-_seconds(spec.engine.startup_timeout) // PROBE_PERIOD_SECONDS)},
        "livenessProbe": {"exec": {"command": ["sh", "-c", fresh]}, "periodSeconds": PROBE_PERIOD_SECONDS,
                          "timeoutSeconds": 5, "failureThreshold": 3},
    }


def _engine_container(d: "Deployment", group: "GroupRef", context: PodContext) -> dict[str, Any]:
    """The engine container of every pod of ``group`` (env from engine_env.build_engine_env)."""
    engine, hw, c = d.spec.engine, d.hardware, group.candidate
    env = build_engine_env(
        deployment=d.name, namespace=d.namespace, replica_index=group.index,
        pods_per_group=c.pods_per_replica, gpus_per_pod=c.gpus_per_pod,
        gpus_per_domain=c.ranks_per_domain,  # the domain size the planner used for this EP
        attention_tp=c.attention_tp, expert_ep=c.expert_ep, rendezvous_host=context.rendezvous_host,
        port=engine.port, device="cuda" if hw.uses_gpus else "cpu",
        pod_index_label=context.pod_index_label,
    )
    limits: dict[str, Any] = {"cpu": engine.resources.cpu, "memory": engine.resources.memory}
    if hw.uses_gpus:
        limits[GPU_RESOURCE] = str(c.gpus_per_pod)
    resources: dict[str, Any] = {"requests": dict(limits), "limits": limits}
    if context.compute_domain_claim:
        resources["claims"] = [{"name": context.compute_domain_claim}]
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
            {"name": "tmp", "mountPath": TMP_MOUNT},
        ],
        "securityContext": container_security_context(engine.capabilities),
        **heartbeat_probes(d.spec),
    }
    if c.pods_per_replica == 1:
        # Only pod 0 runs the HTTP server (/healthz, /readyz), so HTTP probes fit a one-pod group.
        container["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                                       "failureThreshold": 3}
    else:
        # A multi-pod group shares one template and only pod 0 serves HTTP: every pod is ready once its
        # local rank 0 has loaded its experts and the whole group has joined (the engine writes READY_FILE
        # after the group's first collective), so a rolled group does not count as serving while loading.
        container["readinessProbe"] = {"exec": {"command": ["test", "-f", READY_FILE]}, "periodSeconds": 5,
                                       "failureThreshold": 3}
    return container


class MoEShardEngine:
    """The ``moeshard`` backend: MoEShard's own engine."""

    name = "moeshard"
    architectures = ("qwen3_moe", "mixtral")
    takes_placement = True

    def check_model(self, arch: ModelArchitecture, where: str) -> None:
        if arch.architecture not in self.architectures:
            raise ValueError(
                f"{where}: the engine serves {', '.join(self.architectures)} models; "
                "`moeshard plan --preset` still plans the others"
            )
        if arch.first_dense_layers or arch.shared_experts:
            raise ValueError(
                "model.architecture.firstDenseLayers (and sharedExperts): the engine serves only models whose "
                "every layer is routed MoE without shared experts; set both to 0"
            )

    def pod(self, d: "Deployment", group: "GroupRef", context: PodContext) -> EnginePod:
        return EnginePod(
            containers=[_engine_container(d, group, context)],
            volumes=[
                {"name": "config", "configMap": {"name": config_map_name(d.name)}},
                _model_volume(d),
                # NCCL / gloo shared memory; memory-backed, so it counts against the memory limit: bounded.
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": d.spec.engine.shm_size}},
                {"name": "tmp", "emptyDir": {}},
            ],
        )

    def fetch_container(self, d: "Deployment") -> dict[str, Any]:
        return fetch_container(d)

    def config_data(self, d: "Deployment", placement: "Placement | None") -> dict[str, str]:
        data = {PLAN_KEY: json.dumps(d.plan.to_json(), sort_keys=True, separators=(",", ":"))}
        if placement is not None:
            data[PLACEMENT_KEY] = placement.to_json()
        return data

    def expert_load_query(self, name: str, namespace: str, window: str) -> str:
        for field, value in (("metadata.name", name), ("metadata.namespace", namespace)):
            if _LABEL_VALUE_FORBIDDEN & set(value):
                raise ValueError(f"{field}: {value!r} cannot be used as a label value")
        from ..api import parse_duration  # the API imports the backends

        parse_duration(window)  # raises ValueError naming the bad duration
        selector = f'{SCOPE_DEPLOYMENT}="{name}",{SCOPE_NAMESPACE}="{namespace}"'
        return f"sum by (layer, expert) (increase({METRIC_EXPERT_TOKENS}{{{selector}}}[{window}]))"
