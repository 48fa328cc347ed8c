"""The MoEDeployment API: pydantic v2 models, the single source of truth.

``moeshard crd`` turns these models into crds/moedeployments.yaml; every field
description here becomes ``kubectl explain`` text. Cross-field rules live in
two places that must agree: the ``model_validator`` methods below (Python) and
the CEL ``x-kubernetes-validations`` that crd.py attaches (API server). Both
are tested against the same bad specs.

JSON field names are camelCase (``attentionTP``, ``expertEP``); Python names
are snake_case. Parse with ``MoEDeploymentSpec.model_validate(spec_dict)``,
serialise with ``model_dump(by_alias=True, exclude_none=True)``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from moeshard.core.architectures import ARCHITECTURES, PRESETS, ModelArchitecture, get_preset
from moeshard.core.engine_env import RENDEZVOUS_PORT
from moeshard.core.errors import UserError
from moeshard.core.hardware import GB, PROFILES, TB, US, HardwareProfile, get_profile
from moeshard.core.naming import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION

from .api_autoscaling import AUTOSCALING_TARGETS, MAX_STABILIZATION_SECONDS, AutoscalingSpec, AutoscalingTarget
from .api_base import (
    DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, DURATION_PATTERN, LABEL_VALUE_PATTERN, MAX_DNS_SUBDOMAIN_LENGTH,
    MAX_LABEL_VALUE_LENGTH, MAX_NAME_LENGTH, MAX_QUALIFIED_NAME_LENGTH, NAME_PATTERN, QUALIFIED_NAME_PATTERN,
    QUANTITY_PATTERN, DnsSubdomain, LabelValue, Quantity, _Section, check_qualified_names, parse_duration,
)
from .api_status import Condition, MoEDeploymentStatus, PlanStatus
from .api_weights import CACHE_ACCESS_MODES, WeightsCache, WeightsSource
from .backends import BACKENDS, DEFAULT_BACKEND, get_backend
from .images import ENGINE_IMAGE

# Architectures some engine backend serves (the CRD's rule); the planner knows more (ARCHITECTURES).
ENGINE_ARCHITECTURES = tuple(sorted({a for b in BACKENDS.values() for a in b.architectures}))


# Formats, the strict base model: api_base.py; autoscaling: api_autoscaling.py; status: api_status.py.

# --------------------------------------------------------------------------- model


class ArchitectureFields(_Section):
    """Architecture of a model that is not a preset (the figures of its config.json)."""

    type: Literal["qwen3_moe", "mixtral", "deepseek_v3"] = Field(
        description="Hugging Face model_type of the architecture."
    )
    num_layers: int = Field(ge=1, description="Decoder layers (num_hidden_layers).")
    hidden_size: int = Field(ge=1, description="Hidden size H.")
    num_experts: int = Field(ge=1, description="Routed experts per MoE layer E.")
    top_k: int = Field(ge=1, description="Experts each token is routed to (num_experts_per_tok).")
    expert_intermediate_size: int = Field(ge=1, description="Intermediate size I of one expert.")
    num_attention_heads: int = Field(ge=1, description="Query heads.")
    num_kv_heads: int = Field(ge=1, alias="numKVHeads", description="Key/value heads (GQA).")
    head_dim: int = Field(ge=1, description="Dimension of one attention head.")
    vocab_size: int = Field(ge=1, description="Vocabulary size.")
    first_dense_layers: int = Field(0, ge=0, description="Leading layers with a dense FFN instead of MoE.")
    dense_intermediate_size: int = Field(0, ge=0, description="Intermediate size of the dense FFN layers.")
    shared_experts: int = Field(0, ge=0, description="Always-active experts per MoE layer, replicated on every rank.")

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> "ArchitectureFields":
        if self.top_k > self.num_experts:
            raise ValueError(f"topK ({self.top_k}) exceeds numExperts ({self.num_experts})")
        if self.first_dense_layers >= self.num_layers:
            raise ValueError("firstDenseLayers must leave at least one MoE layer")
        return self


class ModelSpec(_Section):
    """Which MoE model to serve: a preset name or the architecture's figures."""

    preset: Literal[tuple(sorted(PRESETS))] | None = Field(  # type: ignore[valid-type]
        None, description="Name of a built-in model preset. Exactly one of preset and architecture."
    )
    architecture: ArchitectureFields | None = Field(
        None, description="Figures of a custom architecture. Exactly one of preset and architecture."
    )
    weights: WeightsSource = Field(description="Checkpoint source for the engine pods (required).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSpec":
        if (self.preset is None) == (self.architecture is None):
            raise ValueError("set exactly one of preset and architecture")
        return self

    def resolve(self) -> ModelArchitecture:
        if self.preset is not None:
            return get_preset(self.preset)
        a = self.architecture
        assert a is not None  # guaranteed by _exactly_one
        return ModelArchitecture(
            name="custom", architecture=a.type, num_layers=a.num_layers, hidden_size=a.hidden_size,
            num_experts=a.num_experts, top_k=a.top_k, expert_intermediate_size=a.expert_intermediate_size,
            num_attention_heads=a.num_attention_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
            vocab_size=a.vocab_size, first_dense_layers=a.first_dense_layers,
            dense_intermediate_size=a.dense_intermediate_size, shared_experts=a.shared_experts,
        )


# --------------------------------------------------------------------------- hardware


class CustomHardware(_Section):
    """Figures that replace the profile's. Omitted figures keep the profile's value."""

    gpus_per_node: int | None = Field(None, ge=1, le=64, description="GPUs in one node (one pod at most).")
    gpus_per_domain: int | None = Field(None, ge=1, description="GPUs in one NVLink domain.")
    nvlink_g_bps: float | None = Field(None, gt=0, alias="nvlinkGBps", description="NVLink bandwidth per GPU, each way, GB/s.")
    fabric_g_bps: float | None = Field(None, gt=0, alias="fabricGBps", description="Fabric (InfiniBand/RoCE) bandwidth per GPU, each way, GB/s.")
    nvlink_latency_micros: float | None = Field(None, ge=0, description="Per-message latency to one NVLink peer, microseconds.")
    fabric_latency_micros: float | None = Field(None, ge=0, description="Per-message latency to one peer across the fabric, microseconds.")
    hbm_g_bps: float | None = Field(None, gt=0, alias="hbmGBps", description="GPU memory bandwidth, GB/s.")
    bf16_t_flops: float | None = Field(None, gt=0, alias="bf16TFlops", description="Dense BF16 throughput, TFLOP/s.")
    memory_gb: float | None = Field(None, gt=0, alias="memoryGB", description="Memory per GPU, GB.")

    def overrides(self) -> dict[str, float]:
        pairs = {
            "gpus_per_node": (self.gpus_per_node, 1),
            "gpus_per_domain": (self.gpus_per_domain, 1),
            "nvlink_bytes_per_s": (self.nvlink_g_bps, GB),
            "fabric_bytes_per_s": (self.fabric_g_bps, GB),
            "nvlink_latency_s": (self.nvlink_latency_micros, US),
            "fabric_latency_s": (self.fabric_latency_micros, US),
            "hbm_bytes_per_s": (self.hbm_g_bps, GB),
            "bf16_flops": (self.bf16_t_flops, TB),
            "memory_bytes": (self.memory_gb, GB),
        }
        return {k: v * scale for k, (v, scale) in pairs.items() if v is not None}


class HardwareSpec(_Section):
    """The GPU type the deployment runs on."""

    profile: Literal[tuple(sorted(PROFILES))] = Field(  # type: ignore[valid-type]
        description="Hardware profile: h100-hgx, h200-hgx, b200-hgx, gb200-nvl72, or cpu (engine processes "
        "without GPUs, for tests and demos)."
    )
    custom: CustomHardware | None = Field(None, description="Figures that override the profile's.")

    @model_validator(mode="after")
    def _domain_holds_nodes(self) -> "HardwareSpec":
        hw = self.resolve()
        if hw.gpus_per_domain % hw.gpus_per_node and hw.gpus_per_domain > hw.gpus_per_node:
            raise ValueError(
                f"custom.gpusPerDomain ({hw.gpus_per_domain}) must be a multiple of gpusPerNode ({hw.gpus_per_node})"
            )
        return self

    def resolve(self) -> HardwareProfile:
        base = get_profile(self.profile)
        return base.with_overrides(**self.custom.overrides()) if self.custom else base


# --------------------------------------------------------------------------- parallelism, workload


class ParallelismSpec(_Section):
    """Fixed parallel sizes. Each is optional: the planner chooses what is left out."""

    attention_tp: int | None = Field(
        None, ge=1, le=64, alias="attentionTP",
        description="Tensor-parallel size of attention. Divides expertEP; a TP group stays inside one pod.",
    )
    expert_ep: int | None = Field(
        None, ge=1, le=1024, alias="expertEP",
        description="Expert-parallel size: GPUs in one replica. Divides numExperts + redundantSlots.",
    )
    replicas: int = Field(
        1, ge=0, le=1024,
        description="Data-parallel replicas (EP groups). Changed by the scale subresource (kubectl scale, HPA).",
    )
    allow_cross_domain: bool = Field(
        False,
        description="Allow an EP group larger than one NVLink domain (its all-to-all then crosses the fabric).",
    )

    @model_validator(mode="after")
    def _tp_divides_ep(self) -> "ParallelismSpec":
        if self.attention_tp and self.expert_ep and self.expert_ep % self.attention_tp:
            raise ValueError(f"attentionTP ({self.attention_tp}) must divide expertEP ({self.expert_ep})")
        return self


class WorkloadSpec(_Section):
    """The traffic the plan is sized for."""

    prefill_tokens: int = Field(
        6000, ge=1, le=1_000_000, description="Tokens in one prefill batch of one replica (chunked prefill size)."
    )
    decode_batch: int = Field(64, ge=1, le=65536, description="Concurrent decoding sequences per replica.")
    context_length: int = Field(4096, ge=1, le=2_000_000, description="Tokens of KV cache kept per sequence.")


# --------------------------------------------------------------------------- balancing


class LoadBalancingSpec(_Section):
    """Replication of hot experts from measured load (the balancer)."""

    enabled: bool = Field(True, description="Recompute expert replication every interval.")
    interval: str = Field("5m", pattern=DURATION_PATTERN, description="How often to rebalance (Go duration).")
    window: str = Field("5m", pattern=DURATION_PATTERN, description="Rolling window of expert load read from Prometheus.")
    redundant_slots: int = Field(
        0, ge=0, le=4096,
        description="Extra physical expert slots per MoE layer for replicas of hot experts, over the whole EP group.",
    )
    improvement_threshold: float = Field(
        0.015, ge=0, le=1,
        description="Per-layer floor: a layer's placement changes only when its predicted max/mean GPU load gain, "
                    "scored on load it was not fitted to, reaches this fraction (and the window's Poisson noise).",
    )
    max_moves_per_cycle: int | None = Field(
        None, ge=0, description="Most expert weight copies moved in one rebalance (per layer); unset means no cap."
    )
    move_budget_per_cycle: int | None = Field(
        None, ge=0,
        description="Most expert weight copies moved in one rebalance over all layers, largest gains first; "
                    "unset means no cap.",
    )
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc:9090", alias="prometheusURL",
        pattern=r"^https?://.+", description="Prometheus HTTP API base URL.",
    )

    @field_validator("interval", "window")
    @classmethod
    def _positive_duration(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError("must be longer than zero")
        return value


# --------------------------------------------------------------------------- engine


class Toleration(_Section):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(None, pattern=QUALIFIED_NAME_PATTERN, max_length=MAX_QUALIFIED_NAME_LENGTH,
                            description="Taint key to tolerate (a label key).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: LabelValue | None = Field(None, description="Taint value for operator Equal (a label value).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class Scheduling(_Section):
    """Where engine pods may run."""

    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Node labels every engine pod requires (label keys and values)."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for GPU node taints.")
    priority_class_name: DnsSubdomain | None = Field(
        None, description="PriorityClass of engine pods (a lowercase DNS subdomain, e.g. high-priority)."
    )
    kueue_queue: LabelValue | None = Field(
        None, description="Kueue LocalQueue name (label kueue.x-k8s.io/queue-name, so a label value)."
    )
    topology_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod-template annotations for topology-aware schedulers "
        "(e.g. kueue.x-k8s.io/podset-required-topology).",
    )
    compute_domain: bool = Field(
        False,
        description="Claim an NVIDIA DRA ComputeDomain per replica so a multi-node NVLink group gets IMEX channels.",
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        check_qualified_names(value, "nodeSelector")
        return value

    @field_validator("topology_annotations")
    @classmethod
    def _annotation_keys(cls, value: dict[str, str]) -> dict[str, str]:
        check_qualified_names(value, "topologyAnnotations")
        return value


class Resources(_Section):
    """Non-GPU resources of each engine pod (GPUs come from the plan)."""

    cpu: Quantity = Field("8", description="CPU request and limit per pod (a quantity: 8, 7500m).")
    memory: Quantity = Field("64Gi", description="Memory request and limit per pod (a quantity: 64Gi, 500Mi).")


class RestartBudget(_Section):
    """How often a replica group may be recreated before the deployment fails."""

    max_restarts: int = Field(3, ge=0, description="Group recreations allowed within window.")
    window: str = Field("30m", pattern=DURATION_PATTERN, description="Window over which restarts are counted.")


class EngineSpec(_Section):
    """The engine pods."""

    backend: Literal[tuple(BACKENDS)] = Field(  # type: ignore[valid-type]
        DEFAULT_BACKEND, description="Inference engine run in the pods (moeshard: MoEShard's own EP/TP engine)."
    )
    image: str = Field(ENGINE_IMAGE, description="Engine container image (default: the engine image of this release).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy."
    )
    port: int = Field(8000, ge=1, le=65535,
                      description="HTTP port of the completions API on rank 0 of a group (not 29500, the rendezvous port).")

    @field_validator("port")
    @classmethod
    def _not_rendezvous(cls, value: int) -> int:
        if value == RENDEZVOUS_PORT:
            raise ValueError(f"{RENDEZVOUS_PORT} is the torch.distributed rendezvous port; choose another")
        return value
    resources: Resources = Field(default_factory=Resources, description="CPU and memory per pod.")
    group_kind: Literal["StatefulSet", "LeaderWorkerSet"] = Field(
        "StatefulSet", description="Object that runs one replica group. LeaderWorkerSet needs its CRD installed."
    )
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Scheduling hooks.")
    restart_budget: RestartBudget = Field(default_factory=RestartBudget, description="Group restart budget.")
    max_unavailable: int = Field(1, ge=1, description="Replica groups that may be rolled at once.")
    shm_size: str = Field("8Gi", pattern=QUANTITY_PATTERN,
                          description="Size limit of /dev/shm (a memory emptyDir for NCCL / gloo); counts against memory.")
    startup_timeout: str = Field("30m", pattern=DURATION_PATTERN,
                                 description="Model loading budget: the startup probe waits this long for the first step.")
    progress_deadline: str = Field(
        "10m", pattern=DURATION_PATTERN,
        description="How long a replica group's pods may wait for a node (or for Kueue admission) before the "
                    "deployment reports ProgressDeadlineExceeded with the scheduler's reason (Stalled in kstatus).")
    stall_timeout: str = Field("5m", pattern=DURATION_PATTERN,
                               description="A rank without a step boundary for this long is restarted (liveness probe).")
    network_policy: bool = Field(False, description="A NetworkPolicy per group: every port (rendezvous, NCCL/gloo "
                                 "sockets) only from the group's own pods, the HTTP port from anywhere.")
    capabilities: list[Literal["IPC_LOCK", "SYS_RESOURCE", "NET_RAW", "NET_ADMIN"]] = Field(
        default_factory=list,
        description="Linux capabilities added back to the engine container (all others are dropped): IPC_LOCK for "
                    "RDMA memory registration (InfiniBand/RoCE verbs), SYS_RESOURCE to raise the locked-memory limit.")


# --------------------------------------------------------------------------- the resource


class MoEDeploymentSpec(_Section):
    """Desired state of a MoEDeployment."""

    model: ModelSpec = Field(description="The MoE model to serve.")
    hardware: HardwareSpec = Field(description="GPU type and interconnect.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Fixed parallel sizes.")
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec, description="Traffic the plan is sized for.")
    load_balancing: LoadBalancingSpec = Field(default_factory=LoadBalancingSpec, description="Hot-expert replication.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Engine pods.")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale replica groups on serving load (an HPA or KEDA object the operator owns).")

    @model_validator(mode="after")
    def _cross_field(self) -> "MoEDeploymentSpec":
        # The rules below are mirrored by CEL rules in crd.py (SPEC_RULES).
        arch = self.model.resolve()
        where = "model.preset" if self.model.preset else "model.architecture.type"
        get_backend(self.engine.backend).check_model(arch, f"{where} ({self.model.preset or arch.architecture})")
        hw = self.hardware.resolve()
        slots = arch.num_experts + self.load_balancing.redundant_slots
        ep, tp = self.parallelism.expert_ep, self.parallelism.attention_tp
        if ep is not None and slots % ep:
            raise ValueError(
                f"parallelism.expertEP ({ep}) must divide numExperts + loadBalancing.redundantSlots ({slots})"
            )
        if ep is not None and ep > arch.num_experts:
            raise ValueError(f"parallelism.expertEP ({ep}) exceeds the model's {arch.num_experts} experts")
        if tp is not None and tp > hw.gpus_per_node:
            raise ValueError(
                f"parallelism.attentionTP ({tp}) exceeds the {hw.gpus_per_node} GPUs of one node: "
                "a TP group must stay inside one pod"
            )
        if tp is not None and arch.num_attention_heads % tp:
            raise ValueError(
                f"parallelism.attentionTP ({tp}) must divide the model's {arch.num_attention_heads} attention heads"
            )
        return self


