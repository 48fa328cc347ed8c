"""Autoscaling on serving load: the HPA or KEDA object of a MoEDeployment, and its Prometheus rules. Pure.

The operator never writes ``spec.parallelism.replicas``; the object built here
does, through the MoEDeployment's ``/scale`` subresource:

    engine metrics (rank 0 of every group)          recording rule (per deployment)
      moeshard_requests_waiting        gauge   ->   moeshard_requests_waiting_per_replica
      moeshard_kv_cache_usage_ratio    gauge   ->   moeshard_kv_cache_usage_per_replica
      moeshard_time_to_first_token_seconds hist ->  moeshard_time_to_first_token_p90_seconds
    each labelled moeshard_deployment, moeshard_namespace, moeshard_replica.

* ``engine: hpa``: an ``autoscaling/v2`` HorizontalPodAutoscaler whose one
  metric is External, named like the recording rule (so a metrics adapter such
  as prometheus-adapter serves it without renaming), selected by the
  deployment's scope labels, with a ``Value`` target. The HPA controller then
  computes ``desired = ceil(current * metric / target)`` (the documented
  formula; a tolerance of 10 % keeps it still near the target).
* ``engine: keda``: a KEDA ``ScaledObject`` with one ``prometheus`` trigger
  querying the same recorded series at ``spec.loadBalancing.prometheusURL``
  (``metricType: Value``: the series already is a per-replica figure), and a
  second one on ``wakeQuery`` when set: at zero groups the engines' series are
  gone, so only a demand signal from outside them (a gateway's queue) can wake
  the deployment.

Both scale in one group per minute at most, after the stabilisation window.
The names are those the engine exports (a separate change adds them to the
engine); the recording rules and the queries below are the only readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeshard.core import naming

from .api import API_VERSION, KIND, AutoscalingSpec, parse_duration
from .deployment import Deployment
from .manifests import build_owner_reference, with_hash

# Serving metrics of the engine (rank 0 of each group), with the scope labels of naming.SCOPE_*.
METRIC_REQUESTS_WAITING = naming.METRIC_WAITING  # gauge: requests queued, not yet running
METRIC_KV_CACHE_USAGE = naming.METRIC_KV_USAGE  # gauge 0..1: KV cache blocks in use
METRIC_TTFT = naming.METRIC_TTFT  # histogram

HPA_API_VERSION = "autoscaling/v2"
KEDA_API_VERSION = "keda.sh/v1alpha1"
COMPONENT_AUTOSCALER = "autoscaler"
SCALE_DOWN_GROUPS_PER_PERIOD = 1  # replica groups are expensive: remove one ...
SCALE_DOWN_PERIOD_SECONDS = 60  # ... per minute at most
KEDA_POLLING_SECONDS = 15
TTFT_RATE_WINDOW = "2m"


@dataclass(frozen=True)
class ServingSignal:
    """One autoscaling target: the recorded series it reads and how that series is computed.

    ``record`` is the recording rule's name (and the External metric's name);
    ``expr`` the PromQL that produces it, one value per
    (moeshard_namespace, moeshard_deployment).
    """

    target_field: str  # the spec.autoscaling.target field that selects it
    record: str
    expr: str


_BY = f"{naming.SCOPE_NAMESPACE}, {naming.SCOPE_DEPLOYMENT}"
SIGNALS: dict[str, ServingSignal] = {
    s.target_field: s for s in (
        ServingSignal("waitingRequestsPerReplica", "moeshard_requests_waiting_per_replica",
                      f"avg by ({_BY}) ({METRIC_REQUESTS_WAITING})"),
        ServingSignal("kvCacheUsage", "moeshard_kv_cache_usage_per_replica",
                      f"avg by ({_BY}) ({METRIC_KV_CACHE_USAGE})"),
        ServingSignal("timeToFirstTokenP90Seconds", "moeshard_time_to_first_token_p90_seconds",
                      f"histogram_quantile(0.9, sum by ({_BY}, le) "
                      f"(rate({METRIC_TTFT}_bucket[{TTFT_RATE_WINDOW}])))"),
    )
}


def signal_of(spec: AutoscalingSpec) -> ServingSignal:
    return SIGNALS[spec.target.kind]


def scope_selector(d: Deployment) -> dict[str, str]:
    """The scope labels that pick one deployment's series."""
    return {naming.SCOPE_NAMESPACE: d.namespace, naming.SCOPE_DEPLOYMENT: d.name}


def quantity(value: float) -> str:
    """A Kubernetes quantity for a positive target: ``8``, ``800m`` (0.8), ``2500m`` (2.5); milli precision."""
    if value <= 0:
        raise ValueError(f"a target must be positive, got {value}")
    if float(value).is_integer():
        return str(int(value))
    return f"{max(1, round(value * 1000))}m"


