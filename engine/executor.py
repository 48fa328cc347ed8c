"""Step execution: one forward over a step plan's mixed batch on this rank, then sampling.

Every rank of the group calls :meth:`StepExecutor.execute` with the same
plan (COLLECTIVE):

1. Register the plan's new sequences (prompt, sampling parameters) in the
   per-rank registry; every rank holds the same registry.
2. Keep the chunks of this rank's attention-DP group; pack their tokens, read
   from the registry (prompt + generated tokens), with their positions and
   pool slots through the block tables.
3. Give every token of the whole plan a key (its index in the group's step
   batch, offset by the tokens stepped so far) for the replica choice.
4. Forward (the MoE layers are collective over the EP group: every rank takes
   part, with zero tokens if need be).
5. TP rank 0 of each DP group samples its sequences whose chunk ends at
   their last known token; one SUM all-reduce over the world shares the
   tokens (and logprobs) with every rank, which appends them to the registry.
6. Forget the plan's finished sequences.

Shape legend: T tokens of this rank's sequences, S sampled sequences of the
whole plan, L top logprobs, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from moeshard.engine.kv_cache import PagedKVCache
from moeshard.engine.model import MoEModel, StepBatch
from moeshard.engine.paged_attention import PagedMetadata
from moeshard.engine.step_plan import NewSequence, SampledToken, StepPlan

KEY_MODULUS = 2**31  # token keys stay below 2^31 so the 32-bit replica hash never sees an overflowing product


@dataclass
class SequenceRecord:
    """What every rank knows of a live sequence."""

    dp_group: int
    prompt: tuple[int, ...]
    params: Any
    choice_index: int
    outputs: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # created on the sampling rank at its first sample

    def token_span(self, start: int, count: int) -> list[int]:
        prompt = len(self.prompt)
        if start + count <= prompt:
            return list(self.prompt[start:start + count])
        return (list(self.prompt[start:]) + self.outputs[max(0, start - prompt):])[:count]


def _top_logprobs(params: Any) -> int:
    value = getattr(params, "logprobs", None) if params is not None else None
    return int(value or 0)


def sample_rows(logits: torch.Tensor, records: Sequence[SequenceRecord], device: torch.device):
    """Sample one token per row of logits [S, V] float32 -> (tokens [S], logprobs [S], top ids/logprobs [S, L]).

    Rows whose sequence has no sampling parameters are greedy. With any
    parameters in the batch, moeshard.engine.sampling does all rows.
    """
    if all(r.params is None for r in records):
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        empty = torch.zeros((len(records), 0), device=device)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0], empty.long(), empty
    from moeshard.engine.sampling import SamplingParams, make_generator, sample

    params = [r.params if r.params is not None else SamplingParams(temperature=0.0) for r in records]
    for r, p in zip(records, params):
        if r.generator is None:
            r.generator = make_generator(p.seed, r.choice_index, device)
    out = sample(logits, params, [r.generator for r in records], [r.prompt for r in records],
                 [r.outputs for r in records])
    return out.tokens, out.logprobs, out.top_ids, out.top_logprobs


class TokenKeys:
    """Tokens the group has stepped through so far (mod 2^31): the offset of the next step's token keys.

    Every rank runs the same steps, so all agree on it. A key that restarted
    at 0 every step would send every single-token decode step of an expert
    to the same replica and ignore the replica shares. Shared by every
    executor of a runtime.
    """

    def __init__(self) -> None:
        self.seen = 0

    def take(self, count: int) -> int:
        base = self.seen
        self.seen = (base + count) % KEY_MODULUS
        return base


class StepExecutor:
    """Runs step plans on one rank's model and paged KV pool."""

    def __init__(self, model: MoEModel, cache: PagedKVCache, *, dp_rank: int, tp_rank: int,
                 device: torch.device, keys: TokenKeys | None = None) -> None:
        self.model, self.cache = model, cache
        self.dp_rank, self.tp_rank, self.device = dp_rank, tp_rank, device
        self.sequences: dict[int, SequenceRecord] = {}
        self.keys = keys or TokenKeys()

    def register(self, new: Sequence[NewSequence]) -> None:
        for s in new:
            if s.seq_id in self.sequences:
                raise ValueError(f"sequence {s.seq_id} is already registered")
            self.sequences[s.seq_id] = SequenceRecord(s.dp_group, tuple(s.prompt), s.params, s.choice_index)

    def _batch(self, plan: StepPlan) -> tuple[StepBatch, list[int]]:
        """This rank's packed batch and, per local chunk, its index in plan.chunks."""
        n = self.cache.block_size
        tokens, keys, positions, slots, starts, kv_lens, tables, mine = [], [], [], [], [0], [], [], []
        offset, base = 0, self.keys.take(plan.num_tokens)
        for index, chunk in enumerate(plan.chunks):
            record = self.sequences[chunk.seq_id]
            if record.dp_group == self.dp_rank:
                mine.append(index)
                tokens += record.token_span(chunk.start, chunk.num_tokens)
                keys += range(base + offset, base + offset + chunk.num_tokens)
                span = range(chunk.start, chunk.start + chunk.num_tokens)
                positions += span
                slots += [chunk.block_table[p // n] * n + p % n for p in span]
                starts.append(starts[-1] + chunk.num_tokens)
                kv_lens.append(chunk.start + chunk.num_tokens)
                tables.append(list(chunk.block_table))
            offset += chunk.num_tokens
        dev = self.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=dev)  # noqa: E731
        meta = PagedMetadata(starts, kv_lens, tables, as_tensor(slots), as_tensor(positions), n,
                             self.model.cfg.sliding_window)
        return StepBatch(as_tensor(tokens), as_tensor(keys) % KEY_MODULUS, meta), mine

    def forward(self, plan: StepPlan) -> tuple[torch.Tensor, StepBatch, list[int]]:
        """COLLECTIVE. Register new sequences and run the model: (hidden [T, H], batch, local chunk indices)."""
        self.register(plan.new)
        batch, mine = self._batch(plan)
        return self.model.forward(batch, self.cache), batch, mine

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[SampledToken]:
        """COLLECTIVE. Run one step; the sampled tokens of the whole plan, in chunk order (same on every rank)."""
        if not plan.chunks:  # only sequences to register or forget: no forward (every rank skips it alike)
            self.register(plan.new)
            self._forget(plan.finished)
            return []
        hidden, batch, mine = self.forward(plan)
        sampled = [i for i, c in enumerate(plan.chunks) if c.sample]
        records = [self.sequences[plan.chunks[i].seq_id] for i in sampled]
        width = max((_top_logprobs(r.params) for r in records), default=0)
        shared = torch.zeros((len(sampled), 2 + 2 * width), dtype=torch.float64, device=self.device)
        position = {chunk: j for j, chunk in enumerate(mine)}  # plan chunk index -> this rank's sequence index
        local = [(row, i) for row, i in enumerate(sampled) if i in position]
        if self.tp_rank == 0 and local:
            ends = batch.attn.query_starts
            last = torch.tensor([ends[position[i] + 1] - 1 for _, i in local], device=self.device)
            logits = self.model.logits(hidden[last]).float()
            tokens, logprobs, top_ids, top_lp = sample_rows(logits, [records[row] for row, _ in local], self.device)
            rows = torch.tensor([row for row, _ in local], device=self.device)
            shared[rows, 0] = tokens.double()
            shared[rows, 1] = logprobs.double()
            if width and top_ids.shape[1]:
                k = min(width, top_ids.shape[1])
                shared[rows, 2:2 + k] = top_ids[:, :k].double()
                shared[rows, 2 + width:2 + width + k] = top_lp[:, :k].double()
        if sampled and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(shared)  # exactly one contributor per row: a sum is a gather
        out = []
        values = shared.cpu().tolist()  # one device-to-host copy per step
        for row, record in enumerate(records):
            seq_id = plan.chunks[sampled[row]].seq_id
            token = int(values[row][0])
            record.outputs.append(token)
            k = _top_logprobs(record.params)
            top = tuple((int(values[row][2 + j]), float(values[row][2 + width + j])) for j in range(k))
            out.append(SampledToken(seq_id, token, float(values[row][1]), top))
        self._forget(plan.finished)
        return out

    def _forget(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.sequences.pop(seq_id, None)
