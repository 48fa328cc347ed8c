"""The HTTP API on rank 0: OpenAI-compatible completions and chat, SSE streaming, probes and metrics.

Stack: aiohttp's server (a maintained asyncio HTTP stack already among our
dependencies), in one background thread with its own event loop. The old
hand-written ``http.server`` could not stream: one thread per connection
blocked on a Future, no chunked responses, no notice of a client that went
away. aiohttp writes SSE chunks as they come, and with
``handler_cancellation`` a disconnect cancels the handler, which cancels the
request in the engine (its KV blocks are freed at the next step boundary).

The layer is thin and never touches tensors: it validates the body
(moeshard.engine.api_schema), hands a :class:`ServingRequest` to the step
loop's :class:`Intake`, and turns the events the step loop sends back
(moeshard.engine.output) into one JSON answer or a stream of SSE chunks.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
/v1/placement, /healthz, /readyz, /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from moeshard.engine.api_schema import (
    GenerationRequest,
    RequestError,
    ServingLimits,
    choice_body,
    envelope,
    logprobs_block,
    parse_request,
    usage,
)
from moeshard.engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from moeshard.engine.output import ChoiceEvent, ErrorEvent, ServingRequest

log = logging.getLogger("moeshard.engine.serving")

MAX_BODY_BYTES = 16 << 20


@dataclass
class ServingState:
    """What the API layer reads; the serving setup (rank 0) writes it."""

    request_timeout: float = 600.0
    stall_timeout: float = 300.0
    stall_probe: Callable[[], float] | None = None  # StepLoop.stall_seconds
    ready: bool = False
    accepting: bool = True
    failed: str | None = None
    world_size: int = 0
    limits: ServingLimits | None = None
    intake: Any = None  # moeshard.engine.step_loop.Intake
    metrics: Any = None
    placement_json: bytes | None = None

    def set_placement(self, placement: Any) -> None:
        self.placement_json = placement.to_json().encode()

    def stalled(self) -> str | None:
        seconds = self.stall_probe() if self.stall_probe is not None else 0.0
        if seconds > self.stall_timeout:
            return f"no step boundary for {seconds:.0f} s with requests pending (a rank may have died)"
        return None


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _error(error: RequestError) -> web.Response:
    return _json(error.status, error.body())


class _Answer:
    """Collects a request's events into the final (non-streamed) answer."""

    def __init__(self, spec: GenerationRequest, count: int) -> None:
        self.spec = spec
        self.text = [""] * count
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.entries: list[list] = [[] for _ in range(count)]
        self.reasons: list[str | None] = [None] * count

    def add(self, event: ChoiceEvent) -> None:
        i = event.index
        self.text[i] += event.text
        self.tokens[i] += event.tokens
        self.entries[i] += event.logprobs
        self.reasons[i] = event.finish_reason or self.reasons[i]