def _metadata(d: Deployment) -> dict[str, Any]:
    return {
        "name": naming.service_name(d.name),  # one autoscaler per deployment, named like it
        "namespace": d.namespace,
        "labels": naming.base_labels(d.name) | {naming.LABEL_COMPONENT: COMPONENT_AUTOSCALER},
        "ownerReferences": [build_owner_reference(d)],
    }


def _scale_target(d: Deployment) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": d.name}


def _behavior(spec: AutoscalingSpec) -> dict[str, Any]:
    return {"scaleDown": {
        "stabilizationWindowSeconds": int(parse_duration(spec.scale_down_stabilization)),
        "policies": [{"type": "Pods", "value": SCALE_DOWN_GROUPS_PER_PERIOD,
                      "periodSeconds": SCALE_DOWN_PERIOD_SECONDS}],
    }}


def build_hpa(d: Deployment) -> dict[str, Any]:
    """autoscaling/v2 HorizontalPodAutoscaler on the MoEDeployment's /scale, one External metric."""
    spec = _require(d)
    signal = signal_of(spec)
    return with_hash({
        "apiVersion": HPA_API_VERSION, "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(d),
        "spec": {
            "scaleTargetRef": _scale_target(d),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [{"type": "External", "external": {
                "metric": {"name": signal.record, "selector": {"matchLabels": scope_selector(d)}},
                "target": {"type": "Value", "value": quantity(spec.target.value)},
            }}],
            "behavior": _behavior(spec),
        },
    })


def keda_query(d: Deployment) -> str:
    """PromQL of the KEDA trigger: the recorded series of this deployment."""
    labels = ",".join(f'{k}="{v}"' for k, v in scope_selector(d).items())
    return f"{signal_of(_require(d)).record}{{{labels}}}"


def build_scaled_object(d: Deployment) -> dict[str, Any]:
    """KEDA ScaledObject on the MoEDeployment's /scale with one Prometheus trigger."""
    spec = _require(d)
    stabilization = int(parse_duration(spec.scale_down_stabilization))
    return with_hash({
        "apiVersion": KEDA_API_VERSION, "kind": "ScaledObject",
        "metadata": _metadata(d),
        "spec": {
            "scaleTargetRef": _scale_target(d),
            "pollingInterval": KEDA_POLLING_SECONDS,
            "cooldownPeriod": max(stabilization, KEDA_POLLING_SECONDS),  # before the last group goes (to zero)
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(spec)}},
            "triggers": [_prometheus_trigger(d, keda_query(d), spec.target.value)] + (
                [_prometheus_trigger(d, spec.wake_query, spec.target.value)] if spec.wake_query else []),
        },
    })


def _prometheus_trigger(d: Deployment, query: str, threshold: float) -> dict[str, Any]:
    """A KEDA prometheus trigger on ``query`` (a per-replica figure: metricType Value), active above 0."""
    return {
        "type": "prometheus",
        "metricType": "Value",
        "metadata": {"serverAddress": d.spec.load_balancing.prometheus_url, "query": query,
                     "threshold": str(threshold), "activationThreshold": "0"},
    }


def build_autoscaler(d: Deployment) -> dict[str, Any] | None:
    """The autoscaler object the spec asks for, or None (no section, or ``enabled: false``)."""
    spec = d.spec.autoscaling
    if spec is None or not spec.enabled:
        return None
    return build_scaled_object(d) if spec.engine == "keda" else build_hpa(d)


def build_recording_rules(interval: str = "15s") -> dict[str, Any]:
    """A Prometheus rule file (``groups:``) recording every serving signal per deployment, every ``interval``.

    The same groups go into a prometheus-operator PrometheusRule's ``spec``.
    """
    return {"groups": [{
        "name": "moeshard-autoscaling",
        "interval": interval,
        "rules": [{"record": s.record, "expr": s.expr} for s in SIGNALS.values()],
    }]}


def _require(d: Deployment) -> AutoscalingSpec:
    if d.spec.autoscaling is None:
        raise ValueError(f"{d.name}: spec.autoscaling is not set")
    return d.spec.autoscaling


__all__ = [
    "HPA_API_VERSION", "KEDA_API_VERSION", "METRIC_KV_CACHE_USAGE", "METRIC_REQUESTS_WAITING", "METRIC_TTFT",
    "SIGNALS", "ServingSignal", "build_autoscaler", "build_hpa", "build_recording_rules", "build_scaled_object",
    "keda_query", "quantity", "scope_selector",
]
