"""Iteration-level scheduler (continuous batching with chunked prefill), run by rank 0 only. Pure Python.

Every call of :meth:`Scheduler.schedule` plans ONE engine step under a token
budget (``max_num_batched_tokens``), in the style of vLLM v1 / SGLang:

1. Running sequences first, decodes before prefill continuations, oldest
   first: a decode costs 1 token; a prompt still being prefilled gets the
   next chunk that fits the remaining budget (chunked prefill: a prompt
   longer than the budget is spread over several steps).
2. A running sequence that needs a new KV block when its DP group's pool is
   empty preempts the NEWEST running sequence of that group (which may be
   itself): its blocks are freed and it goes back to the front of the
   waiting queue, to be recomputed (prompt + tokens generated so far) when
   blocks free up. Nothing is admitted in a step that preempted.
3. Waiting sequences are admitted in arrival order while budget, sequence
   slots and blocks last; one that finds the pool full waits (no OOM).

:meth:`Scheduler.on_step` appends the sampled tokens and retires finished
sequences (stop token, ``max_tokens``); :meth:`Scheduler.finish` retires one
for another reason (a stop string, a cancelled request). Retired sequences'
blocks return to the pool at once; the next plan tells the ranks to forget
them.

``request_level=True`` is the old request-level batching, kept as the
benchmark's baseline: a batch is admitted only when nothing runs, prompts
are prefilled whole, then the batch decodes until its last sequence ends.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from moeshard.engine.kv_cache import DEFAULT_BLOCK_SIZE, BlockPool
from moeshard.engine.step_plan import (
    NewSequence,
    SampledToken,
    ScheduledChunk,
    StepPlan,
)


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling limits. ``num_blocks`` is per attention-DP group (each group has its own pool)."""

    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    dp_size: int = 1
    request_level: bool = False

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "dp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + generated) one DP group's pool can hold."""
        return self.num_blocks * self.block_size


@dataclass(eq=False)
class Sequence:
    """One choice of one request, as the scheduler tracks it."""

    prompt: tuple[int, ...]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    params: Any = None
    choice_index: int = 0
    owner: Any = None  # the serving layer's handle; never read here
    seq_id: int = -1  # set by Scheduler.add
    dp_group: int = 0
    outputs: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the pool (or being computed this step)
    blocks: list[int] = field(default_factory=list)
    registered: bool = False  # the ranks know it (a NewSequence went out)
    finish_reason: str | None = None
    preemptions: int = 0

    @property
    def total(self) -> int:
        return len(self.prompt) + len(self.outputs)


class Scheduler:
    """Plans steps over the waiting and running sequences; see the module docstring."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.pools = [BlockPool(config.num_blocks, config.block_size) for _ in range(config.dp_size)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.by_id: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._next_group = 0
        self._forget: list[int] = []  # retired sequences the ranks still hold
        self.preemptions = 0

    # ------------------------------------------------------------------ intake

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; ValueError when it could never fit one DP group's pool."""
        if seq.total + seq.max_tokens > self.config.max_sequence_tokens + 1:
            raise ValueError(f"prompt + max_tokens ({seq.total + seq.max_tokens}) exceeds the KV pool "
                             f"({self.config.max_sequence_tokens} tokens)")
        seq.seq_id = next(self._ids)
        seq.dp_group = self._next_group
        self._next_group = (self._next_group + 1) % self.config.dp_size
        self.by_id[seq.seq_id] = seq
        self.waiting.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire ``seq`` now (stop string, cancel); its blocks are free for the next step."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pools[seq.dp_group].release(seq.blocks)
        self.by_id.pop(seq.seq_id, None)
        if seq.registered:
            self._forget.append(seq.seq_id)

    # ------------------------------------------------------------------ state

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._forget)

    @property
    def blocks_used(self) -> int:
        return sum(p.used for p in self.pools)

    @property
    def blocks_free(self) -> int:
        return sum(p.free for p in self.pools)

    # ------------------------------------------------------------------ planning

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pools[seq.dp_group].release(seq.blocks)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> StepPlan:
        """The next step's plan ("idle" when there is nothing to compute or forget)."""
        budget = self.config.max_num_batched_tokens
        chunks: dict[int, ScheduledChunk] = {}
        new: list[NewSequence] = []
        preempted = False

        def take(seq: Sequence, count: int) -> None:
            nonlocal budget
            start = seq.computed
            seq.computed += count
            budget -= count
            chunks[seq.seq_id] = ScheduledChunk(seq.seq_id, start, count, tuple(seq.blocks),
                                                sample=seq.computed == seq.total)
            if not seq.registered:
                seq.registered = True
                new.append(NewSequence(seq.seq_id, seq.dp_group, seq.prompt, seq.params, seq.choice_index))

        # 1. Running: decodes first, then prefill continuations; oldest first within each.
        order = sorted(self.running, key=lambda s: (s.total - s.computed > 1, self.running.index(s)))
        for seq in order:
            if seq not in self.running:  # preempted earlier in this loop
                continue
            count = min(seq.total - seq.computed, budget)
            if count <= 0:
                continue
            pool = self.pools[seq.dp_group]
            while not pool.grow(seq.blocks, seq.computed + count):
                victim = [s for s in self.running if s.dp_group == seq.dp_group][-1]
                preempted = True
                if victim.seq_id in chunks:  # already planned this step: undo
                    undone = chunks.pop(victim.seq_id)
                    budget += undone.num_tokens
                    victim.computed = undone.start
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                take(seq, count)
        # 2. Admission, in arrival order.
        if self.config.request_level and self.running:
            admit = False
        else:
            admit = not preempted
        while admit and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            count = seq.total - seq.computed
            if not self.config.request_level:
                count = min(count, budget)
            elif self.running and count > budget:
                break  # request-level: whole prompts; the first one always goes
            if not self.pools[seq.dp_group].grow(seq.blocks, seq.computed + count):
                break  # the pool is full: wait for blocks
            self.waiting.popleft()
            self.running.append(seq)
            take(seq, count)
        forget, self._forget = tuple(self._forget), []
        if not chunks and not forget:
            return StepPlan("idle")
        return StepPlan("step", tuple(new), tuple(chunks.values()), forget)

    def on_step(self, sampled: Seq[SampledToken]) -> list[tuple[Sequence, SampledToken]]:
        """Append each sampled token to its sequence; retire those that hit a stop token or max_tokens.

        Returns (sequence, token) pairs in order, for the output processor;
        a retired sequence has its ``finish_reason`` set ("stop" / "length").
        """
        out = []
        for token in sampled:
            seq = self.by_id.get(token.seq_id)
            if seq is None:  # finished (cancelled) while its step ran
                continue
            seq.outputs.append(token.token)
            if token.token in seq.stop_token_ids:
                self.finish(seq, "stop")
            elif len(seq.outputs) >= seq.max_tokens:
                self.finish(seq, "length")
            out.append((seq, token))
        return out
