"""``spec.autoscaling`` of a MoEDeployment: replica groups that follow serving load (operator/autoscaling.py builds it).

Cross-field rules are mirrored by CEL rules in crd.py (SPEC_RULES).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .api_base import DURATION_PATTERN, _Section, parse_duration

MAX_STABILIZATION_SECONDS = 3600  # autoscaling/v2 stabilizationWindowSeconds <= 3600
AUTOSCALING_TARGETS = ("waitingRequestsPerReplica", "kvCacheUsage", "timeToFirstTokenP90Seconds")


class AutoscalingTarget(_Section):
    """The one serving signal the replica count follows. Set exactly one field."""

    waiting_requests_per_replica: float | None = Field(
        None, gt=0, le=100000,
        description="Requests waiting in the engine queue per replica group (moeshard_requests_waiting, averaged "
        "over groups) the autoscaler keeps replicas at.",
    )
    kv_cache_usage: float | None = Field(
        None, gt=0, le=1, alias="kvCacheUsage",
        description="Fraction of KV cache in use per replica group (moeshard_kv_cache_usage_ratio, 0..1, averaged "
        "over groups) the autoscaler keeps replicas at.",
    )
    time_to_first_token_p90_seconds: float | None = Field(
        None, gt=0, le=3600, alias="timeToFirstTokenP90Seconds",
        description="90th percentile of time to first token over the deployment, seconds "
        "(moeshard_time_to_first_token_seconds) the autoscaler keeps replicas at.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "AutoscalingTarget":
        chosen = [name for name, value in self.model_dump(by_alias=True).items() if value is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of {', '.join(AUTOSCALING_TARGETS)} (got {len(chosen)})")
        return self

    @property
    def kind(self) -> str:
        """The camelCase name of the field that is set."""
        return next(name for name, value in self.model_dump(by_alias=True).items() if value is not None)

    @property
    def value(self) -> float:
        return float(self.model_dump(by_alias=True)[self.kind])


class AutoscalingSpec(_Section):
    """Replica groups follow serving load: an HPA or a KEDA ScaledObject writes spec.parallelism.replicas
    through the scale subresource; the operator builds that object, never the replica count."""

    enabled: bool = Field(True, description="Build the autoscaler object; false removes it and leaves replicas as they are.")
    engine: Literal["hpa", "keda"] = Field(
        "hpa", description="hpa: an autoscaling/v2 HorizontalPodAutoscaler on an External metric (needs a metrics "
        "adapter serving the recording rule); keda: a KEDA ScaledObject with a Prometheus trigger (needs KEDA; "
        "allows minReplicas 0).",
    )
    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest replica groups; 0 (scale to zero) needs engine keda.")
    max_replicas: int = Field(ge=1, le=1024, description="Most replica groups.")
    target: AutoscalingTarget = Field(description="The serving signal and its target value.")
    scale_down_stabilization: str = Field(
        "5m", pattern=DURATION_PATTERN,
        description="Scale in only to the highest replica count recommended over this window (Go duration).",
    )
    wake_query: str | None = Field(
        None, min_length=1, max_length=2000,
        description="engine keda: PromQL of demand that exists while no group runs (e.g. requests waiting in a "
        "gateway in front of the deployment), in the target's unit; a second trigger that brings the deployment "
        "back from zero groups when it is above 0 (the engines' own series vanish with their groups).",
    )
    drain_timeout: str = Field(
        "2m", pattern=DURATION_PATTERN,
        description="How long a group removed by a scale-in keeps finishing its running requests, out of the "
        "front Service, before it is deleted (Go duration).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        # Mirrored by CEL rules in crd.py (SPEC_RULES["spec.autoscaling"]).
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})")
        if self.min_replicas == 0 and self.engine != "keda":
            raise ValueError("minReplicas (0) needs engine keda: an HPA cannot scale to zero")
        if self.wake_query is not None and self.engine != "keda":
            raise ValueError("wakeQuery (a KEDA trigger) needs engine keda")
        return self

    @field_validator("scale_down_stabilization")
    @classmethod
    def _within_hpa_limit(cls, value: str) -> str:
        if parse_duration(value) > MAX_STABILIZATION_SECONDS:
            raise ValueError("must not exceed 1h (the HPA's limit)")
        return value
