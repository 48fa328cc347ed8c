"""The OpenAI request schema: validating /v1/completions and /v1/chat/completions bodies, shaping answers.

Pure functions, no tensors, no I/O. A bad field raises :class:`RequestError`
naming it (HTTP 400, OpenAI-shaped body); a wrong ``model`` is a 404 naming
the served model. The OpenAI fields read here: ``model``, ``prompt`` /
``messages``, ``max_tokens`` (chat also ``max_completion_tokens``), ``stop``,
``n``, ``stream``, ``stream_options.include_usage``; plus ``stop_token_ids``.
Sampling fields (temperature, top_p, top_k, min_p, seed, penalties,
logprobs / top_logprobs, ignore_eos) go to
``moeshard.engine.sampling.SamplingParams.from_request``. Anything else is
refused as unknown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from moeshard.engine.sampling import (
    GenerationDefaults,
    SamplingParamError,
    SamplingParams,
)

SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                             "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "ignore_eos"})
_COMMON_FIELDS = frozenset({"model", "max_tokens", "stop", "stop_token_ids", "n", "stream", "stream_options", "user"})
COMPLETION_FIELDS = _COMMON_FIELDS | SAMPLING_FIELDS | {"prompt", "echo", "best_of"}
CHAT_FIELDS = _COMMON_FIELDS | SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
MAX_CHOICES = 16


class RequestError(Exception):
    """A bad request: HTTP ``status`` and the offending field ``param``."""

    def __init__(self, param: str | None, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.message, self.status = param, message, int(status)

    def body(self) -> dict[str, Any]:
        fallback = "invalid_request_error" if self.status < 500 else "server_error"
        kind = {404: "not_found_error"}.get(self.status, fallback)
        text = f"{self.param}: {self.message}" if self.param else self.message
        return {"error": {"message": text, "type": kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ServingLimits:
    """What the served model accepts; built once from the runtime, the checkpoint and the options.

    ``tokenizer``: a Hugging Face tokenizer or None (then prompts must be token ids).
    """

    vocab_size: int
    defaults: GenerationDefaults
    max_model_len: int = 4096
    default_max_tokens: int = 16
    tokenizer: Any = None
    model_name: str = "moeshard"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_model_len", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: P prompts of token ids, ``n`` choices each (choice index = prompt x n + j)."""

    chat: bool
    prompts: tuple[tuple[int, ...], ...]
    n: int
    max_tokens: int
    stop_strings: tuple[str, ...]
    stop_token_ids: frozenset[int]  # request's stop ids plus the checkpoint's EOS ids unless ignore_eos
    params: SamplingParams
    stream: bool
    include_usage: bool
    decode_text: bool  # a tokenizer exists: answers carry text

    @property
    def prompt_tokens(self) -> int:
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


def _parse_prompts(prompt: Any, limits: ServingLimits) -> tuple[tuple[int, ...], ...]:
    """Accept a string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(prompt, str):
        return (_encode(prompt, "prompt", limits),)
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")
    if all(_is_int(t) for t in prompt):
        return (_token_list(prompt, "prompt", limits),)
    if all(isinstance(p, str) for p in prompt):
        return tuple(_encode(p, f"prompt[{i}]", limits) for i, p in enumerate(prompt))
    if all(isinstance(p, list) for p in prompt):
        return tuple(_token_list(p, f"prompt[{i}]", limits) for i, p in enumerate(prompt))
    raise RequestError("prompt", "mixes kinds: use all token ids, all lists of token ids or all strings")


def _parse_messages(messages: Any, limits: ServingLimits) -> tuple[int, ...]:
    """The chat template of the checkpoint's tokenizer over ``messages``, with the assistant turn opened."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}]", "must be an object with a string role")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}].content", "must be a string")
    tokenizer = limits.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("messages", "this checkpoint has no tokenizer with a chat template; use /v1/completions")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # a template error is the request's problem (bad roles, order)
        raise RequestError("messages", f"the chat template refused them: {exc}") from None
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    ids = tuple(int(t) for t in ids)
    if not ids:
        raise RequestError("messages", "the chat template produced no tokens")
    return ids


