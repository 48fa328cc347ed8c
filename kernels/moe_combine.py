"""Combine: weighted sum of each token's K expert outputs.

Shape legend: T tokens, K experts per token, H hidden size, E experts.

    out[t] = sum_k  w[t, k] * y[t, k]     over k with 0 <= topk_ids[t, k] < E

Masked pairs (id -1, or an id outside [0, E)) contribute zero and their rows
of ``y`` are never read, so a producer may leave them uninitialised.
Accumulation is float32; the result has ``y``'s dtype.
"""

from __future__ import annotations

import torch

# First: picks Triton's interpreter on machines without CUDA, before triton loads.
from moeshard.kernels.triton_launch import launchable, next_power_of_2, triton_requested

import triton
import triton.language as tl


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _moe_combine_kernel(
    y_ptr,  # [T*K, H] expert output per pair
    ids_ptr,  # [T*K] expert id per pair
    w_ptr,  # [T*K] routing weight per pair
    out_ptr,  # [T, H]
    top_k,
    hidden,
    num_experts,
    stride_ym,
    stride_om,
    APPLY_WEIGHTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    pair = token * top_k + offs_k
    ids = tl.load(ids_ptr + pair, mask=offs_k < top_k, other=-1)
    live = (offs_k < top_k) & (ids >= 0) & (ids < num_experts)
    h_ok = offs_h < hidden
    y = tl.load(y_ptr + pair[:, None] * stride_ym + offs_h[None, :], mask=live[:, None] & h_ok[None, :], other=0.0)
    y = y.to(tl.float32)
    if APPLY_WEIGHTS:
        w = tl.load(w_ptr + pair, mask=live, other=0.0).to(tl.float32)
        y = y * w[:, None]
    tl.store(out_ptr + token * stride_om + offs_h, tl.sum(y, axis=0).to(out_ptr.dtype.element_ty), mask=h_ok)


def _check_combine_inputs(
    y: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids.shape)}")
    t, k = topk_ids.shape
    if y.dim() != 3 or y.shape[:2] != (t, k):
        raise ValueError(f"expert outputs must be [T, K, H] = [{t}, {k}, H], got shape {tuple(y.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    if y.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"expert outputs must be float16/bfloat16/float32, got {y.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not (y.device == topk_ids.device == topk_weights.device):
        raise ValueError(
            f"all inputs must be on one device, got y on {y.device}, topk_ids on {topk_ids.device}, "
            f"topk_weights on {topk_weights.device}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def moe_combine_torch(
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    apply_weights: bool = True,
) -> torch.Tensor:
    """Torch twin of :func:`moe_combine`. y [T, K, H] -> [T, H]."""
    _check_combine_inputs(y, topk_ids, topk_weights, num_experts)
    live = (topk_ids >= 0) & (topk_ids < num_experts)
    w = topk_weights.float() if apply_weights else torch.ones_like(topk_weights, dtype=torch.float32)
    w = torch.where(live, w, torch.zeros_like(w))
    # where() rather than multiply: masked rows may hold garbage (NaN * 0 = NaN).
    y32 = torch.where(live[..., None], y.float(), torch.zeros((), dtype=torch.float32, device=y.device))
    return torch.einsum("tkh,tk->th", y32, w).to(y.dtype)


def moe_combine(
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    apply_weights: bool = True,
) -> torch.Tensor:
    """Weighted sum over K of expert outputs.

    y [T, K, H] float (rows of masked pairs are never read); topk_ids [T, K]
    (ids outside [0, num_experts) are masked); topk_weights [T, K] float.
    Returns [T, H] in y's dtype, accumulated in float32.
    """
    if triton_requested(y):
        return moe_combine_triton(y, topk_ids, topk_weights, num_experts=num_experts, apply_weights=apply_weights)
    return moe_combine_torch(y, topk_ids, topk_weights, num_experts=num_experts, apply_weights=apply_weights)


def moe_combine_triton(
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    apply_weights: bool = True,
) -> torch.Tensor:
    """Launcher of :func:`moe_combine`'s Triton kernel: validates, one program per (token, column block)."""
    _check_combine_inputs(y, topk_ids, topk_weights, num_experts)
    t, k, h = y.shape
    out = torch.empty((t, h), dtype=y.dtype, device=y.device)
    if t == 0 or h == 0:
        return out
    y2 = y.reshape(t * k, h)
    if y2.stride(1) != 1:
        y2 = y2.contiguous()
    block_h = min(next_power_of_2(h), 256)
    launchable(_moe_combine_kernel, y.device)[(t, triton.cdiv(h, block_h))](
        y2,
        topk_ids.contiguous().reshape(-1),
        topk_weights.contiguous().reshape(-1),
        out,
        k,
        h,
        num_experts,
        y2.stride(0),
        out.stride(0),
        APPLY_WEIGHTS=apply_weights,
        BLOCK_K=next_power_of_2(k),
        BLOCK_H=block_h,
    )
    return out
