"""Prometheus metrics of one engine group, exported by rank 0 on ``GET /metrics``.

The balancer reads ``moeshard_expert_tokens_total{layer, expert}`` with
``sum by (layer, expert) (increase(...[window]))``, so the counts here are
GROUP totals per LOGICAL expert: after every step the ranks' deltas are summed
(one all-reduce in the step loop) and rank 0 adds them here. A (token, expert)
pair is counted once, whatever replica served it. ``layer`` is the MoE layer's
index in the placement file's ``layers`` (0..L-1), not the decoder layer id.
Every (layer, expert) series exists from the start at 0: the balancer treats a
missing series as partial data.

Every series also carries the scope labels of ``moeshard.core.naming``
(deployment, namespace, replica) so one Prometheus can hold many deployments.
The registry is private (never the process-global default one), so several
engines in one test process do not collide.

Shape legend: L MoE layers, E logical experts per layer, W ranks in the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moeshard.core.engine_env import EngineEnvironment
from moeshard.core.naming import (
    METRIC_EXPERT_TOKENS,
    METRIC_GENERATION_TOKENS,
    METRIC_ITL,
    METRIC_KV_BLOCKS,
    METRIC_KV_USAGE,
    METRIC_PLACEMENT_REJECTED,
    METRIC_PLACEMENT_VERSION,
    METRIC_RANK_PAIRS,
    METRIC_RANK_TOKENS,
    METRIC_PREEMPTIONS,
    METRIC_PROMPT_TOKENS,
    METRIC_QUEUE_TIME,
    METRIC_REQUEST_LATENCY,
    METRIC_RUNNING,
    METRIC_TTFT,
    METRIC_WAITING,
    SCOPE_DEPLOYMENT,
    SCOPE_NAMESPACE,
    SCOPE_REPLICA,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Token latency buckets in seconds: milliseconds per token on a GPU, up to seconds on CPU ranks.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Request latency buckets in seconds: a decode step is milliseconds on a GPU,
# a long completion on CPU takes tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SCOPE_NAMES = (SCOPE_DEPLOYMENT, SCOPE_NAMESPACE, SCOPE_REPLICA)


@dataclass(frozen=True)
class MetricScope:
    """Values of the scope labels carried by every series."""

    deployment: str
    namespace: str
    replica: int

    @classmethod
    def from_env(cls, env: EngineEnvironment) -> "MetricScope":
        return cls(env.deployment, env.namespace, env.replica_index)

    def values(self) -> tuple[str, str, str]:
        return (self.deployment, self.namespace, str(self.replica))


class EngineMetrics:
    """The engine's metric families in a private registry.

    ``num_layers`` x ``num_experts`` expert series and ``world_size`` rank
    series are created at zero up front, so an expert that never receives a
    token is still visible (``increase()`` of a missing series is no data, not 0).
    """

    def __init__(self, scope: MetricScope, *, num_layers: int, num_experts: int, world_size: int):
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.scope = scope
        self.num_layers, self.num_experts, self.world_size = num_layers, num_experts, world_size
        self.registry = CollectorRegistry(auto_describe=True)
        self._expert_tokens = Counter(
            METRIC_EXPERT_TOKENS, "Tokens routed to each logical expert of each MoE layer, summed over the group's ranks.",
            (*_SCOPE_NAMES, "layer", "expert"), registry=self.registry,
        )
        self._rank_tokens = Counter(
            METRIC_RANK_TOKENS, "Token rows dispatched to each rank's experts (one per token and destination rank), summed over the group.",
            (*_SCOPE_NAMES, "rank"), registry=self.registry,
        )
        self._rank_pairs = Counter(
            METRIC_RANK_PAIRS, "(token, expert) pairs computed by each rank's experts, summed over the group: "
            "the expert GEMM load the balancer evens out.",
            (*_SCOPE_NAMES, "rank"), registry=self.registry,
        )
        self._latency = Histogram(
            METRIC_REQUEST_LATENCY, "Completion request latency, from arrival on rank 0 to the response.",
            _SCOPE_NAMES, buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._version = Gauge(
            METRIC_PLACEMENT_VERSION, "Version of the expert placement all ranks are using.",
            _SCOPE_NAMES, registry=self.registry,
        )
        self._rejected = Counter(
            METRIC_PLACEMENT_REJECTED, "Placement files refused as invalid for this group (the old placement stays).",
            _SCOPE_NAMES, registry=self.registry,
        )
        self._ttft = Histogram(METRIC_TTFT, "Time from a request's arrival to its first generated token.",
                               _SCOPE_NAMES, buckets=LATENCY_BUCKETS, registry=self.registry)
        self._itl = Histogram(METRIC_ITL, "Time between two generated tokens of one sequence.",
                              _SCOPE_NAMES, buckets=TOKEN_BUCKETS, registry=self.registry)
        self._queue = Histogram(METRIC_QUEUE_TIME, "Time from a request's arrival to its first scheduled step.",
                                _SCOPE_NAMES, buckets=LATENCY_BUCKETS, registry=self.registry)
        self._running = Gauge(METRIC_RUNNING, "Sequences in the running batch.", _SCOPE_NAMES, registry=self.registry)
        self._waiting = Gauge(METRIC_WAITING, "Sequences waiting to be scheduled (new or preempted).", _SCOPE_NAMES,
                              registry=self.registry)
        self._blocks = Gauge(METRIC_KV_BLOCKS, "Paged KV cache blocks by state, summed over attention-DP groups.",
                             (*_SCOPE_NAMES, "state"), registry=self.registry)
        self._kv_usage = Gauge(METRIC_KV_USAGE, "Fraction of the group's paged KV cache blocks in use (0..1).",
                               _SCOPE_NAMES, registry=self.registry)
        self._prompt_tokens = Counter(METRIC_PROMPT_TOKENS, "Prompt tokens of admitted requests (times n).",
                                      _SCOPE_NAMES, registry=self.registry)
        self._generation_tokens = Counter(METRIC_GENERATION_TOKENS, "Generated (sampled) tokens.", _SCOPE_NAMES,
                                          registry=self.registry)
        self._preemptions = Counter(METRIC_PREEMPTIONS, "Sequences preempted (KV blocks freed) for recomputation.",
                                    _SCOPE_NAMES, registry=self.registry)
        scope_values = scope.values()
        self._serving = {name: family.labels(*scope_values) for name, family in (
            ("ttft", self._ttft), ("itl", self._itl), ("queue", self._queue), ("running", self._running),
            ("waiting", self._waiting), ("kv_usage", self._kv_usage), ("prompt", self._prompt_tokens), ("generation", self._generation_tokens),
            ("preemptions", self._preemptions))}
        self._blocks_used = self._blocks.labels(*scope_values, "used")
        self._blocks_free = self._blocks.labels(*scope_values, "free")
        # Children are resolved once; labels() is a dict lookup under a lock.
        self._expert_children = [
            [self._expert_tokens.labels(*scope_values, str(layer), str(expert)) for expert in range(num_experts)]
            for layer in range(num_layers)
        ]
        self._rank_children = [self._rank_tokens.labels(*scope_values, str(rank)) for rank in range(world_size)]
        self._pair_children = [self._rank_pairs.labels(*scope_values, str(rank)) for rank in range(world_size)]
        self._latency_child = self._latency.labels(*scope_values)
        self._version_child = self._version.labels(*scope_values)
        self._rejected_child = self._rejected.labels(*scope_values)

    # ------------------------------------------------------------------ updates

    def add_expert_tokens(self, delta: np.ndarray) -> None:
        """Add group-total token counts ``delta`` [L, E] (non-negative integers)."""
        delta = np.asarray(delta)
        if delta.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"expert token delta has shape {delta.shape}, expected {(self.num_layers, self.num_experts)}")
        if np.any(delta < 0):
            raise ValueError("expert token delta has negative entries: counters only increase")
        for layer, expert in zip(*np.nonzero(delta)):
            self._expert_children[layer][expert].inc(float(delta[layer, expert]))

    def add_rank_tokens(self, delta: np.ndarray) -> None:
        """Add per-rank token-row counts ``delta`` [W]."""
        self._add_per_rank(self._rank_children, delta, "rank token")

    def add_rank_pairs(self, delta: np.ndarray) -> None:
        """Add per-rank (token, expert) pair counts ``delta`` [W]."""
        self._add_per_rank(self._pair_children, delta, "rank pair")

    def _add_per_rank(self, children: list, delta: np.ndarray, what: str) -> None:
        delta = np.asarray(delta)
        if delta.shape != (self.world_size,):
            raise ValueError(f"{what} delta has shape {delta.shape}, expected {(self.world_size,)}")
        if np.any(delta < 0):
            raise ValueError(f"{what} delta has negative entries: counters only increase")
        for rank in np.nonzero(delta)[0]:
            children[rank].inc(float(delta[rank]))

    def observe_request_latency(self, seconds: float) -> None:
        self._latency_child.observe(seconds)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self._serving["ttft"].observe(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self._serving["itl"].observe(seconds)

    def observe_queue_time(self, seconds: float) -> None:
        self._serving["queue"].observe(seconds)

    def set_scheduler_state(self, *, running: int, waiting: int, blocks_used: int, blocks_free: int) -> None:
        self._serving["running"].set(running)
        self._serving["waiting"].set(waiting)
        self._blocks_used.set(blocks_used)
        self._blocks_free.set(blocks_free)
        total = blocks_used + blocks_free
        self._serving["kv_usage"].set(blocks_used / total if total else 0.0)

    def add_prompt_tokens(self, count: int) -> None:
        self._serving["prompt"].inc(count)

    def add_generation_tokens(self, count: int) -> None:
        self._serving["generation"].inc(count)

    def add_preemptions(self, count: int) -> None:
        self._serving["preemptions"].inc(count)

    def set_placement_version(self, version: int) -> None:
        self._version_child.set(version)

    def count_rejected_placement(self) -> None:
        self._rejected_child.inc()

    # ------------------------------------------------------------------ reads

    def exposition(self) -> bytes:
        """The Prometheus text format of every series (what GET /metrics returns)."""
        return generate_latest(self.registry)

    def expert_tokens(self) -> np.ndarray:
        """Current counter values [L, E] (for tests and logs)."""
        counts = np.zeros((self.num_layers, self.num_experts))
        for family in self._expert_tokens.collect():
            for sample in family.samples:
                if sample.name == METRIC_EXPERT_TOKENS:
                    counts[int(sample.labels["layer"]), int(sample.labels["expert"])] = sample.value
        return counts