def build_app(state: ServingState) -> web.Application:
    """The aiohttp application over ``state``."""

    async def healthz(_request: web.Request) -> web.Response:
        if state.failed:
            return _json(503, {"status": "failed", "reason": state.failed})
        stalled = state.stalled()
        return _json(503, {"status": "stalled", "reason": stalled}) if stalled else _json(200, {"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        if state.ready and state.accepting and not state.failed:
            return _json(200, {"status": "ready", "world_size": state.world_size})
        return _json(503, {"status": state.failed or ("draining" if not state.accepting else "loading")})

    async def metrics(_request: web.Request) -> web.Response:
        if state.metrics is None:
            return _error(RequestError(None, "metrics are not available before the model is loaded", 503))
        return web.Response(body=state.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def models(_request: web.Request) -> web.Response:
        name = state.limits.model_name if state.limits else "moeshard"
        return _json(200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                       "owned_by": "moeshard"}]})

    async def placement(_request: web.Request) -> web.Response:
        if state.placement_json is None:
            return _error(RequestError(None, "no placement before the model is loaded", 503))
        return web.Response(body=state.placement_json, content_type="application/json")

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            spec = await _validated(request, chat)
        except RequestError as error:
            return _error(error)
        assert state.limits is not None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        serving = ServingRequest(spec, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                 state.limits.tokenizer, deadline=time.monotonic() + state.request_timeout)
        state.intake.submit(serving)
        try:
            if spec.stream:
                return await _stream(request, serving, events)
            return await _collect(serving, events)
        except (asyncio.CancelledError, ConnectionResetError):
            state.intake.cancel(serving)  # the client went away: free its sequences
            raise

    async def _validated(request: web.Request, chat: bool) -> GenerationRequest:
        if state.failed:
            raise RequestError(None, f"engine failed: {state.failed}", HTTPStatus.SERVICE_UNAVAILABLE)
        if not state.ready or state.limits is None:
            raise RequestError(None, "the model is still loading", HTTPStatus.SERVICE_UNAVAILABLE)
        if not state.accepting:
            raise RequestError(None, "the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise RequestError(None, f"the body is not valid JSON: {reason}") from None
        return parse_request(body, state.limits, chat=chat)

    async def _next(events: asyncio.Queue) -> Any:
        try:  # the step loop answers timeouts itself; this only guards against a dead loop
            return await asyncio.wait_for(events.get(), timeout=state.request_timeout + 30)
        except TimeoutError:
            return ErrorEvent(RequestError(None, "no answer from the engine", HTTPStatus.GATEWAY_TIMEOUT))

    async def _collect(serving: ServingRequest, events: asyncio.Queue) -> web.Response:
        spec, count = serving.request, len(serving.streams)
        answer, done = _Answer(spec, count), 0
        while done < count:
            event = await _next(events)
            if isinstance(event, ErrorEvent):
                return _error(event.error)
            answer.add(event)
            done += event.finish_reason is not None
        tokenizer = state.limits.tokenizer if state.limits else None
        choices = [choice_body(spec, i, answer.text[i], answer.tokens[i],
                               logprobs_block(spec, answer.tokens[i], answer.entries[i], tokenizer),
                               answer.reasons[i], delta=False) for i in range(count)]
        completion = sum(len(t) for t in answer.tokens)
        return _json(200, envelope(spec, serving.request_id, state.limits.model_name, choices, chunk=False,
                                   usage_body=usage(spec.prompt_tokens * spec.n, completion)))

    async def _stream(request: web.Request, serving: ServingRequest, events: asyncio.Queue) -> web.StreamResponse:
        spec, count = serving.request, len(serving.streams)
        first = await _next(events)
        if isinstance(first, ErrorEvent):
            return _error(first.error)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        tokenizer = state.limits.tokenizer
        name = state.limits.model_name

        async def send(body: Any) -> None:
            await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")

        done, completion, event = 0, 0, first
        while True:
            if isinstance(event, ErrorEvent):
                await send(event.error.body())
                break
            completion += len(event.tokens)
            choice = choice_body(spec, event.index, event.text, event.tokens,
                                 logprobs_block(spec, event.tokens, event.logprobs, tokenizer), event.finish_reason,
                                 delta=True)
            await send(envelope(spec, serving.request_id, name, [choice], chunk=True))
            done += event.finish_reason is not None
            if done == count:
                if spec.include_usage:
                    await send(envelope(spec, serving.request_id, name, [], chunk=True,
                                        usage_body=usage(spec.prompt_tokens * spec.n, completion)))
                break
            event = await _next(events)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # unknown route, wrong method, body too large: JSON like every error
            return _error(RequestError(None, f"{exc.reason}: {request.method} {request.path}", exc.status))

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors])
    app.add_routes([
        web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics),
        web.get("/v1/models", models), web.get("/v1/placement", placement),
        web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat_completions),
    ])
    return app


class ApiServer:
    """The app served from a background thread; ``port`` 0 picks a free port (read ``self.port``)."""

    def __init__(self, state: ServingState, host: str, port: int) -> None:
        self.state, self.host, self.port = state, host, port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="moeshard-http", daemon=True)

    def start(self) -> ApiServer:
        """Bind and serve; OSError when the address is taken."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(build_app(self.state), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port (0 -> the one picked)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
