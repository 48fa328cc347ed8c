"""The step loop every rank runs; rank 0 leads (scheduler -> broadcast -> executor -> output processor).

One iteration, on every rank, collectives in this order::

    rank 0: take new / cancelled requests from the intake, drop expired ones,
            scheduler.schedule() -> StepPlan
    all:    broadcast the plan (rank 0 -> every rank)
    all:    runtime.execute(plan)                   (one forward over the mixed batch)
    all:    SUM all-reduce of expert-count deltas   (metrics on rank 0)
    rank 0: scheduler.on_step + output processing   (text deltas, stop strings, metrics)
    all:    at_step_boundary(): heartbeat hook, placement agreement and staged moves (reload.PlacementSync)

``at_step_boundary`` also runs once before the first step, so a placement
published while the group loaded is adopted before anything is served.
With nothing to do rank 0 waits up to ``idle_interval`` for a request, then
sends an idle plan, so an idle group still adopts new placements.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from http import HTTPStatus
from typing import Any, Protocol

import numpy as np
from moeshard.engine.api_schema import RequestError
from moeshard.engine.metrics import EngineMetrics
from moeshard.engine.output import ServingRequest
from moeshard.engine.heartbeat import HEARTBEAT
from moeshard.engine.reload import PlacementSync, PlacementWatcher
from moeshard.engine.scheduler import Scheduler, Sequence
from moeshard.engine.step_plan import GroupChannel, SampledToken, StepPlan

log = logging.getLogger("moeshard.engine.serving")


class Runtime(Protocol):
    """The part of moeshard.engine.runtime.EngineRuntime the step loop uses."""

    placement: Any
    placement_version: int

    def execute(self, plan: StepPlan) -> list[SampledToken]: ...

    def expert_token_counts(self) -> np.ndarray: ...

    def rank_token_counts(self) -> np.ndarray: ...

    def rank_pair_counts(self) -> np.ndarray: ...

    def move_layers(self, target: Any, layers: Any, *, old_rows: Any = None, timeout_s: float = ...) -> bool: ...


class Intake:
    """Thread-safe mailbox from the API layer to the step loop: new requests and cancellations."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, ServingRequest]] = queue.SimpleQueue()

    def submit(self, request: ServingRequest) -> None:
        self._queue.put(("add", request))

    def cancel(self, request: ServingRequest) -> None:
        """The client went away: free the request's sequences and KV blocks at the next step boundary."""
        self._queue.put(("cancel", request))

    def empty(self) -> bool:
        return self._queue.empty()

    def drain(self, wait: float) -> list[tuple[str, ServingRequest]]:
        """Everything queued now, waiting up to ``wait`` s for the first item."""
        items = []
        try:
            items.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            return items


