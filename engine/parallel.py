"""Process groups of one EP group and the collectives the model uses.

Layout (``ParallelConfig``): the world (W ranks) is one EP group; attention TP
groups are blocks of ``tp`` consecutive ranks (they never cross a pod);
attention-DP group d = TP group d. Groups are built explicitly with
``dist.new_group`` (every rank creates every group, in the same order, as
torch.distributed requires). gloo on CPU, NCCL on CUDA, same code.

Work split inside a step:

* sequences: attention-DP group d takes sequences ``i`` with ``i % dp == d``;
* MoE tokens: the ``tp`` ranks of a TP group hold the same tokens after
  attention; each routes a contiguous 1/tp chunk through the MoE layer and the
  TP group all-gathers the results, so every token is routed exactly once in
  the whole group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moeshard.engine.config import ParallelConfig


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def init_world(parallel: ParallelConfig, rendezvous: str, *, timeout_s: float = 600.0) -> None:
    """Join the EP group's default process group at ``host:port`` (TCP store on rank 0)."""
    if dist.is_initialized():
        if dist.get_world_size() != parallel.world_size or dist.get_rank() != parallel.rank:
            raise RuntimeError(
                f"a process group already exists with rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"expected {parallel.rank}/{parallel.world_size}"
            )
        return
    dist.init_process_group(
        backend=backend_for(parallel.device), init_method=f"tcp://{rendezvous}", rank=parallel.rank,
        world_size=parallel.world_size, timeout=timedelta(seconds=timeout_s),
    )


@dataclass
class ProcessGroups:
    """The groups this rank belongs to. ``tp`` is None when TP = 1 (no collective needed)."""

    parallel: ParallelConfig
    tp: object | None

    @classmethod
    def build(cls, parallel: ParallelConfig) -> "ProcessGroups":
        tp_group = None
        if parallel.tp_size > 1:
            for d in range(parallel.dp_size):  # every rank creates every TP group, same order
                group = dist.new_group(ranks=parallel.tp_group_ranks(d), backend=backend_for(parallel.device))
                if d == parallel.dp_rank:
                    tp_group = group
        return cls(parallel, tp_group)

    # -- TP collectives ----------------------------------------------------
    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results over the TP group (Megatron row-parallel output), in place."""
        if self.tp is not None and x.numel():
            dist.all_reduce(x, group=self.tp)
        return x

    def tp_chunk(self, num_tokens: int) -> tuple[int, int]:
        """[start, stop) of the tokens this TP rank routes through the MoE layer."""
        tp = self.parallel.tp_size
        size = math.ceil(num_tokens / tp) if num_tokens else 0
        start = min(self.parallel.tp_rank * size, num_tokens)
        return start, min(start + size, num_tokens)

    def tp_all_gather_tokens(self, part: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Reassemble [num_tokens, H] from each TP rank's chunk (see ``tp_chunk``)."""
        if self.tp is None:
            return part
        tp = self.parallel.tp_size
        size = math.ceil(num_tokens / tp) if num_tokens else 0
        if size == 0:
            return part
        padded = part.new_zeros((size, *part.shape[1:]))
        padded[: part.shape[0]] = part
        chunks = [torch.empty_like(padded) for _ in range(tp)]
        dist.all_gather(chunks, padded, group=self.tp)
        return torch.cat(chunks, dim=0)[:num_tokens]

    def destroy(self) -> None:
        if self.tp is not None:
            dist.destroy_process_group(self.tp)
            self.tp = None