class SpecError(UserError):
    """A bad MoEDeployment spec; ``field`` is the JSON path (``spec.parallelism.expertEP``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_FIELD_IN_MESSAGE = re.compile(r"^((?:parallelism|loadBalancing|model|hardware|workload|engine|autoscaling|metadata)\.[A-Za-z.]+)")
_LOCAL_FIELD_IN_MESSAGE = re.compile(r"^([a-z][A-Za-z0-9.]*) \(")


def _error_path(error: dict[str, Any], prefix: str) -> str:
    parts = [prefix] + [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    message = error["msg"].removeprefix("Value error, ")
    # A model validator names the field itself ("parallelism.expertEP (12) must ..."):
    # prefer that path to the section the validator sits on.
    match = _FIELD_IN_MESSAGE.match(message)
    if match:
        return f"{prefix}.{match.group(1)}"
    match = _LOCAL_FIELD_IN_MESSAGE.match(message)
    if match and error["type"] == "value_error":
        parts.append(match.group(1))
    return ".".join(parts)


# pydantic's strict type errors, in the API server's words ("must be of type integer").
_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean (true or false)",
               "string_type": "a string", "dict_type": "an object", "list_type": "a list",
               "model_type": "an object", "model_attributes_type": "an object"}


def _json_type(value: Any) -> str:
    """The YAML/JSON type name of a parsed value, for error messages."""
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (dict, "object"), (list, "list"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def parse_spec(spec: Any, prefix: str = "spec") -> MoEDeploymentSpec:
    """Validate a spec dict; raise SpecError naming the first bad field in one line."""
    if not isinstance(spec, dict):
        raise SpecError(prefix, f"must be an object, got {type(spec).__name__}")
    try:
        return MoEDeploymentSpec.model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "string_pattern_mismatch":
            message = f"{error.get('input')!r} does not match the pattern {error['ctx']['pattern']}"
        elif error["type"] in _TYPE_NAMES:
            message = f"must be {_TYPE_NAMES[error['type']]}, got {_json_type(error.get('input'))} {error.get('input')!r}"
        return_path = _error_path(error, prefix)
        # A validator that names its field ("parallelism.expertEP (12) must ...") need not say it twice.
        local = return_path.removeprefix(prefix + ".")
        if message.startswith(local + " "):
            message = message[len(local) + 1:]
        raise SpecError(return_path, message) from None


def parse_resource(body: Any) -> MoEDeploymentSpec:
    """Validate a whole MoEDeployment object (apiVersion, kind, metadata.name, spec)."""
    if not isinstance(body, dict):
        raise SpecError("(document)", "must be a YAML mapping with apiVersion, kind, metadata and spec")
    if body.get("apiVersion") != API_VERSION:
        raise SpecError("apiVersion", f"must be {API_VERSION}, got {body.get('apiVersion')!r}")
    if body.get("kind") != KIND:
        raise SpecError("kind", f"must be {KIND}, got {body.get('kind')!r}")
    name = (body.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            "metadata.name",
            f"must be a lowercase DNS label starting with a letter, at most {MAX_NAME_LENGTH} characters, got {name!r}",
        )
    namespace = body["metadata"].get("namespace")
    if namespace is not None:
        check_namespace(namespace, "metadata.namespace")
    return parse_spec(body.get("spec"))


def check_namespace(namespace: Any, field: str) -> str:
    """A namespace name (lowercase RFC 1123 label, at most 63 characters); SpecError naming ``field``."""
    if not isinstance(namespace, str) or not re.fullmatch(DNS_LABEL_PATTERN, namespace) or len(namespace) > 63:
        raise SpecError(field, f"must be a lowercase DNS label (a-z, 0-9, '-'; at most 63 characters), "
                               f"got {namespace!r}")
    return namespace


__all__ = [
    "API_VERSION", "ARCHITECTURES", "AUTOSCALING_TARGETS", "CACHE_ACCESS_MODES", "DNS_LABEL_PATTERN",
    "DNS_SUBDOMAIN_PATTERN", "DURATION_PATTERN", "ENGINE_ARCHITECTURES", "GROUP", "KIND", "LABEL_VALUE_PATTERN",
    "MAX_DNS_SUBDOMAIN_LENGTH",
    "MAX_LABEL_VALUE_LENGTH", "MAX_NAME_LENGTH", "MAX_QUALIFIED_NAME_LENGTH", "MAX_STABILIZATION_SECONDS",
    "NAME_PATTERN", "PLURAL", "QUALIFIED_NAME_PATTERN", "QUANTITY_PATTERN", "SHORT_NAMES", "SINGULAR", "VERSION",
    "ArchitectureFields", "AutoscalingSpec", "AutoscalingTarget", "Condition", "CustomHardware", "EngineSpec",
    "HardwareSpec", "LoadBalancingSpec", "MoEDeploymentSpec", "MoEDeploymentStatus", "ModelSpec",
    "ParallelismSpec", "PlanStatus", "SpecError", "WeightsCache", "WeightsSource", "WorkloadSpec",
    "check_namespace", "check_qualified_names", "parse_duration", "parse_resource", "parse_spec",
]
