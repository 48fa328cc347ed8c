"""Routing alignment: top-K expert ids -> pair order grouped by expert.

Shape legend: T tokens, K experts per token (top-K), E local experts,
N = T*K (token, expert) pairs, BM the GEMM block size along tokens,
P_max = N + E*(BM-1) the worst-case padded length, B_max = ceil(P_max / BM).

A pair is identified by its flat index ``t*K + k``. The grouped GEMMs want the
pairs of one expert contiguous and each expert's segment padded to a multiple
of BM, so that every block of BM rows belongs to exactly one expert (the idea
behind vLLM's ``moe_align_block_size``). Ids outside ``[0, E)`` (-1 marks a
pair computed on another rank) are left out. Padding slots hold the sentinel
``N``, which is one past the last pair: kernels mask it and never read
through it.

Order inside an expert's segment is ascending pair index (a stable sort), so
the Triton path and the torch twin agree exactly.

Triton path, sync-free (sizes are upper bounds, the real padded length stays
on the device):
  1. ``_moe_chunk_count_kernel``: one program per chunk of pairs counts how
     many of its pairs go to each expert -> chunk_counts [C, E].
  2. torch prefix sums: expert totals, padded segment offsets, and each
     chunk's first slot inside each expert's segment.
  3. ``_moe_scatter_kernel``: each program ranks its pairs among the chunk's
     pairs of the same expert (one-hot cumsum) and writes the pair index to
     its slot.
  4. torch ``searchsorted``: which expert owns each block of BM slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# First: picks Triton's interpreter on machines without CUDA, before triton loads.
from moeshard.kernels.triton_launch import launchable, next_power_of_2, triton_requested

import triton
import triton.language as tl


# Pairs per program in the alignment kernels. One program holds a
# [ALIGN_CHUNK, next_pow2(E)] int32 one-hot tile: 128 x 256 x 4 B = 128 KiB at
# E = 256 local experts, 8 KiB at E = 16. Untuned: no GPU has timed it yet.
ALIGN_CHUNK = 128


@dataclass(frozen=True)
class AlignedRouting:
    """Pairs grouped by expert, each expert's segment padded to ``block_m``.

    Attributes (device tensors, int32):
      sorted_pair_ids  [P_max]  flat pair index per slot; ``sentinel`` in padding
                                 and in the unused tail past ``num_padded``.
      block_expert_ids [B_max]  expert owning slots [b*BM, (b+1)*BM); -1 past the end.
      expert_counts    [E]      pairs routed to each expert (masked pairs excluded).
      expert_offsets   [E+1]    start of each expert's padded segment; the last
                                 entry is the padded length P actually used.
    Plain ints: ``num_pairs`` N, ``block_m`` BM, ``sentinel`` (== N).
    """

    sorted_pair_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    num_pairs: int
    block_m: int

    @property
    def sentinel(self) -> int:
        return self.num_pairs

    @property
    def num_padded(self) -> torch.Tensor:
        """[1] int32 device tensor: padded length P (slots in use)."""
        return self.expert_offsets[-1:]


def max_padded_length(num_pairs: int, num_experts: int, block_m: int) -> int:
    """P_max: the padded length when every expert's segment wastes BM-1 slots."""
    return num_pairs + num_experts * (block_m - 1)


def _check_align_inputs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")


def _finish(
    sorted_pair_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, num_pairs: int, block_m: int
) -> AlignedRouting:
    """Step 4: the expert owning each block of BM slots (-1 for blocks past P)."""
    num_experts = counts.numel()
    num_blocks = triton.cdiv(sorted_pair_ids.numel(), block_m)
    starts = torch.arange(num_blocks, device=counts.device, dtype=torch.int32) * block_m
    owner = torch.searchsorted(offsets[1:], starts, right=True).to(torch.int32)
    owner = torch.where(owner < num_experts, owner, torch.full_like(owner, -1))
    return AlignedRouting(sorted_pair_ids, owner, counts, offsets, num_pairs, block_m)


def _padded_offsets(counts: torch.Tensor, block_m: int) -> torch.Tensor:
    """[E] counts -> [E+1] exclusive prefix sum of counts rounded up to BM."""
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    offsets[1:] = torch.cumsum(padded, 0)
    return offsets


