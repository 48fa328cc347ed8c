"""Serving: an OpenAI-style HTTP API on rank 0 and a step loop that every rank runs.

Picture of one group (W ranks, rank 0 leads)::

    HTTP threads (rank 0)                 step loop (main thread, every rank)
    POST /v1/completions                  rank 0: drain queue -> StepCommand
      validate -> RequestQueue  ------->  broadcast command to all ranks
      wait on a Future  <-------------+   all ranks: agree on placement (MIN all-reduce),
                                      |              maybe runtime.apply_placement
    GET /healthz /readyz /metrics     |   all ranks: runtime.generate(same arguments)
        /v1/models /v1/placement      |   all ranks: SUM all-reduce of expert-count deltas
                                      +-- rank 0: complete the Futures, update metrics

Requests that arrive while a step runs are batched into the next one (up to
``max_batch_prompts`` prompts and ``max_num_batched_tokens`` prompt tokens;
requests that do not fit wait for the following step). With nothing queued rank 0 still sends an
idle command every ``idle_interval`` seconds, so a new placement is adopted
by an idle group too. Ranks other than 0 just loop on commands.

Decoding is greedy (the runtime's contract); ``temperature``/``top_p`` are
accepted and ignored. Bad requests get a 4xx with an OpenAI-shaped JSON
error whose ``param`` names the field; they never reach the step loop.

Shape legend: B prompts in a step, P prompt tokens, N new tokens, L MoE
layers, E logical experts, W ranks.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from pathlib import Path
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .heartbeat import HEARTBEAT
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import EngineMetrics
from .reload import PlacementWatcher, agreed_version, agreement_vector

log = logging.getLogger("moeshard.engine.serving")

MAX_BODY_BYTES = 16 << 20


# --------------------------------------------------------------------------- requests


class RequestError(Exception):
    """A bad request: HTTP ``status`` and the offending field ``param``."""

    def __init__(self, param: str | None, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.message, self.status = param, message, int(status)

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        text = f"{self.param}: {self.message}" if self.param else self.message
        return {"error": {"message": text, "type": kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ServingLimits:
    """What the served model accepts; built once from the runtime and the options.

    ``eos_token_ids``: tokens that end a completion unless the request says
    ``ignore_eos``. ``tokenizer``: a Hugging Face tokenizer or None (then
    prompts must be token ids).
    """

    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    max_batch_prompts: int = 32
    max_model_len: int = 4096
    default_max_tokens: int = 16
    tokenizer: Any = None
    model_name: str = "moeshard"
    max_num_batched_tokens: int = 8192  # prompt tokens in one engine step

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_batch_prompts", "max_model_len", "default_max_tokens",
                     "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class CompletionRequest:
    """A validated completion request: B prompts [B][P] of token ids."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    text_prompt: bool  # the prompt came as text: the answer carries text

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of all B prompts (what the request adds to a step's batch)."""
        return sum(len(p) for p in self.prompts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_list(value: Any, param: str, limits: ServingLimits) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError(param, "must be a non-empty list of token ids")
    for index, token in enumerate(value):
        if not _is_int(token):
            raise RequestError(f"{param}[{index}]", f"token id must be an integer, got {token!r}")
        if not 0 <= token < limits.vocab_size:
            raise RequestError(f"{param}[{index}]", f"token id {token} outside 0..{limits.vocab_size - 1}")
    return tuple(value)


def _encode(text: Any, param: str, limits: ServingLimits) -> tuple[int, ...]:
    if limits.tokenizer is None:
        raise RequestError(param, "text prompts need a tokenizer and this checkpoint has none; send token ids")
    if not text:
        raise RequestError(param, "must not be empty")
    ids = tuple(int(t) for t in limits.tokenizer.encode(text))
    if not ids:
        raise RequestError(param, "encodes to no tokens")
    return ids


def _parse_prompts(prompt: Any, limits: ServingLimits) -> tuple[tuple[tuple[int, ...], ...], bool]:
    """Accept a string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(prompt, str):
        return (_encode(prompt, "prompt", limits),), True
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")
    if all(_is_int(t) for t in prompt):
        return (_token_list(prompt, "prompt", limits),), False
    if all(isinstance(p, str) for p in prompt):
        return tuple(_encode(p, f"prompt[{i}]", limits) for i, p in enumerate(prompt)), True
    if all(isinstance(p, list) for p in prompt):
        return tuple(_token_list(p, f"prompt[{i}]", limits) for i, p in enumerate(prompt)), False
    raise RequestError("prompt", "mixes kinds: use all token ids, all lists of token ids or all strings")


def parse_completion_request(body: Any, limits: ServingLimits) -> CompletionRequest:
    """Validate a /v1/completions JSON body; RequestError names the field."""
    if not isinstance(body, dict):
        raise RequestError(None, "the body must be a JSON object")
    if "prompt" not in body:
        raise RequestError("prompt", "is required")
    prompts, text_prompt = _parse_prompts(body["prompt"], limits)
    if len(prompts) > limits.max_batch_prompts:
        raise RequestError("prompt", f"{len(prompts)} prompts exceed the server's batch limit of {limits.max_batch_prompts}")
    prompt_tokens = sum(len(p) for p in prompts)
    if prompt_tokens > limits.max_num_batched_tokens:
        raise RequestError("prompt", f"{prompt_tokens} prompt tokens exceed the server's per-step limit of "
                                     f"{limits.max_num_batched_tokens} (max_num_batched_tokens)")

    max_tokens = body.get("max_tokens", limits.default_max_tokens)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError("max_tokens", f"must be an integer >= 1, got {max_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > limits.max_model_len:
        raise RequestError(
            "max_tokens",
            f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model length {limits.max_model_len}",
        )

    for name, allowed in (("n", 1), ("best_of", 1)):
        value = body.get(name)
        if value is not None and value != allowed:
            raise RequestError(name, f"only {allowed} is supported")
    if body.get("stream"):
        raise RequestError("stream", "streaming is not supported")
    if body.get("logprobs") is not None:
        raise RequestError("logprobs", "is not supported")
    if body.get("echo"):
        raise RequestError("echo", "is not supported")

    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos", f"must be a boolean, got {ignore_eos!r}")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise RequestError("stop_token_ids", "must be a list of token ids")
    stop = body.get("stop")
    if stop is None:
        stop_strings: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stop_strings = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_strings = tuple(stop)
    else:
        raise RequestError("stop", "must be a string or a list of strings")
    if any(not s for s in stop_strings):
        raise RequestError("stop", "stop strings must not be empty")
    if stop_strings and limits.tokenizer is None:
        raise RequestError("stop", "stop strings need a tokenizer; use stop_token_ids")
    stop_token_ids = frozenset(stop_ids) | (frozenset() if ignore_eos else frozenset(limits.eos_token_ids))
    return CompletionRequest(prompts, max_tokens, stop_token_ids, stop_strings, text_prompt)


def finish_completion(tokens: Sequence[int], request: CompletionRequest, tokenizer: Any) -> tuple[list[int], str | None, str]:
    """Cut one generated sequence at its first stop; return (token ids, text or None, finish reason).

    Stop tokens are not part of the answer. A stop string ends the text
    before it; the token ids are cut after the token that completed it.
    """
    tokens = [int(t) for t in tokens[: request.max_tokens]]
    reason = "length"
    for index, token in enumerate(tokens):
        if token in request.stop_token_ids:
            tokens, reason = tokens[:index], "stop"
            break
    if tokenizer is None:
        return tokens, None, reason
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if request.stop_strings:
        hits = [(text.find(s), s) for s in request.stop_strings if s in text]
        if hits:
            # The shortest token prefix whose text already holds a stop string.
            for cut in range(1, len(tokens) + 1):
                if any(s in tokenizer.decode(tokens[:cut], skip_special_tokens=True) for s in request.stop_strings):
                    tokens = tokens[:cut]
                    break
            text, reason = text[: min(at for at, _ in hits)], "stop"
    return tokens, text, reason


def completion_response(
    request: CompletionRequest, outputs: Sequence[Sequence[int]], limits: ServingLimits, request_id: str
) -> dict[str, Any]:
    """OpenAI-shaped /v1/completions body; ``token_ids`` is always present, ``text`` when decodable."""
    choices, completion_tokens = [], 0
    for index, generated in enumerate(outputs):
        tokens, text, reason = finish_completion(generated, request, limits.tokenizer)
        completion_tokens += len(tokens)
        choices.append({
            "index": index,
            "text": text if text is not None else "",
            "token_ids": tokens,
            "logprobs": None,
            "finish_reason": reason,
        })
    prompt_tokens = sum(len(p) for p in request.prompts)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": limits.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# --------------------------------------------------------------------------- queue and commands


@dataclass
class PendingRequest:
    request: CompletionRequest
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class RequestQueue:
    """Thread-safe FIFO between the HTTP threads and the step loop.

    A request whose client gave up (the HTTP thread cancelled its Future on
    timeout) is dropped when its turn comes, never computed. Taking a
    request marks its Future running, so a cancel after that point fails and
    the request is answered normally (cancel and take are atomic on the
    Future's lock: exactly one of them wins).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[PendingRequest] = queue.Queue()
        self._held: PendingRequest | None = None  # taken but did not fit the last batch
        self.dropped = 0  # cancelled requests skipped so far

    def submit(self, request: CompletionRequest) -> PendingRequest:
        pending = PendingRequest(request)
        self._queue.put(pending)
        return pending

    def empty(self) -> bool:
        return self._held is None and self._queue.empty()

    def _next(self, timeout: float) -> PendingRequest | None:
        """The next request not cancelled, waiting up to ``timeout`` s in all (<= 0: only what is queued now)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                pending = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return None
            if not pending.future.cancelled():
                return pending
            self.dropped += 1

    def take_batch(self, max_prompts: int, wait: float, window: float = 0.0,
                   max_tokens: int | None = None) -> list[PendingRequest]:
        """Whole requests in arrival order, at most ``max_prompts`` prompts and ``max_tokens`` prompt tokens.

        Waits up to ``wait`` s for the first request, then up to ``window`` s
        more for others (requests a client sent together arrive a few ms apart).
        A request that does not fit is held for the next batch. The first
        request is always taken (parse_completion_request refuses any that
        exceeds the limits on its own). Cancelled requests are skipped; every
        request returned has its Future marked running.
        """
        batch: list[PendingRequest] = []
        prompts = tokens = 0
        if self._held is None:
            self._held = self._next(wait)
        deadline = time.monotonic() + window
        while self._held is not None:
            pending = self._held
            size, count = len(pending.request.prompts), pending.request.prompt_tokens
            if batch and (prompts + size > max_prompts or (max_tokens is not None and tokens + count > max_tokens)):
                break
            self._held = None
            if pending.future.set_running_or_notify_cancel():
                batch.append(pending)
                prompts, tokens = prompts + size, tokens + count
                if prompts >= max_prompts or (max_tokens is not None and tokens >= max_tokens):
                    break
            else:  # cancelled while held for this batch
                self.dropped += 1
            self._held = self._next(deadline - time.monotonic())
        return batch


@dataclass(frozen=True)
class StepCommand:
    """What rank 0 broadcasts at every step boundary (pickled by broadcast_object_list)."""

    kind: str  # "generate" | "idle" | "stop"
    prompts: tuple[tuple[int, ...], ...] = ()
    max_new_tokens: tuple[int, ...] = ()
    stop_token_ids: tuple[tuple[int, ...], ...] = ()  # [B]: the tokens that end each prompt's decoding

    @classmethod
    def for_batch(cls, batch: Sequence[PendingRequest], limits: ServingLimits) -> "StepCommand":
        """One generate command for the batch: each prompt stops at its request's stop tokens.

        A request's stop set is its ``stop_token_ids`` plus the model's eos
        ids unless ``ignore_eos`` (parse_completion_request folds them), so
        the runtime ends each sequence exactly where finish_completion cuts it
        and no sequence decodes past its stop. Stop strings are still cut
        afterwards (they are text, not token ids).
        """
        prompts: list[tuple[int, ...]] = []
        budgets: list[int] = []
        stops: list[tuple[int, ...]] = []
        for pending in batch:
            request = pending.request
            prompts.extend(request.prompts)
            budgets.extend([request.max_tokens] * len(request.prompts))
            stops.extend([tuple(sorted(request.stop_token_ids))] * len(request.prompts))
        return cls("generate", tuple(prompts), tuple(budgets), tuple(stops))


# --------------------------------------------------------------------------- collectives


class GroupChannel(Protocol):
    """The collectives the step loop needs, apart from the model's own communication."""

    rank: int
    world_size: int

    def broadcast_command(self, command: StepCommand | None) -> StepCommand: ...

    def reduce_min(self, values: np.ndarray) -> np.ndarray: ...

    def reduce_sum(self, values: np.ndarray) -> np.ndarray: ...


class LocalChannel:
    """A group of one rank: every collective is the identity."""

    rank, world_size = 0, 1

    def broadcast_command(self, command: StepCommand | None) -> StepCommand:
        if command is None:
            raise ValueError("rank 0 must provide the command")
        return command

    def reduce_min(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)


class TorchChannel:
    """Collectives over an initialised torch.distributed group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, group: Any = None):
        import torch
        import torch.distributed as dist

        self._torch, self._dist, self._group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._src = dist.get_global_rank(group, 0) if group is not None else 0

    def broadcast_command(self, command: StepCommand | None) -> StepCommand:
        box = [command]
        self._dist.broadcast_object_list(box, src=self._src, group=self._group, device=self._device)
        return box[0]

    def _reduce(self, values: np.ndarray, op: Any) -> np.ndarray:
        tensor = self._torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(self._device)
        self._dist.all_reduce(tensor, op=op, group=self._group)
        return tensor.cpu().numpy()

    def reduce_min(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self._dist.ReduceOp.MIN)

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self._dist.ReduceOp.SUM)


# --------------------------------------------------------------------------- step loop


class Runtime(Protocol):
    """The part of moeshard.engine.runtime.EngineRuntime the serving loop uses."""

    rank: int
    world_size: int
    placement: Any
    placement_version: int

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], eos_token_id: int | None = None,
                 stop_token_ids: list[set[int]] | None = None) -> list[list[int]]: ...

    def expert_token_counts(self) -> np.ndarray: ...

    def rank_token_counts(self) -> np.ndarray: ...

    def rank_pair_counts(self) -> np.ndarray: ...

    def apply_placement(self, placement: Any) -> None: ...


class StepLoop:
    """The loop every rank runs; rank 0 (``queue`` given) leads, the others follow.

    One step = broadcast command -> placement agreement -> generate -> count
    publication. Every collective is issued by every rank in that order.
    """

    def __init__(
        self,
        runtime: Runtime,
        channel: GroupChannel,
        *,
        limits: ServingLimits,
        watcher: PlacementWatcher | None = None,
        metrics: EngineMetrics | None = None,
        queue: RequestQueue | None = None,
        idle_interval: float = 0.5,
        batch_window: float = 0.0,
        on_placement: Any = None,
    ):
        self.runtime, self.channel, self.limits = runtime, channel, limits
        self.watcher, self.metrics, self.queue = watcher, metrics, queue
        self.idle_interval, self.batch_window = idle_interval, batch_window
        self.on_placement = on_placement  # called on the leader with the adopted placement
        self.stop_event = threading.Event()
        self.boundary_at = time.monotonic()  # when the loop last stood between two steps
        self._working = False  # a taken batch is being broadcast or generated
        self.steps = 0
        self.generate_calls = 0
        self._last_experts = np.asarray(runtime.expert_token_counts(), dtype=np.int64)
        self._last_ranks = np.asarray(runtime.rank_token_counts(), dtype=np.int64)
        self._last_pairs = np.asarray(runtime.rank_pair_counts(), dtype=np.int64)
        if self.leader and queue is None:
            raise ValueError("rank 0 leads the step loop and needs the request queue")

    @property
    def leader(self) -> bool:
        return self.channel.rank == 0

    def stall_seconds(self, now: float | None = None) -> float:
        """Seconds since the last step boundary while work is queued or running; 0.0 when idle.

        A rank that died leaves rank 0 blocked in a collective: this grows
        without bound and /healthz turns 503 past the stall timeout.
        """
        busy = self._working or (self.queue is not None and not self.queue.empty())
        return max(0.0, (time.monotonic() if now is None else now) - self.boundary_at) if busy else 0.0

    def run(self) -> None:
        """Loop until rank 0 broadcasts stop (rank 0: after ``stop_event`` and an empty queue)."""
        while True:
            self.boundary_at, self._working = time.monotonic(), False
            HEARTBEAT.beat()  # every rank, every step boundary: the pods' liveness probe reads it
            batch: list[PendingRequest] = []
            command: StepCommand | None = None
            if self.leader:
                assert self.queue is not None
                batch = self.queue.take_batch(self.limits.max_batch_prompts, wait=self.idle_interval,
                                              window=self.batch_window,
                                              max_tokens=self.limits.max_num_batched_tokens)
                self._working = bool(batch)
                if batch:
                    command = StepCommand.for_batch(batch, self.limits)
                elif self.stop_event.is_set() and self.queue.empty():
                    command = StepCommand("stop")
                else:
                    command = StepCommand("idle")
            command = self.channel.broadcast_command(command)
            if command.kind == "stop":
                self._refuse_queued()
                return
            try:
                self.step(command, batch)
            except BaseException as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RequestError(None, f"engine step failed: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR))
                raise

    def _refuse_queued(self) -> None:
        """Answer 503 to requests that slipped in after the stop decision (none is left hanging)."""
        while self.queue is not None and not self.queue.empty():
            for pending in self.queue.take_batch(self.limits.max_batch_prompts, wait=0):
                pending.future.set_exception(RequestError(None, "the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE))

    def step(self, command: StepCommand, batch: Sequence[PendingRequest] = ()) -> None:
        """One step boundary plus the work of ``command`` (collective)."""
        self.steps += 1
        self._agree_on_placement()
        if command.kind != "generate":
            return
        self.generate_calls += 1
        outputs = self.runtime.generate(
            [list(p) for p in command.prompts], list(command.max_new_tokens),
            stop_token_ids=[set(stops) for stops in command.stop_token_ids],
        )
        self._publish_counts()
        if self.leader:
            self._complete(batch, outputs)

    def _agree_on_placement(self) -> None:
        current = self.runtime.placement_version
        candidate = self.watcher.poll() if self.watcher is not None else None
        if self.channel.world_size > 1 or candidate is not None:
            version = agreed_version(self.channel.reduce_min(agreement_vector(candidate, current)), current)
        else:
            version = None
        if version is None:
            return
        assert candidate is not None  # every rank holds version > current, so this one does too
        self.runtime.apply_placement(candidate)
        if self.watcher is not None:
            self.watcher.adopted(candidate)
        if self.leader:
            log.info("placement version %d adopted by all %d ranks (was %d)", version, self.channel.world_size, current)
            if self.metrics is not None:
                self.metrics.set_placement_version(version)
            if self.on_placement is not None:
                self.on_placement(self.runtime.placement)

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

    def _complete(self, batch: Sequence[PendingRequest], outputs: Sequence[Sequence[int]]) -> None:
        start = 0
        for pending in batch:
            count = len(pending.request.prompts)
            mine = outputs[start: start + count]
            start += count
            try:
                body = completion_response(pending.request, mine, self.limits, f"cmpl-{uuid.uuid4().hex}")
            except Exception as exc:  # a decode problem fails this request only
                pending.future.set_exception(RequestError(None, f"cannot build the response: {exc}", 500))
                continue
            if self.metrics is not None:
                self.metrics.observe_request_latency(time.monotonic() - pending.arrived)
            pending.future.set_result(body)


# --------------------------------------------------------------------------- HTTP


class ServingState:
    """What the HTTP threads read; the step loop (rank 0) writes it."""

    def __init__(self, request_timeout: float = 600.0, stall_timeout: float = 300.0):
        self.request_timeout, self.stall_timeout = request_timeout, stall_timeout
        self.stall_probe: Callable[[], float] | None = None  # StepLoop.stall_seconds on rank 0
        self.ready = False
        self.accepting = True
        self.failed: str | None = None
        self.world_size = 0
        self.limits: ServingLimits | None = None
        self.queue: RequestQueue | None = None
        self.metrics: EngineMetrics | None = None
        self.placement_json: bytes | None = None

    def set_placement(self, placement: Any) -> None:
        self.placement_json = placement.to_json().encode()

    def stalled(self) -> str | None:
        """Why the step loop counts as stuck (work pending, no step boundary for stall_timeout s), or None."""
        seconds = self.stall_probe() if self.stall_probe is not None else 0.0
        if seconds > self.stall_timeout:
            return f"no step boundary for {seconds:.0f} s with requests pending (a rank may have died)"
        return None


def _make_handler(state: ServingState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "moeshard-engine"
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds to read a request from an idle connection

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode())

        def _error(self, error: RequestError) -> None:
            self._json(error.status, error.body())

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                stalled = None if state.failed else state.stalled()
                if state.failed:
                    self._json(503, {"status": "failed", "reason": state.failed})
                elif stalled:
                    self._json(503, {"status": "stalled", "reason": stalled})
                else:
                    self._json(200, {"status": "ok"})
            elif path == "/readyz":
                if state.ready and state.accepting and not state.failed:
                    self._json(200, {"status": "ready", "world_size": state.world_size})
                else:
                    reason = state.failed or ("draining" if not state.accepting else "loading")
                    self._json(503, {"status": reason})
            elif path == "/metrics":
                if state.metrics is None:
                    self._error(RequestError(None, "metrics are not available before the model is loaded", 503))
                else:
                    self._send(200, state.metrics.exposition(), METRICS_CONTENT_TYPE)
            elif path == "/v1/models":
                name = state.limits.model_name if state.limits else "moeshard"
                self._json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "moeshard"}]})
            elif path == "/v1/placement":
                if state.placement_json is None:
                    self._error(RequestError(None, "no placement before the model is loaded", 503))
                else:
                    self._send(200, state.placement_json)
            elif path == "/v1/completions":
                self._error(RequestError(None, "use POST", HTTPStatus.METHOD_NOT_ALLOWED))
            else:
                self._error(RequestError(None, f"no route {path}", HTTPStatus.NOT_FOUND))

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.split("?", 1)[0]
            try:
                raw = self._read_body()  # always consumed, so the connection stays usable
                if path != "/v1/completions":
                    raise RequestError(None, f"no route {path}", HTTPStatus.NOT_FOUND)
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
                    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                    raise RequestError(None, f"the body is not valid JSON: {reason}") from None
                self._json(200, self._complete(body))
            except RequestError as error:
                self._error(error)

        def _read_body(self) -> bytes:
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                self.close_connection = True
                raise RequestError(None, "Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
            try:
                length = int(length_header)
            except ValueError:
                self.close_connection = True
                raise RequestError(None, "Content-Length must be an integer") from None
            if length > MAX_BODY_BYTES or length < 0:
                self.close_connection = True
                raise RequestError(None, f"body of {length} bytes is outside 0..{MAX_BODY_BYTES}",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return self.rfile.read(length)

        def _complete(self, body: Any) -> dict[str, Any]:
            if state.failed:
                raise RequestError(None, f"engine failed: {state.failed}", HTTPStatus.SERVICE_UNAVAILABLE)
            if not state.ready or state.limits is None or state.queue is None:
                raise RequestError(None, "the model is still loading", HTTPStatus.SERVICE_UNAVAILABLE)
            if not state.accepting:
                raise RequestError(None, "the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            request = parse_completion_request(body, state.limits)
            pending = state.queue.submit(request)
            try:
                return pending.future.result(timeout=state.request_timeout)
            except TimeoutError:
                # Still queued: cancel, so the step loop drops it instead of computing an answer nobody reads.
                # Already taken into a step: cancel fails and the step finishes it (results unread).
                pending.future.cancel()
                raise RequestError(None, f"no answer within {state.request_timeout} s", HTTPStatus.GATEWAY_TIMEOUT) from None

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_http_server(state: ServingState, host: str, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve the API from a background thread; ``port`` 0 picks a free port (see ``server.server_port``)."""
    server = _Server((host, port), _make_handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="moeshard-http",
                              daemon=True)
    thread.start()
    return server, thread


# --------------------------------------------------------------------------- one rank


class ServeError(RuntimeError):
    """A rank cannot start serving (for example the HTTP port is taken)."""


@dataclass(frozen=True)
class ServeOptions:
    """Serving knobs (the CLI flags of ``moeshard engine serve``)."""

    host: str = "0.0.0.0"
    port: int | None = None  # None: the environment's MOESHARD_PORT
    max_batch_prompts: int = 32
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    default_max_tokens: int = 16
    idle_interval: float = 0.5
    batch_window: float = 0.005
    placement_poll: float = 1.0
    request_timeout: float = 600.0
    stall_timeout: float = 300.0  # /healthz 503 after this long without a step boundary while busy
    model_name: str | None = None
    threads: int | None = None


def model_max_len(model_path: str, default: int = 4096) -> int:
    """``max_position_embeddings`` of the checkpoint's config.json (``default`` when absent)."""
    try:
        with open(os.path.join(model_path, "config.json")) as handle:
            value = json.load(handle).get("max_position_embeddings")
    except (OSError, ValueError):
        return default
    return int(value) if isinstance(value, int) and value > 0 else default


def limits_from_runtime(runtime: Any, options: ServeOptions, model_path: str) -> ServingLimits:
    """ServingLimits from the runtime's model config and tokenizer."""
    config = getattr(runtime, "model_config", None) or getattr(runtime, "config")
    eos = getattr(config, "eos_token_id", ())
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    return ServingLimits(
        vocab_size=int(config.vocab_size),
        eos_token_ids=eos_ids,
        max_batch_prompts=options.max_batch_prompts,
        max_num_batched_tokens=options.max_num_batched_tokens,
        max_model_len=options.max_model_len or model_max_len(model_path),
        default_max_tokens=options.default_max_tokens,
        tokenizer=getattr(runtime, "tokenizer_or_none", None),
        model_name=options.model_name or os.path.basename(os.path.normpath(model_path)) or "moeshard",
    )


def serve_rank(env: Any, local_rank: int, options: ServeOptions, *, stop_event: threading.Event | None = None) -> int:
    """Run one rank of a group until rank 0 stops it; rank 0 also serves HTTP.

    Returns the process exit code. ``stop_event`` (rank 0) starts a drain:
    /readyz turns 503, queued requests finish, then every rank stops.
    """
    from .metrics import MetricScope
    from .runtime import EngineRuntime

    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    rank = env.pod_index * env.gpus_per_pod + local_rank
    state = ServingState(options.request_timeout, options.stall_timeout)
    server = None
    if rank == 0:
        port = env.port if options.port is None else options.port
        try:
            server, _ = start_http_server(state, options.host, port)
        except OSError as exc:
            raise ServeError(f"cannot serve HTTP on {options.host}:{port}: {exc.strerror or exc}") from None
        host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
        print(f"moeshard engine: rank 0 serving http://{host}:{server.server_port}/v1/completions "
              f"(group of {env.expert_ep} ranks, loading {env.model_path})", flush=True)
    runtime = None
    try:
        runtime = EngineRuntime.create(env, local_rank)
        channel = TorchChannel()
        channel.reduce_sum(np.ones(1, dtype=np.int64))  # every rank has loaded and joined
        ready_file = getattr(env, "ready_file", "") if local_rank == 0 else ""
        if ready_file:  # the pod's readiness probe: this pod's ranks serve, the whole group has joined
            Path(ready_file).write_text(f"{channel.world_size}\n")
        limits = limits_from_runtime(runtime, options, env.model_path)
        metrics = watcher = None
        queue_ = RequestQueue() if rank == 0 else None
        if rank == 0:
            placement = runtime.placement
            metrics = EngineMetrics(MetricScope.from_env(env), num_layers=placement.num_layers,
                                    num_experts=placement.num_experts, world_size=channel.world_size)
            metrics.set_placement_version(runtime.placement_version)
        watcher = PlacementWatcher(
            env.placement_file, runtime.placement, poll_interval=options.placement_poll,
            on_reject=(lambda _problem: metrics.count_rejected_placement()) if metrics is not None else None,
            log_level=logging.WARNING if rank == 0 else logging.DEBUG,
        )
        loop = StepLoop(runtime, channel, limits=limits, watcher=watcher, metrics=metrics, queue=queue_,
                        idle_interval=options.idle_interval, batch_window=options.batch_window,
                        on_placement=state.set_placement)
        if stop_event is not None and rank == 0:
            loop.stop_event = stop_event
        if rank == 0:
            state.limits, state.queue, state.metrics = limits, queue_, metrics
            state.world_size = channel.world_size
            state.stall_probe = loop.stall_seconds
            state.set_placement(runtime.placement)
            state.ready = True
            log.info("all %d ranks joined; ready", channel.world_size)
            stopper = threading.Thread(target=_drain_on_stop, args=(loop.stop_event, state), daemon=True)
            stopper.start()
        loop.run()
        return 0
    except BaseException as exc:
        state.failed = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if local_rank == 0 and getattr(env, "ready_file", ""):
            Path(env.ready_file).unlink(missing_ok=True)
        if runtime is not None:
            runtime.close()
        if server is not None:
            server.shutdown()
            server.server_close()


def _drain_on_stop(stop_event: threading.Event, state: ServingState) -> None:
    stop_event.wait()
    state.accepting = False
