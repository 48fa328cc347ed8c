"""Sampling on the device: request parameters, checkpoint defaults, and one batched ``sample`` step.

Pipeline per step (each stage is a pure function over the whole batch, so
the tests can compare every stage with transformers' own processors)::

    raw logits [B, V] --log_softmax--> reported logprobs (chosen token + top L)
        |
        penalties: repetition (prompt + output, as HF) -> presence / frequency (output counts, as OpenAI)
        -> temperature -> top-k -> top-p -> min-p
        -> greedy rows: argmax; other rows: exponential race with the row's generator

Shape legend: B rows (one per sequence being sampled), V vocabulary, L the
largest number of top logprobs asked for by a row of the batch (may be 0),
N the longest prompt + output token list of the batch.

Greedy (``temperature == 0``) never touches a generator. A seeded row draws
its V exponentials from its own ``torch.Generator`` only, so its draws do
not depend on which other requests share the batch. Unseeded rows share the
default generator of the logits' device. The only loop over B is the one
over generators; everything over V is vectorised on the logits' device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default ceiling for logprobs / top_logprobs
PENALTY_RANGE = (-2.0, 2.0)  # presence / frequency penalties, OpenAI's range
_GOLDEN64 = 0x9E3779B97F4A7C15  # odd 64-bit constant that spreads choice indices over seed space
_SEED_LOW, _SEED_HIGH = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class SamplingParamError(ValueError):
    """A sampling field of a request is ill-typed or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# ---------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class GenerationDefaults:
    """What the checkpoint says when a request does not: EOS ids and sampling defaults."""

    eos_token_ids: tuple[int, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, fallback_eos: Sequence[int]) -> GenerationDefaults:
        """Read ``generation_config.json`` from the checkpoint folder when present.

        ``eos_token_id`` may be one int or a list (Qwen3 lists two); without
        it, ``fallback_eos`` (config.json's ids) is used. ``temperature``,
        ``top_p`` and ``top_k`` become the request defaults (as vLLM does).
        A malformed file raises ValueError naming the key.
        """
        path = Path(model_dir) / "generation_config.json"
        eos = tuple(int(t) for t in fallback_eos)
        if not path.is_file():
            return cls(eos_token_ids=eos)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must hold a JSON object")
        eos_raw = raw.get("eos_token_id")
        if eos_raw is not None:
            items = eos_raw if isinstance(eos_raw, list) else [eos_raw]
            if not all(_is_int(t) and t >= 0 for t in items):
                raise ValueError(f"{path}: eos_token_id must be a token id or a list of token ids, got {eos_raw!r}")
            eos = tuple(int(t) for t in items)
        values: dict[str, Any] = {}
        for key, want_int in (("temperature", False), ("top_p", False), ("top_k", True)):
            value = raw.get(key)
            if value is None:
                continue
            if not (_is_int(value) if want_int else _is_number(value)):
                raise ValueError(f"{path}: {key} must be {'an integer' if want_int else 'a number'}, got {value!r}")
            values[key] = 0 if key == "top_k" and value == -1 else value
        defaults = cls(eos_token_ids=eos, **values)
        try:  # the same range rules as a request's fields
            SamplingParams(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k)
        except SamplingParamError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return defaults


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; ranges are checked on construction (SamplingParamError).

    ``top_k`` 0 and ``top_p`` 1 and ``min_p`` 0 disable those filters;
    ``temperature`` 0 is greedy. ``logprobs``: None for none, k >= 0 for the
    chosen token's logprob plus k alternatives.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 or -1 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0"),
            ("presence_penalty", PENALTY_RANGE[0] <= self.presence_penalty <= PENALTY_RANGE[1], "a number in [-2, 2]"),
            ("frequency_penalty", PENALTY_RANGE[0] <= self.frequency_penalty <= PENALTY_RANGE[1],
             "a number in [-2, 2]"),
            ("seed", self.seed is None or _SEED_LOW <= self.seed <= _SEED_HIGH, "a 64-bit integer"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise SamplingParamError(name, f"must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_request(cls, body: Mapping[str, Any], defaults: GenerationDefaults, *, chat: bool) -> SamplingParams:
        """Read the sampling fields of a completions (``chat=False``) or chat request body.

        Types are strict as in OpenAI / vLLM: a boolean is not a number and a
        string is never converted. A missing or null field takes the
        checkpoint default (temperature, top_p, top_k) or the neutral value.
        Completions: ``logprobs`` an integer 0..20 or null. Chat: ``logprobs``
        a boolean and ``top_logprobs`` an integer 0..20 (needs ``logprobs``).
        """
        temperature = _read_number(body, "temperature", defaults.temperature)
        top_p = _read_number(body, "top_p", defaults.top_p)
        top_k = _read_int(body, "top_k", defaults.top_k)
        if top_k == -1:  # vLLM's spelling of "disabled"
            top_k = 0
        if chat:
            want = _read_bool(body, "logprobs", False)
            top = body.get("top_logprobs")
            if top is not None and not want:
                raise SamplingParamError("top_logprobs", "needs logprobs: true")
            logprobs = _read_int(body, "top_logprobs", 0) if want else None
            logprob_field = "top_logprobs"
        else:
            raw = body.get("logprobs")
            logprobs = None if raw is None else _read_int(body, "logprobs", 0)
            logprob_field = "logprobs"
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamError(logprob_field, f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise SamplingParamError("seed", f"must be an integer, got {seed!r}")
        return cls(
            temperature=float(temperature), top_p=float(top_p), top_k=top_k,
            min_p=float(_read_number(body, "min_p", 0.0)), seed=seed,
            repetition_penalty=float(_read_number(body, "repetition_penalty", 1.0)),
            presence_penalty=float(_read_number(body, "presence_penalty", 0.0)),
            frequency_penalty=float(_read_number(body, "frequency_penalty", 0.0)),
            logprobs=logprobs, ignore_eos=_read_bool(body, "ignore_eos", False),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _read_number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise SamplingParamError(name, f"must be a finite number, got {value!r}")
    return value


def _read_int(body: Mapping[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise SamplingParamError(name, f"must be an integer, got {value!r}")
    if name == "top_k" and value < -1:
        raise SamplingParamError(name, f"must be -1, 0 (disabled) or a positive integer, got {value!r}")
    return value


def _read_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SamplingParamError(name, f"must be a boolean, got {value!r}")
    return value


def make_generator(seed: int | None, choice_index: int, device: torch.device) -> torch.Generator | None:
    """A generator for choice ``choice_index`` of a seeded request; None when unseeded.

    Choice 0 uses the seed itself; choice i mixes i into the seed, so the
    ``n`` choices of one request differ but each one repeats run after run
    on the same device.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + choice_index * _GOLDEN64) % 2**64)
    return generator


# ---------------------------------------------------------------------------
# logits processing stages: [B, V] float32 in and out, per-row parameters as [B] tensors


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF's rule over seen tokens: a positive logit is divided by the penalty, a negative one multiplied.

    ``seen`` [B, V] bool (token occurs in prompt or output), ``penalty`` [B].
    """
    p = penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's rule: ``logit -= frequency * count + presence * (count > 0)`` over output counts [B, V]."""
    counts = counts.to(logits.dtype)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row by its temperature [B]; greedy rows (0) are left as they are."""
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe.unsqueeze(1)


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's ``top_k`` [B] largest logits (ties with the k-th kept, as HF); 0 keeps all."""
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    ordered = logits.sort(dim=-1, descending=True).values
    kth = ordered.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Keep the smallest set of largest-probability tokens whose mass reaches ``top_p`` [B] (HF's rule).

    Ascending sort; a token is dropped when the cumulative mass up to and
    including it is <= 1 - top_p; the most likely token always stays.
    """
    ordered, order = logits.sort(dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p).unsqueeze(1)
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` [B] times the row's top probability (HF's rule)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---------------------------------------------------------------------------
# one sampling step


@dataclass
class SampleOutput:
    """Result of one step. ``tokens`` [B] int64; ``logprobs`` [B] float32, the chosen token's logprob
    under the raw log-softmax of the model's logits; ``top_ids`` [B, L] int64 and ``top_logprobs``
    [B, L] float32, the L most likely tokens under the same raw distribution."""

    tokens: Tensor
    logprobs: Tensor
    top_ids: Tensor
    top_logprobs: Tensor


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists as a [B, N] int64 tensor (pad 0) and a [B, N] validity mask; one host->device copy."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros((len(rows), max(width, 1)), dtype=torch.int64)
    valid = torch.zeros((len(rows), max(width, 1)), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.int64)
            valid[i, : len(row)] = True
    return ids.to(device, non_blocking=True), valid.to(device, non_blocking=True)


def _token_counts(rows: Sequence[Sequence[int]], shape: torch.Size, device: torch.device) -> Tensor:
    """Occurrences of each token per row: [B, V] int32 via one scatter_add on the device."""
    ids, valid = _padded(rows, device)
    counts = torch.zeros(shape, dtype=torch.int32, device=device)
    return counts.scatter_add_(1, ids, valid.to(torch.int32))


def _column(params: Sequence[SamplingParams], name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=dtype).to(device, non_blocking=True)


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> SampleOutput:
    """Pick one token per row of ``logits`` [B, V] float32 under each row's ``params``.

    ``generators[i]`` (from make_generator, on the logits' device) drives
    row i's draw when not None. ``prompt_ids`` / ``output_ids`` are the
    row's tokens so far (repetition penalty reads both, presence and
    frequency only the output). Never reads a value back to the host.
    """
    batch, vocab = logits.shape
    if not len(params) == len(generators) == len(prompt_ids) == len(output_ids) == batch:
        raise ValueError(f"sample: {batch} logits rows but {len(params)} params, {len(generators)} generators, "
                         f"{len(prompt_ids)} prompts, {len(output_ids)} outputs")
    device = logits.device
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1)

    # 1. penalties (skipped as a whole when no row asks for one)
    if any(p.needs_penalties for p in params):
        if any(p.repetition_penalty != 1 for p in params):
            seen = _token_counts([list(a) + list(b) for a, b in zip(prompt_ids, output_ids)], logits.shape, device) > 0
            logits = apply_repetition_penalty(logits, seen, _column(params, "repetition_penalty", torch.float32, device))
        if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
            counts = _token_counts(output_ids, logits.shape, device)
            logits = apply_presence_frequency(logits, counts, _column(params, "presence_penalty", torch.float32, device),
                                              _column(params, "frequency_penalty", torch.float32, device))
    greedy_tokens = logits.argmax(dim=-1)

    # 2. temperature and filters, each only when some sampled row uses it
    sampled = [not p.greedy for p in params]
    if any(sampled):
        logits = apply_temperature(logits, _column(params, "temperature", torch.float32, device))
        if any(p.top_k > 0 for p in params):
            logits = apply_top_k(logits, _column(params, "top_k", torch.int64, device))
        if any(p.top_p < 1 for p in params):
            logits = apply_top_p(logits, _column(params, "top_p", torch.float32, device))
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, _column(params, "min_p", torch.float32, device))

        # 3. exponential race: argmax(p / q), q ~ Exp(1), picks token v with probability p_v.
        #    Seeded rows draw from their own generator; unseeded rows share the device default.
        probs = logits.softmax(dim=-1)
        noise = torch.ones_like(probs)
        unseeded = [i for i, (s, g) in enumerate(zip(sampled, generators)) if s and g is None]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), vocab), device=device).exponential_()
        for i, (s, g) in enumerate(zip(sampled, generators)):
            if s and g is not None:
                noise[i].exponential_(generator=g)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a draw of exactly 0 would pick a banned token (0/0)
        drawn = (probs / noise).argmax(dim=-1)
        is_sampled = torch.tensor(sampled, dtype=torch.bool).to(device, non_blocking=True)
        tokens = torch.where(is_sampled, drawn, greedy_tokens)
    else:
        tokens = greedy_tokens

    # 4. logprobs under the raw distribution
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    width = min(max((p.logprobs or 0 for p in params), default=0), vocab)
    if width:
        top_logprobs, top_ids = raw_logprobs.topk(width, dim=-1)
    else:
        top_logprobs = raw_logprobs.new_empty((batch, 0))
        top_ids = torch.empty((batch, 0), dtype=torch.int64, device=device)
    return SampleOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)
