"""``status`` of a MoEDeployment: written only by the operator (reconciler and balancer)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from .api_base import _Section

class Condition(_Section):
    """A status condition (metav1.Condition)."""

    type: str = Field(description="Planned, Available, Progressing, Degraded, Ready, Reconciling, Stalled, "
                                  "WeightsReady, Balanced or MetricsAvailable.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail; names the spec field for bad input.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="Generation the condition was computed from.")


class PlanStatus(_Section):
    """The plan the operator deployed, with its estimates."""

    attention_tp: int = Field(alias="attentionTP", description="Attention tensor-parallel size.")
    expert_ep: int = Field(alias="expertEP", description="Expert-parallel size (GPUs per replica).")
    replicas: int = Field(description="DP replicas.")
    pods_per_replica: int = Field(description="Pods in one replica group.")
    gpus_per_pod: int = Field(description="GPUs (engine ranks) per pod.")
    slots_per_gpu: int = Field(description="Physical expert slots per GPU and layer.")
    crosses_fabric: bool = Field(description="Whether one replica's all-to-all leaves the NVLink domain.")
    tokens_per_expert: float = Field(description="Mean tokens per expert in one prefill batch.")
    dispatch_micros: float = Field(description="Estimated dispatch time per MoE layer, microseconds.")
    gemm_micros: float = Field(description="Estimated expert GEMM time per MoE layer, microseconds.")
    combine_micros: float = Field(description="Estimated combine time per MoE layer, microseconds.")
    step_micros: float = Field(description="Estimated time per layer of the planner's objective, microseconds.")
    verdict: str = Field(description="Bottleneck of the plan.")


class WeightsStatus(_Section):
    """The checkpoint the pods read, and for hf:// the download Job's progress."""

    source: str = Field(description="spec.model.weights.uri (and @revision).")
    phase: Literal["Provided", "Pending", "Downloading", "Succeeded", "Failed"] = Field(
        description="Provided (pvc:// or file://, mounted as is), or the download Job's phase.")
    claim: str | None = Field(None, description="PersistentVolumeClaim the checkpoint is downloaded into (hf://).")
    job: str | None = Field(None, description="Job downloading it (hf://).")
    active: int | None = Field(None, description="Download pods running.")
    succeeded: int | None = Field(None, description="Download pods that finished.")
    failed: int | None = Field(None, description="Download pods that failed (the Job retries up to its backoffLimit).")
    start_time: str | None = Field(None, description="When the Job started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the download finished (RFC 3339).")


class MoEDeploymentStatus(_Section):
    """Observed state, written only by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    observed_generation: int | None = Field(None, description="Generation of spec that status reflects.")
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"] | None = Field(
        None, description="Pending, Progressing, Ready, Degraded or Failed."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    plan: PlanStatus | None = Field(None, description="Chosen parallelism plan and its estimates.")
    replicas: int | None = Field(None, description="Replica groups desired (scale subresource status).")
    ready_replicas: int | None = Field(None, description="Replica groups with every pod ready.")
    selector: str | None = Field(None, description="Label selector of engine pods (scale subresource).")
    draining_replicas: int | None = Field(
        None, description="Replica groups above the desired count, out of the front Service, finishing their "
        "running requests before deletion.")
    weights: WeightsStatus | None = Field(None, description="The checkpoint and its download (WeightsReady).")
    placement_version: int | None = Field(None, description="Version of the expert placement in the ConfigMap.")
    imbalance_before: float | None = Field(None, description="Max/mean GPU load under the previous placement.")
    imbalance_after: float | None = Field(None, description="Predicted max/mean GPU load under the current placement.")
    replicated_experts: int | None = Field(None, description="Logical experts with more than one replica (all layers).")
    last_rebalance_time: str | None = Field(None, description="When the placement last changed (RFC 3339).")
    group_placement_versions: dict[str, int] | None = Field(
        None, description="Placement version each replica group serves, by replica index (from its metrics)."
    )
