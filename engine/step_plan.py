"""Rank coordination: the plan of one engine step, and the channel rank 0 broadcasts it on.

Rank 0 schedules; every rank runs the step it is told. A plan is small: new
sequences carry their prompt and sampling parameters once (every rank keeps a
registry of them), each scheduled chunk names a sequence, the span of its
tokens to compute and its block table; the tokens themselves are read from
the registry (prompt + generated so far), which all ranks update identically
from the sampled tokens every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class NewSequence:
    """A sequence joining the group: one choice of one request."""

    seq_id: int
    dp_group: int  # the attention-DP group whose pool holds its KV blocks, for its whole life
    prompt: tuple[int, ...]
    params: Any = None  # moeshard.engine.sampling.SamplingParams; None = greedy, no logprobs
    choice_index: int = 0  # which of the request's n choices (seeds a per-choice generator)


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of a sequence (its prompt + generated tokens).

    ``sample``: the chunk ends at the sequence's last known token, so the
    next token is sampled from its logits.
    """

    seq_id: int
    start: int
    num_tokens: int
    block_table: tuple[int, ...]
    sample: bool


@dataclass(frozen=True)
class StepPlan:
    """What every rank does at one step boundary."""

    kind: str  # "step" | "idle" | "stop"
    new: tuple[NewSequence, ...] = ()
    chunks: tuple[ScheduledChunk, ...] = ()
    finished: tuple[int, ...] = ()  # sequence ids every rank forgets (after this step's work)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class SampledToken:
    """A token sampled for one sequence in a step, with its logprob and top alternatives."""

    seq_id: int
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class GroupChannel(Protocol):
    """The collectives the step loop needs, apart from the model's own communication."""

    rank: int
    world_size: int

    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan: ...

    def reduce_min(self, values: np.ndarray) -> np.ndarray: ...

    def reduce_sum(self, values: np.ndarray) -> np.ndarray: ...


class LocalChannel:
    """A group of one rank: every collective is the identity."""

    rank, world_size = 0, 1

    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan:
        if plan is None:
            raise ValueError("rank 0 must provide the plan")
        return plan

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

    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan:
        box = [plan]
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