class StepLoop:
    """See the module docstring. Rank 0 passes ``scheduler`` and ``intake``; the others pass neither."""

    def __init__(self, runtime: Runtime, channel: GroupChannel, *, scheduler: Scheduler | None = None,
                 intake: Intake | None = None, watcher: PlacementWatcher | None = None,
                 metrics: EngineMetrics | None = None, idle_interval: float = 0.5, on_placement: Any = None):
        self.runtime, self.channel, self.scheduler, self.intake = runtime, channel, scheduler, intake
        self.watcher, self.metrics, self.idle_interval = watcher, metrics, idle_interval
        self.on_placement = on_placement  # called on the leader with the adopted placement
        # Start-up agreement, adoption, staged per-layer moves and repair live in reload.PlacementSync.
        self.sync = PlacementSync(runtime, channel, watcher)
        if self.leader and (scheduler is None or intake is None):
            raise ValueError("rank 0 leads the step loop and needs the scheduler and the intake")
        self.stop_event = threading.Event()
        self.boundary_at = time.monotonic()  # when the loop last stood between two steps
        self._working = False
        self.steps = 0
        self.live: list[ServingRequest] = []
        self._last_token_at: dict[int, float] = {}  # seq_id -> when its last token came (inter-token latency)
        self._preemptions_seen = 0
        self._last_experts = np.asarray(runtime.expert_token_counts(), dtype=np.int64)
        self._last_ranks = np.asarray(runtime.rank_token_counts(), dtype=np.int64)
        self._last_pairs = np.asarray(runtime.rank_pair_counts(), dtype=np.int64)

    @property
    def leader(self) -> bool:
        return self.channel.rank == 0

    def stall_seconds(self, now: float | None = None) -> float:
        """Seconds since the last step boundary while work is pending; 0.0 when idle."""
        busy = self._working or bool(self.live) or (self.intake is not None and not self.intake.empty())
        return max(0.0, (time.monotonic() if now is None else now) - self.boundary_at) if busy else 0.0

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Loop until rank 0 broadcasts stop (rank 0: after ``stop_event`` and no work left)."""
        self.at_step_boundary()
        while True:
            plan = self.channel.broadcast_plan(self._next_plan() if self.leader else None)
            if plan.kind == "stop":
                return
            if plan.kind == "step":
                self._working = True
                try:
                    sampled = self.runtime.execute(plan)
                except BaseException as exc:
                    self._fail_all(RequestError(None, f"engine step failed: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR))
                    raise
                self.steps += 1
                self._publish_counts()
                if self.leader:
                    self._process(sampled)
            self.at_step_boundary()

    def at_step_boundary(self) -> None:
        """Everything that happens between two steps on every rank, in lock-step (COLLECTIVE)."""
        self.boundary_at, self._working = time.monotonic(), False
        self.heartbeat()
        self._agree_on_placement()

    def heartbeat(self) -> None:
        """The one call point per step for liveness: the heartbeat file every pod's liveness probe reads."""
        HEARTBEAT.beat()

    # ------------------------------------------------------------------ leader: planning

    def _next_plan(self) -> StepPlan:
        assert self.scheduler is not None and self.intake is not None
        wait = 0.0 if self.scheduler.has_work else self.idle_interval
        for kind, request in self.intake.drain(wait):
            if kind == "add":
                self._admit(request)
            else:
                self._cancel(request, "abort")
        now = time.monotonic()
        for request in [r for r in self.live if r.deadline < now]:
            self._cancel(request, "timeout")
            request.fail(RequestError(None, "no answer within the request timeout", HTTPStatus.GATEWAY_TIMEOUT))
        if self.stop_event.is_set() and not self.scheduler.has_work and self.intake.empty():
            return StepPlan("stop")
        plan = self.scheduler.schedule()
        for new in plan.new:
            owner = self.scheduler.by_id[new.seq_id].owner
            if owner.scheduled_at is None:
                owner.scheduled_at = now
                if self.metrics is not None:
                    self.metrics.observe_queue_time(now - owner.arrived)
                    self.metrics.add_prompt_tokens(owner.request.prompt_tokens * owner.request.n)
        self._update_gauges()
        return plan

    def _admit(self, request: ServingRequest) -> None:
        assert self.scheduler is not None
        spec = request.request
        try:
            for p, prompt in enumerate(spec.prompts):
                for j in range(spec.n):
                    seq = Sequence(prompt, spec.max_tokens, spec.stop_token_ids, spec.params, p * spec.n + j,
                                   owner=request)
                    request.sequences.append(self.scheduler.add(seq))
        except ValueError as exc:
            for seq in request.sequences:
                self.scheduler.finish(seq, "abort")
            request.fail(RequestError("max_tokens", str(exc)))
            return
        self.live.append(request)

    def _cancel(self, request: ServingRequest, reason: str) -> None:
        assert self.scheduler is not None
        for seq in request.sequences:
            self.scheduler.finish(seq, reason)
            self._last_token_at.pop(seq.seq_id, None)
        request.cancelled = True
        if request in self.live:
            self.live.remove(request)

    def _fail_all(self, error: RequestError) -> None:
        for request in list(self.live):
            self._cancel(request, "abort")
            request.fail(error)

    # ------------------------------------------------------------------ leader: outputs

    def _process(self, sampled: list[SampledToken]) -> None:
        assert self.scheduler is not None
        now = time.monotonic()
        for seq, token in self.scheduler.on_step(sampled):
            request: ServingRequest = seq.owner
            if request.cancelled:
                continue
            stream = request.streams[seq.choice_index]
            event = stream.push(token, seq.finish_reason)
            if stream.finish_reason is not None and seq.finish_reason is None:  # a stop string: stop right here
                self.scheduler.finish(seq, stream.finish_reason)
            self._observe_token(request, seq.seq_id, now)
            if event is not None:
                request.sink(event)
            if stream.finish_reason is not None:
                self._last_token_at.pop(seq.seq_id, None)
                request.open_choices -= 1
                if request.open_choices == 0:
                    self.live.remove(request)
                    if self.metrics is not None:
                        self.metrics.observe_request_latency(now - request.arrived)
        if self.metrics is not None:
            self.metrics.add_generation_tokens(len(sampled))
        self._update_gauges()

    def _observe_token(self, request: ServingRequest, seq_id: int, now: float) -> None:
        if self.metrics is None:
            return
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.observe_time_to_first_token(now - request.arrived)
        last = self._last_token_at.get(seq_id)
        if last is not None:
            self.metrics.observe_inter_token_latency(now - last)
        self._last_token_at[seq_id] = now

    def _update_gauges(self) -> None:
        if self.metrics is None or self.scheduler is None:
            return
        s = self.scheduler
        self.metrics.set_scheduler_state(running=len(s.running), waiting=len(s.waiting), blocks_used=s.blocks_used,
                                         blocks_free=s.blocks_free)
        if s.preemptions > self._preemptions_seen:
            self.metrics.add_preemptions(s.preemptions - self._preemptions_seen)
            self._preemptions_seen = s.preemptions

    # ------------------------------------------------------------------ every rank: placement, counts

    def _agree_on_placement(self) -> None:
        previous = self.runtime.placement_version
        adopted = self.sync.at_step_boundary()
        if adopted is None or not self.leader:
            return
        log.info("placement version %d adopted by all %d ranks (was %d)", adopted.version, self.channel.world_size,
                 previous)
        if self.metrics is not None:
            self.metrics.set_placement_version(adopted.version)
        if self.on_placement is not None:
            self.on_placement(adopted)

    def _publish_counts(self) -> None:
        experts = np.asarray(self.runtime.expert_token_counts(), dtype=np.int64)
        ranks = np.asarray(self.runtime.rank_token_counts(), dtype=np.int64)
        pairs = np.asarray(self.runtime.rank_pair_counts(), dtype=np.int64)
        delta = np.concatenate([(experts - self._last_experts).ravel(), ranks - self._last_ranks,
                                pairs - self._last_pairs])
        self._last_experts, self._last_ranks, self._last_pairs = experts, ranks, pairs
        total = self.channel.reduce_sum(delta)
        if self.leader and self.metrics is not None:
            self.metrics.add_expert_tokens(total[: experts.size].reshape(experts.shape))
            self.metrics.add_rank_tokens(total[experts.size: experts.size + ranks.size])
            self.metrics.add_rank_pairs(total[experts.size + ranks.size:])
