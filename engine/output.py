"""Output processing on rank 0: sampled tokens -> text deltas per choice, stop strings, request bookkeeping.

Runs in the step loop's thread after every step. For each choice it keeps
the generated token ids, decodes them incrementally and looks for the
request's stop strings in the new text: a hit ends the choice at once (the
scheduler retires its sequence before the next step, so generation stops
there), and the text ends before the stop string. Text that could still be
the start of a stop string (its last ``len(longest stop) - 1`` characters),
or that ends inside a multi-byte character, is held back until it is
decided. Stop tokens (EOS, ``stop_token_ids``) are not part of the answer.

Events go to the request's ``sink`` (the API layer hands in a thread-safe
callable); nothing here touches tensors or sockets.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moeshard.engine.api_schema import GenerationRequest, RequestError
from moeshard.engine.step_plan import SampledToken

_request_ids = itertools.count()


@dataclass
class ChoiceEvent:
    """New output of one choice: text and token ids since the last event, their logprobs, maybe the end."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]]
    finish_reason: str | None = None


@dataclass
class ErrorEvent:
    """The request failed (engine error, timeout, shutdown): the API layer answers with ``error``."""

    error: RequestError


class ChoiceStream:
    """Incremental detokenization and stop-string matching of one choice."""

    def __init__(self, index: int, request: GenerationRequest, tokenizer: Any) -> None:
        self.index, self.request, self.tokenizer = index, request, tokenizer
        self.tokens: list[int] = []
        self.entries: list[tuple[float, tuple[tuple[int, float], ...]]] = []
        self.text = ""
        self._sent_chars = self._sent_tokens = 0
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in request.stop_strings), default=1) - 1

    def push(self, token: SampledToken, finish_reason: str | None) -> ChoiceEvent | None:
        """Add one sampled token (``finish_reason`` from the scheduler); the event to send, if any.

        After the call ``self.finish_reason`` is "stop" when a stop string was
        found (the caller retires the sequence).
        """
        if not (finish_reason == "stop" and token.token in self.request.stop_token_ids):
            self.tokens.append(token.token)
            self.entries.append((token.logprob, token.top))
        self.finish_reason = finish_reason
        safe = 0
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            search_from = max(0, self._sent_chars - self._hold)
            hits = [at for at in (text.find(s, search_from) for s in self.request.stop_strings) if at >= 0]
            if hits:
                text, self.finish_reason = text[: min(hits)], "stop"
            self.text = text
            safe = len(text)
            if self.finish_reason is None:
                safe -= self._hold
                while safe > self._sent_chars and text[safe - 1] == "\ufffd":
                    safe -= 1
        delta = self.text[self._sent_chars: max(safe, self._sent_chars)]
        self._sent_chars = max(safe, self._sent_chars)
        new_tokens = self.tokens[self._sent_tokens:]
        new_entries = self.entries[self._sent_tokens:]
        self._sent_tokens = len(self.tokens)
        if not delta and not new_tokens and self.finish_reason is None:
            return None
        return ChoiceEvent(self.index, delta, new_tokens, new_entries, self.finish_reason)


@dataclass(eq=False)
class ServingRequest:
    """One API request as the engine side tracks it; ``sink`` receives its events (any thread)."""

    request: GenerationRequest
    sink: Callable[[Any], None]
    tokenizer: Any = None
    deadline: float = float("inf")  # time.monotonic() after which it is cancelled with 504
    arrived: float = field(default_factory=time.monotonic)
    request_id: str = field(default_factory=lambda: f"cmpl-{next(_request_ids)}-{int(time.time() * 1000)}")
    sequences: list[Any] = field(default_factory=list)  # scheduler Sequences, by choice index
    streams: list[ChoiceStream] = field(default_factory=list)
    first_token_at: float | None = None
    scheduled_at: float | None = None
    cancelled: bool = False
    open_choices: int = 0

    def __post_init__(self) -> None:
        count = len(self.request.prompts) * self.request.n
        self.streams = [ChoiceStream(i, self.request, self.tokenizer) for i in range(count)]
        self.open_choices = count

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.streams)

    def fail(self, error: RequestError) -> None:
        self.open_choices = 0
        self.sink(ErrorEvent(error))