def _stop_strings(stop: Any, limits: ServingLimits) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise RequestError("stop", "must be a non-empty string or a list of non-empty strings")
    if strings and limits.tokenizer is None:
        raise RequestError("stop", "stop strings need a tokenizer; use stop_token_ids")
    return tuple(strings)


def parse_request(body: Any, limits: ServingLimits, *, chat: bool) -> GenerationRequest:
    """Validate a completions (``chat=False``) or chat body; RequestError names the field."""
    if not isinstance(body, dict):
        raise RequestError(None, "the body must be a JSON object")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in known:
            raise RequestError(name, "unknown field")
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise RequestError("model", f"the model {model!r} does not exist; this server serves {limits.model_name!r}",
                           HTTPStatus.NOT_FOUND)
    if chat:
        if "messages" not in body:
            raise RequestError("messages", "is required")
        prompts = (_parse_messages(body["messages"], limits),)
    else:
        if "prompt" not in body:
            raise RequestError("prompt", "is required")
        prompts = _parse_prompts(body["prompt"], limits)
        if body.get("echo"):
            raise RequestError("echo", "is not supported")
        if body.get("best_of") not in (None, 1):
            raise RequestError("best_of", "only 1 is supported")
    token_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(token_field)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(token_field, f"must be an integer >= 1, got {max_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > limits.max_model_len:
        raise RequestError(token_field, f"prompt ({longest} tokens) + {token_field} ({max_tokens}) exceeds the "
                                        f"model length {limits.max_model_len}")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise RequestError("n", f"must be an integer in [1, {MAX_CHOICES}], got {n!r}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream", f"must be a boolean, got {stream!r}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise RequestError("stream_options", "must be an object with include_usage")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("stream_options.include_usage", f"must be a boolean, got {include_usage!r}")
        if not stream:
            raise RequestError("stream_options", "is only allowed with stream: true")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise RequestError("stop_token_ids", "must be a list of token ids")
    try:
        params = SamplingParams.from_request(body, limits.defaults, chat=chat)
    except SamplingParamError as exc:
        raise RequestError(exc.field, str(exc).split(": ", 1)[-1]) from None
    eos = frozenset() if params.ignore_eos else frozenset(limits.defaults.eos_token_ids)
    return GenerationRequest(chat, prompts, n, max_tokens, _stop_strings(body.get("stop"), limits),
                             frozenset(stop_ids) | eos, params, stream, include_usage,
                             decode_text=limits.tokenizer is not None)


# --------------------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_block(request: GenerationRequest, tokens: list[int], entries: list[tuple[float, tuple]],
                   tokenizer: Any) -> dict[str, Any] | None:
    """OpenAI logprobs of ``tokens``: completions' parallel lists, or chat's ``content`` list."""
    if request.params.logprobs is None:
        return None
    def piece(token: int) -> str:  # a token with no text of its own is shown by id (so dict keys stay distinct)
        text = tokenizer.decode([token]) if tokenizer is not None else ""
        return text or f"<token {token}>"

    if request.chat:
        return {"content": [
            {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode()),
             "top_logprobs": [{"token": piece(i), "logprob": v, "bytes": list(piece(i).encode())} for i, v in top]}
            for t, (lp, top) in zip(tokens, entries)]}
    return {"tokens": [piece(t) for t in tokens], "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{piece(i): v for i, v in top} for _, top in entries], "text_offset": []}


def choice_body(request: GenerationRequest, index: int, text: str, tokens: list[int], logprobs: Any,
                finish_reason: str | None, *, delta: bool) -> dict[str, Any]:
    """One choice of an answer (``delta``: of a stream chunk)."""
    if request.chat:
        key = "delta" if delta else "message"
        return {"index": index, key: {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason, "token_ids": tokens}
    return {"index": index, "text": text, "token_ids": tokens, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(request: GenerationRequest, request_id: str, model: str, choices: list[dict[str, Any]], *,
             chunk: bool, usage_body: dict[str, int] | None = None) -> dict[str, Any]:
    """The answer object around ``choices`` (a whole answer, or one SSE chunk)."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_body is not None or not chunk:
        body["usage"] = usage_body
    return body
