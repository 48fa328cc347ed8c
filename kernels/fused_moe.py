"""Fused grouped expert FFN (SwiGLU) for the tokens routed to local experts.

    Router -> Dispatch -> [ Experts ] -> Combine
                             this module: align -> gate/up GEMM + SiLU*up
                                          -> down GEMM (x routing weight) -> combine

Shape legend: T tokens, K experts per token, E local experts, H hidden size,
I expert intermediate size, N = T*K pairs, P_max padded pair slots
(see :mod:`moeshard.kernels.moe_align`).

Weights follow the fused in-memory layout of transformers' MoE blocks:
  w_gate_up [E, 2I, H]: rows 0..I-1 gate, rows I..2I-1 up (gate = x @ w[e, :I].T)
  w_down    [E, H, I]:  out = act @ w_down[e].T

    y[t] = sum_k  c[t, k] * W_down[e] (SiLU(W_gate[e] x[t]) * W_up[e] x[t]),  e = topk_ids[t, k]

with c = topk_weights (or 1 when ``apply_weights=False``); pairs whose id is
-1 (or outside [0, E)) are computed elsewhere and contribute zero.

Triton path (CUDA, or CPU through the interpreter when
``MOESHARD_FORCE_TRITON=1``):
  1. align pairs by expert, segments padded to BLOCK_M (sync-free);
  2. ``_expert_gate_up_kernel``: each program takes BLOCK_M slots of one
     expert, gathers their token rows of x, runs the gate and up GEMMs in the
     same K loop (two accumulators) and writes SiLU(gate)*up to act [P_max, I];
  3. ``_expert_down_kernel``: act @ w_down[e].T, times the routing weight,
     scattered to the pair's row of y [N, H] (split-K: fp32 atomic adds);
  4. ``moe_combine``: sum of each token's K rows -> [T, H].
Tile sizes come from the token-count bucket (:mod:`moeshard.kernels.launch_config`).

Torch twin (CPU): stable sort of pairs by expert, the gate/up and down GEMMs
on contiguous expert segments (``torch._grouped_mm`` or a per-expert loop),
weighted ``index_add_`` into a float32 output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# First: picks Triton's interpreter on machines without CUDA, before triton loads.
from moeshard.kernels.triton_launch import launchable, triton_requested

import triton
import triton.language as tl

from moeshard.kernels.launch_config import LaunchConfig, select_launch_config
from moeshard.kernels.moe_align import AlignedRouting, moe_align_block_size_triton
from moeshard.kernels.moe_combine import moe_combine_triton

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _grouped_tile(pid, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid``: GROUP_M row blocks side by side share weight tiles in L2."""
    group = pid // (GROUP_M * num_blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_blocks_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _expert_gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, 2I, H]
    act_ptr,  # [P_max, I] out: SiLU(gate) * up per slot
    sorted_ptr,  # [P_max] int32 pair index per slot, sentinel = num_pairs
    block_expert_ptr,  # [B_max] int32 expert per block of BLOCK_M slots
    num_padded_ptr,  # [1] int32 slots in use
    num_pairs,
    top_k,
    hidden,
    inter,
    num_blocks_m,
    stride_xt,
    stride_we,
    stride_wn,
    stride_am,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1. Tile coordinates, GROUP_M slot-blocks side by side so that weight
    #    tiles are reused from L2.
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_blocks_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    # 2. Blocks past the padded length have nothing to do.
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs  # padding slots hold the sentinel: never read through it
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
    wg_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + inter * stride_wn
    # 3. Gate and up GEMMs in one K loop: x tile loaded once for both.
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = offs_k < hidden - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_gate = tl.dot(a, bg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, bu, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    # 4. SwiGLU in float32, one rounding on store.
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _expert_down_kernel(
    act_ptr,  # [P_max, I]
    w_ptr,  # [E, H, I]
    y_ptr,  # [N, H] out, one row per pair (fp32 and zeroed when SPLIT_K > 1)
    weights_ptr,  # [N] routing weight per pair
    sorted_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    hidden,
    inter,
    num_blocks_m,
    stride_am,
    stride_we,
    stride_wn,
    stride_ym,
    MUL_WEIGHT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_blocks_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # This program's share of the I reduction: K blocks pid_k, pid_k+SPLIT_K, ...
    for kb in range(pid_k, tl.cdiv(inter, BLOCK_K), SPLIT_K):
        k_ok = offs_k < inter - kb * BLOCK_K
        a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + (kb * BLOCK_K + offs_k[None, :])
        b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + (kb * BLOCK_K + offs_k[:, None])
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


# --------------------------------------------------------------------------- launchers


def check_expert_ffn_inputs(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices; return (T, K, E, H, I)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    t, h = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(f"topk_ids must be [T, K] with T={t}, got shape {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H] with H={h}, got shape {tuple(w_gate_up.shape)}")
    e, two_i, _ = w_gate_up.shape
    i = two_i // 2
    if w_down.shape != (e, h, i):
        raise ValueError(f"w_down must be [E, H, I] = [{e}, {h}, {i}], got shape {tuple(w_down.shape)}")
    if e < 1:
        raise ValueError(f"w_gate_up must hold at least one expert, got shape {tuple(w_gate_up.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(
            f"weights must have x's dtype {x.dtype}, got w_gate_up {w_gate_up.dtype}, w_down {w_down.dtype}"
        )
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    devices = {x.device, topk_ids.device, topk_weights.device, w_gate_up.device, w_down.device}
    if len(devices) != 1:
        raise ValueError(
            f"all inputs must be on one device, got x {x.device}, topk_ids {topk_ids.device}, "
            f"topk_weights {topk_weights.device}, w_gate_up {w_gate_up.device}, w_down {w_down.device}"
        )
    return t, k, e, h, i


def device_name(device: torch.device) -> str:
    """Name used to key tuned tables: the CUDA device name, else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def expert_ffn_launch_config(
    num_pairs: int, num_experts: int, intermediate: int, device: torch.device | str
) -> tuple[str, LaunchConfig]:
    """(bucket, config) that :func:`fused_expert_ffn_triton` uses for ``num_pairs`` live pairs."""
    return select_launch_config(num_pairs, num_experts, intermediate, device_name(torch.device(device)))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision products (tl.dot's default rounds them to
    # TF32 on GPUs, ~1e-3 relative error, and float32 callers asked for more).
    return "ieee" if dtype == torch.float32 else "tf32"


def _gate_up(x, w_gate_up, routing: AlignedRouting, top_k: int, inter: int, config: LaunchConfig) -> torch.Tensor:
    p_max = routing.sorted_pair_ids.numel()
    act = torch.empty((p_max, inter), dtype=x.dtype, device=x.device)
    num_blocks_m = routing.block_expert_ids.numel()
    grid = (num_blocks_m * triton.cdiv(inter, config.block_n),)
    launchable(_expert_gate_up_kernel, x.device)[grid](
        x,
        w_gate_up,
        act,
        routing.sorted_pair_ids,
        routing.block_expert_ids,
        routing.num_padded,
        routing.num_pairs,
        top_k,
        x.shape[1],
        inter,
        num_blocks_m,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        act.stride(0),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return act


def _down(act, w_down, weights, routing: AlignedRouting, apply_weights: bool, config: LaunchConfig) -> torch.Tensor:
    hidden, inter = w_down.shape[1], w_down.shape[2]
    if config.split_k > 1:
        y = torch.zeros((routing.num_pairs, hidden), dtype=torch.float32, device=act.device)
    else:
        y = torch.empty((routing.num_pairs, hidden), dtype=act.dtype, device=act.device)
    num_blocks_m = routing.block_expert_ids.numel()
    grid = (num_blocks_m * triton.cdiv(hidden, config.block_n), config.split_k)
    launchable(_expert_down_kernel, act.device)[grid](
        act,
        w_down,
        y,
        weights,
        routing.sorted_pair_ids,
        routing.block_expert_ids,
        routing.num_padded,
        routing.num_pairs,
        hidden,
        inter,
        num_blocks_m,
        act.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        y.stride(0),
        MUL_WEIGHT=apply_weights,
        SPLIT_K=config.split_k,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        DOT_PRECISION=_dot_precision(act.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def fused_expert_ffn_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    apply_weights: bool = True,
    config: LaunchConfig | None = None,
    num_live_pairs: int | None = None,
) -> torch.Tensor:
    """Launcher of the Triton path of :func:`fused_expert_ffn` (same arguments)."""
    t, k, e, h, i = check_expert_ffn_inputs(x, topk_ids, topk_weights, w_gate_up, w_down)
    if num_live_pairs is not None and not 0 <= num_live_pairs <= t * k:
        raise ValueError(f"num_live_pairs must be in [0, T*K = {t * k}], got {num_live_pairs}")
    if t == 0 or h == 0 or i == 0:
        return torch.zeros((t, h), dtype=x.dtype, device=x.device)
    if config is None:
        _, config = expert_ffn_launch_config(t * k if num_live_pairs is None else num_live_pairs, e, i, x.device)
    # Kernels index with unit inner strides.
    x, w_gate_up, w_down = (a if a.stride(-1) == 1 else a.contiguous() for a in (x, w_gate_up, w_down))
    routing = moe_align_block_size_triton(topk_ids, e, config.block_m)
    act = _gate_up(x, w_gate_up, routing, k, i, config)
    y = _down(act, w_down, topk_weights.contiguous().reshape(-1), routing, apply_weights, config)
    # Routing weights were applied in the down GEMM: combine sums with unit weights.
    out = moe_combine_triton(y.view(t, k, h), topk_ids, topk_weights, num_experts=e, apply_weights=False)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- torch twin


TWIN_GEMMS = ("auto", "grouped_mm", "loop")


def grouped_mm_supported(x: torch.Tensor, hidden: int, inter: int) -> bool:
    """Whether ``torch._grouped_mm`` can run the twin's GEMMs for x's device and dtype.

    CPU: any float dtype. CUDA: bf16 on sm90+ with 16-byte aligned rows (H, I
    multiples of 8), the constraints of its CUTLASS kernels.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and hidden % 8 == 0
        and inter % 8 == 0
    )


# Rows of work per twin step on CPU, so that one run's gate/up and down outputs
# stay cache-sized. Measured on the shared 2-core box, bf16, one thread, 2,048
# tokens per expert (bench/README.md "Expert FFN kernels", with and without
# --twin-run-elements 1000000000): speed vs an eager per-expert loop
# 0.69-0.83x with all rows in one step, 1.04-1.10x in runs of this size. The
# budget counts elements of a row's H + 2I outputs (2,048 rows at Qwen3's H/8
# widths), so full-width layers get proportionally fewer rows.
TWIN_RUN_ELEMENTS = 2048 * (512 + 2 * 192)


def expert_runs(counts: list[int], max_rows: int) -> list[tuple[int, int, int, int]]:
    """Split experts into runs (e0, e1, r0, r1) of consecutive non-empty-ended experts.

    counts[e] rows of expert e are contiguous in expert order. A run covers
    experts [e0, e1) and rows [r0, r1), holds at most ``max_rows`` rows unless
    one expert alone has more, and starts and ends on a non-empty expert
    (so a single-expert run is a plain matmul). Empty experts inside a run are
    zero-size groups.
    """
    runs = []
    row = 0
    e0 = None
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        if e0 is not None and row + count - r0 > max_rows:
            runs.append((e0, last + 1, r0, row))
            e0 = None
        if e0 is None:
            e0, r0 = expert, row
        last = expert
        row += count
    if e0 is not None:
        runs.append((e0, last + 1, r0, row))
    return runs


def _run_ffn(x_rows, counts, w_gate_up, w_down, inter, grouped: bool):
    """SwiGLU FFN of rows sorted by expert over a run of experts -> [rows, H] in x's dtype."""
    if not grouped or w_gate_up.shape[0] == 1:
        return _run_ffn_loop(x_rows, counts, w_gate_up, w_down, inter)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x_rows, w_gate_up.transpose(1, 2), offs=offs)
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    return torch._grouped_mm(act, w_down.transpose(1, 2), offs=offs)


def _run_ffn_loop(x_rows, counts, w_gate_up, w_down, inter):
    if w_gate_up.shape[0] == 1:
        gate_up = x_rows @ w_gate_up[0].T
        return (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down[0].T
    out = torch.empty((x_rows.shape[0], w_down.shape[1]), dtype=x_rows.dtype, device=x_rows.device)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            out[start : start + count] = _run_ffn_loop(
                x_rows[start : start + count], None, w_gate_up[expert : expert + 1], w_down[expert : expert + 1], inter
            )
            start += count
    return out


def fused_expert_ffn_torch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    apply_weights: bool = True,
    gemms: str = "auto",
) -> torch.Tensor:
    """Torch twin of :func:`fused_expert_ffn`: expert GEMMs on sorted segments.

    Same contract and shapes as :func:`fused_expert_ffn`. The GEMMs run in x's
    dtype (the backends accumulate in float32); the K expert outputs of a token
    are summed in float32. ``gemms`` picks how a run of experts is computed:
    "grouped_mm" (``torch._grouped_mm`` over runs of consecutive experts of
    about :data:`TWIN_RUN_ELEMENTS`), "loop" (two matmuls per non-empty expert)
    or "auto": grouped_mm where :func:`grouped_mm_supported`, else loop. Both
    give bit-identical results on CPU; bench/bench_expert_ffn.py times them
    against an eager per-expert loop.
    """
    if gemms not in TWIN_GEMMS:
        raise ValueError(f"gemms must be one of {TWIN_GEMMS}, got {gemms!r}")
    t, k, e, h, i = check_expert_ffn_inputs(x, topk_ids, topk_weights, w_gate_up, w_down)
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    if t == 0 or h == 0 or i == 0:
        return out.to(x.dtype)
    # 1. Stable sort of live pairs by expert; pairs per expert (one host sync).
    flat = topk_ids.reshape(-1).to(torch.int64)
    live = ((flat >= 0) & (flat < e)).nonzero().squeeze(1)
    order = live[torch.sort(flat[live], stable=True).indices]
    counts = torch.bincount(flat[order], minlength=e)
    tokens = order // k
    coef = topk_weights.reshape(-1)[order].float() if apply_weights else None
    grouped = gemms == "grouped_mm" or (gemms == "auto" and grouped_mm_supported(x, h, i))
    if not grouped:
        max_rows = 1  # one expert per run
    elif x.device.type == "cpu":
        max_rows = max(1, TWIN_RUN_ELEMENTS // (h + 2 * i))
    else:
        max_rows = order.numel()  # on a GPU one grouped GEMM pair over all experts
    for e0, e1, r0, r1 in expert_runs(counts.tolist(), max_rows):
        # 2. Gather the run's rows; gate/up GEMM, SwiGLU, down GEMM.
        rows = slice(r0, r1)
        y = _run_ffn(x[tokens[rows]], counts[e0:e1], w_gate_up[e0:e1], w_down[e0:e1], i, grouped).float()
        # 3. Routing weight, then combine: add each pair's output to its token's row.
        if coef is not None:
            y = y * coef[rows, None]
        out.index_add_(0, tokens[rows], y)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- public entry


def fused_expert_ffn(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    apply_weights: bool = True,
    config: LaunchConfig | None = None,
    num_live_pairs: int | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU expert FFN over routed pairs, summed per token.

    x [T, H] float16/bfloat16/float32; topk_ids [T, K] int64 (or int32), each
    in [0, E) for a local expert or -1 for a pair computed elsewhere (masked,
    contributes zero); topk_weights [T, K] float; w_gate_up [E, 2I, H];
    w_down [E, H, I]. Returns [T, H] in x's dtype (float32 accumulation):

        out[t] = sum_k (topk_weights[t, k] if apply_weights else 1) * FFN_{topk_ids[t, k]}(x[t])

    Runs the Triton kernels when ``x.is_cuda`` or ``MOESHARD_FORCE_TRITON=1``
    (interpreter on CPU), else :func:`fused_expert_ffn_torch`.
    Triton launch knobs (ignored by the twin): ``num_live_pairs``, the number
    of pairs with a local expert when the caller knows it on the host (e.g.
    from all-to-all split sizes), picks the token-count bucket (default T*K;
    see :mod:`moeshard.kernels.launch_config`); ``config`` overrides the
    bucket's launch config outright.
    """
    if triton_requested(x):
        return fused_expert_ffn_triton(
            x,
            topk_ids,
            topk_weights,
            w_gate_up,
            w_down,
            apply_weights=apply_weights,
            config=config,
            num_live_pairs=num_live_pairs,
        )
    return fused_expert_ffn_torch(x, topk_ids, topk_weights, w_gate_up, w_down, apply_weights=apply_weights)
