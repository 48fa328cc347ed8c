"""Permute / unpermute of dispatch buffers around the grouped expert GEMMs.

Shape legend: T tokens, K experts per token, H hidden size, N = T*K pairs,
P_max padded slots of an :class:`~moeshard.kernels.moe_align.AlignedRouting`.

``moe_permute`` copies each pair's token row into its slot, so every expert's
rows are contiguous (what an all-to-all send buffer or an unfused grouped
GEMM wants); padding slots are zero-filled, never left uninitialised.
``moe_unpermute`` is the inverse scatter: slot rows go back to their pair's
row, and rows of masked pairs (never routed here) come back as zeros. The
fused expert FFN does both inside its GEMMs; these ops serve the unfused and
communication paths.
"""

from __future__ import annotations

import torch

# First: picks Triton's interpreter on machines without CUDA, before triton loads.
from moeshard.kernels.triton_launch import launchable, next_power_of_2, triton_requested

import triton
import triton.language as tl

from moeshard.kernels.moe_align import AlignedRouting

_BLOCK_ROWS = 16


@triton.jit
def _moe_permute_kernel(
    src_ptr,  # permute: x [T, H]; unpermute: y [P_max, H]
    dst_ptr,  # permute: out [P_max, H]; unpermute: out [N, H] (zeroed)
    sorted_ptr,  # [P_max] pair index per slot, sentinel = num_pairs
    num_slots,
    num_pairs,
    top_k,
    hidden,
    stride_src,
    stride_dst,
    UNPERMUTE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    slot = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    slot_ok = slot < num_slots
    pair = tl.load(sorted_ptr + slot, mask=slot_ok, other=num_pairs)
    live = pair < num_pairs
    h_ok = offs_h < hidden
    if UNPERMUTE:
        rows = tl.load(
            src_ptr + slot[:, None].to(tl.int64) * stride_src + offs_h[None, :],
            mask=live[:, None] & h_ok[None, :],
            other=0.0,
        )
        dst = dst_ptr + pair[:, None].to(tl.int64) * stride_dst + offs_h[None, :]
        tl.store(dst, rows, mask=live[:, None] & h_ok[None, :])
    else:
        token = (pair // top_k).to(tl.int64)
        rows = tl.load(src_ptr + token[:, None] * stride_src + offs_h[None, :], mask=live[:, None] & h_ok[None, :], other=0.0)
        dst = dst_ptr + slot[:, None].to(tl.int64) * stride_dst + offs_h[None, :]
        tl.store(dst, rows, mask=slot_ok[:, None] & h_ok[None, :])  # padding slots get zeros


def _check(rows: torch.Tensor, routing: AlignedRouting, what: str, expected_rows: int) -> None:
    if rows.dim() != 2 or rows.shape[0] != expected_rows:
        raise ValueError(f"{what} must be [{expected_rows}, H], got shape {tuple(rows.shape)}")
    if rows.device != routing.sorted_pair_ids.device:
        raise ValueError(f"{what} is on {rows.device} but the routing is on {routing.sorted_pair_ids.device}")


def _check_top_k(x: torch.Tensor, routing: AlignedRouting, top_k: int) -> None:
    if top_k < 1 or x.dim() != 2 or x.shape[0] * top_k != routing.num_pairs:
        raise ValueError(
            f"x [T, H] with top_k={top_k} must give T*K = {routing.num_pairs} pairs, got shape {tuple(x.shape)}"
        )


def moe_permute_torch(x: torch.Tensor, routing: AlignedRouting, top_k: int) -> torch.Tensor:
    """Torch twin of :func:`moe_permute`. x [T, H] -> [P_max, H]."""
    _check_top_k(x, routing, top_k)
    _check(x, routing, "x", x.shape[0])
    slots = routing.sorted_pair_ids.long()
    live = slots < routing.num_pairs
    out = torch.zeros((slots.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    out[live] = x[slots[live] // top_k]
    return out


def moe_unpermute_torch(y: torch.Tensor, routing: AlignedRouting) -> torch.Tensor:
    """Torch twin of :func:`moe_unpermute`. y [P_max, H] -> [N, H]."""
    _check(y, routing, "y", routing.sorted_pair_ids.numel())
    slots = routing.sorted_pair_ids.long()
    live = slots < routing.num_pairs
    out = torch.zeros((routing.num_pairs, y.shape[1]), dtype=y.dtype, device=y.device)
    out[slots[live]] = y[live]
    return out


def _launch(src: torch.Tensor, dst: torch.Tensor, routing: AlignedRouting, top_k: int, unpermute: bool) -> None:
    num_slots = routing.sorted_pair_ids.numel()
    hidden = src.shape[1]
    if num_slots == 0 or hidden == 0:
        return
    block_h = min(next_power_of_2(hidden), 256)
    grid = (triton.cdiv(num_slots, _BLOCK_ROWS), triton.cdiv(hidden, block_h))
    launchable(_moe_permute_kernel, src.device)[grid](
        src,
        dst,
        routing.sorted_pair_ids,
        num_slots,
        routing.num_pairs,
        top_k,
        hidden,
        src.stride(0),
        dst.stride(0),
        UNPERMUTE=unpermute,
        BLOCK_ROWS=_BLOCK_ROWS,
        BLOCK_H=block_h,
    )


def moe_permute(x: torch.Tensor, routing: AlignedRouting, top_k: int) -> torch.Tensor:
    """Gather token rows into expert-grouped slots.

    x [T, H]; routing from ``moe_align_block_size(topk_ids [T, K], E, BM)``.
    Returns [P_max, H]: slot p holds x[sorted_pair_ids[p] // K], zeros in padding.
    Runs the Triton kernel when :func:`triton_requested`, else the twin.
    """
    if triton_requested(x):
        return moe_permute_triton(x, routing, top_k)
    return moe_permute_torch(x, routing, top_k)


def moe_unpermute(y: torch.Tensor, routing: AlignedRouting) -> torch.Tensor:
    """Scatter slot rows back to pair order.

    y [P_max, H] (padding rows are never read). Returns [N, H]: row n = y[slot
    of pair n]; rows of masked pairs are zeros. ``.view(T, K, H)`` feeds
    :func:`moeshard.kernels.moe_combine.moe_combine`.
    """
    if triton_requested(y):
        return moe_unpermute_triton(y, routing)
    return moe_unpermute_torch(y, routing)


def moe_permute_triton(x: torch.Tensor, routing: AlignedRouting, top_k: int) -> torch.Tensor:
    """Launcher of :func:`moe_permute`'s kernel: validates, one program per 16 slots x column block."""
    _check_top_k(x, routing, top_k)
    _check(x, routing, "x", x.shape[0])
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((routing.sorted_pair_ids.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    _launch(x, out, routing, top_k, unpermute=False)
    return out


def moe_unpermute_triton(y: torch.Tensor, routing: AlignedRouting) -> torch.Tensor:
    """Launcher of :func:`moe_unpermute`'s kernel (same grid as the permute)."""
    _check(y, routing, "y", routing.sorted_pair_ids.numel())
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = torch.zeros((routing.num_pairs, y.shape[1]), dtype=y.dtype, device=y.device)
    _launch(y, out, routing, 1, unpermute=True)
    return out