def moe_align_block_size_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Torch twin of :func:`moe_align_block_size` (same outputs, bit for bit)."""
    _check_align_inputs(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    # 1. Stable sort by expert; masked pairs sort last under the key E.
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(flat[valid], minlength=num_experts).to(torch.int32)
    offsets = _padded_offsets(counts, block_m)
    # 2. Slot of the j-th sorted valid pair: its expert's padded start plus its
    #    rank inside the expert (j minus the expert's unpadded start).
    n_valid = int(valid.sum())
    sorted_experts = key[order[:n_valid]]
    unpadded_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_valid, device=device) - unpadded_start[sorted_experts]
    slots = offsets[sorted_experts].to(torch.int64) + rank
    sorted_pair_ids = torch.full(
        (max_padded_length(num_pairs, num_experts, block_m),), num_pairs, dtype=torch.int32, device=device
    )
    sorted_pair_ids[slots] = order[:n_valid].to(torch.int32)
    return _finish(sorted_pair_ids, counts, offsets, num_pairs, block_m)


@triton.jit
def _moe_chunk_count_kernel(
    ids_ptr,  # [N] expert id per pair
    chunk_counts_ptr,  # [C, E] int32 out
    num_pairs,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
    counts = tl.sum(onehot, axis=0)
    tl.store(chunk_counts_ptr + pid * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def _moe_scatter_kernel(
    ids_ptr,  # [N] expert id per pair
    chunk_base_ptr,  # [C, E] int32: first slot of this chunk's pairs in each expert segment
    sorted_ptr,  # [P_max] int32 out, prefilled with the sentinel
    num_pairs,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
    # Rank among earlier pairs of this chunk with the same expert.
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    safe_ids = tl.where(valid, ids, 0)
    base = tl.load(chunk_base_ptr + pid * num_experts + safe_ids, mask=valid, other=0)
    tl.store(sorted_ptr + base + rank, offs.to(tl.int32), mask=valid)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Group (token, expert) pairs by expert and pad each segment to ``block_m``.

    topk_ids [T, K] int64/int32: expert per pair; ids outside [0, E) are masked.
    Returns an :class:`AlignedRouting` whose tensors live on ``topk_ids.device``.
    Runs the Triton kernels when :func:`triton_requested`, else the twin.
    """
    if triton_requested(topk_ids):
        return moe_align_block_size_triton(topk_ids, num_experts, block_m)
    return moe_align_block_size_torch(topk_ids, num_experts, block_m)


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Launcher: validates, then steps 1-4 of the module docstring without a host sync."""
    _check_align_inputs(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).contiguous()
    num_pairs = flat.numel()
    num_chunks = max(triton.cdiv(num_pairs, ALIGN_CHUNK), 1)
    e_pad = next_power_of_2(num_experts)
    # 1. Per-chunk histogram.
    chunk_counts = torch.zeros((num_chunks, num_experts), dtype=torch.int32, device=device)
    if num_pairs:
        launchable(_moe_chunk_count_kernel, device)[(num_chunks,)](
            flat, chunk_counts, num_pairs, num_experts, CHUNK=ALIGN_CHUNK, E_PAD=e_pad
        )
    # 2. Prefix sums: padded expert offsets, then each chunk's base slot per expert.
    counts = chunk_counts.sum(0, dtype=torch.int32)
    offsets = _padded_offsets(counts, block_m)
    chunk_base = (offsets[:-1][None, :] + torch.cumsum(chunk_counts, 0) - chunk_counts).to(torch.int32)
    # 3. Scatter pair indices into their slots.
    sorted_pair_ids = torch.full(
        (max_padded_length(num_pairs, num_experts, block_m),), num_pairs, dtype=torch.int32, device=device
    )
    if num_pairs:
        launchable(_moe_scatter_kernel, device)[(num_chunks,)](
            flat, chunk_base.contiguous(), sorted_pair_ids, num_pairs, num_experts, CHUNK=ALIGN_CHUNK, E_PAD=e_pad
        )
    # 4. Block owners.
    return _finish(sorted_pair_ids, counts, offsets, num_pairs, block_m)
