"""Names and labels of the objects the operator owns, and of the metrics the engine exports.

One place, so that the operator, the balancer, the engine and the chart agree.
"""

from __future__ import annotations

# The MoEDeployment API (group, version, kind); the pydantic models live in moeshard.operator.api.
GROUP = "moeshard.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]

# The GPU resource engine pods request (NVIDIA device plugin).
GPU_RESOURCE = "nvidia.com/gpu"

# Labels on every child object and engine pod.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_REPLICA = f"{GROUP}/replica"
FINALIZER = f"{GROUP}/cleanup"

# Metrics exported by the engine (moeshard.engine) and read by the balancer.
METRIC_EXPERT_TOKENS = "moeshard_expert_tokens_total"  # counter {layer, expert} + the scope labels below
METRIC_RANK_TOKENS = "moeshard_rank_tokens_total"  # counter {rank}: token rows received (dispatch traffic)
METRIC_RANK_PAIRS = "moeshard_rank_expert_pairs_total"  # counter {rank}: (token, expert) pairs computed (GEMM load)
METRIC_REQUEST_LATENCY = "moeshard_request_latency_seconds"  # histogram
METRIC_PLACEMENT_VERSION = "moeshard_placement_version"  # gauge
METRIC_PLACEMENT_REJECTED = "moeshard_placement_rejected_total"  # counter: invalid placement files refused
# Serving metrics (rank 0 of each group); the autoscaler, the chart's dashboard and alerts read them.
METRIC_TTFT = "moeshard_time_to_first_token_seconds"  # histogram: arrival -> first token of a request
METRIC_ITL = "moeshard_inter_token_latency_seconds"  # histogram: between two tokens of one sequence
METRIC_QUEUE_TIME = "moeshard_request_queue_seconds"  # histogram: arrival -> first scheduled
METRIC_RUNNING = "moeshard_requests_running"  # gauge: sequences in the running batch
METRIC_WAITING = "moeshard_requests_waiting"  # gauge: sequences waiting (new or preempted)
METRIC_KV_BLOCKS = "moeshard_kv_blocks"  # gauge {state="used"|"free"}, summed over attention-DP groups
METRIC_KV_USAGE = "moeshard_kv_cache_usage_ratio"  # gauge 0..1: used / all KV blocks of the group
METRIC_PROMPT_TOKENS = "moeshard_prompt_tokens_total"  # counter: prompt tokens of admitted requests (x n)
METRIC_GENERATION_TOKENS = "moeshard_generation_tokens_total"  # counter: sampled tokens
METRIC_PREEMPTIONS = "moeshard_preemptions_total"  # counter: sequences preempted for recomputation
# Scope labels the engine adds to every metric so one Prometheus can hold many deployments.
SCOPE_DEPLOYMENT = "moeshard_deployment"
SCOPE_NAMESPACE = "moeshard_namespace"
SCOPE_REPLICA = "moeshard_replica"


def base_labels(name: str) -> dict[str, str]:
    return {
        LABEL_NAME: "moeshard-engine",
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: "moeshard-operator",
        LABEL_DEPLOYMENT: name,
    }


def pod_selector(name: str) -> str:
    """Label selector of all engine pods of a deployment (status.selector for /scale)."""
    return f"{LABEL_DEPLOYMENT}={name},{LABEL_NAME}=moeshard-engine"


def config_map_name(name: str) -> str:
    """ConfigMap with plan.json and placement.json."""
    return f"{name}-config"


def group_name(name: str, replica: int) -> str:
    """StatefulSet / LeaderWorkerSet of replica group ``replica``."""
    return f"{name}-r{replica}"


def headless_service_name(name: str, replica: int) -> str:
    return f"{name}-r{replica}-ranks"


def service_name(name: str) -> str:
    """Service in front of rank 0 of every replica."""
    return name


def weights_cache_name(name: str, key: str) -> str:
    """PersistentVolumeClaim and download Job of one hf:// checkpoint (``key``: WeightsSource.cache_key())."""
    return f"{name}-weights-{key}"
