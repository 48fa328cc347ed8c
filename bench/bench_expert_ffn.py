"""Benchmark: grouped expert FFN at the per-rank layer shapes of real MoE models.

Cases: Qwen3-235B-A22B (E 128, H 4096, I 1536, top-8) at EP 8 and 32,
DeepSeek-V3 (E 256, H 7168, I 2048, top-8) at EP 8 and 32, Mixtral-8x7B
(E 8, H 4096, I 14336, top-2) at EP 2, i.e. 16/4, 32/8 and 4 local experts;
tokens per local expert m in {16, 64, 187, 256, 512, 2048}; balanced and
skewed (Zipf s=1.2 over local experts) routing.

Routing as a rank sees it after dispatch: R received tokens, each with
c = max(1, round(K * E_local / E)) live local ids and -1 in its other K - c
columns, R * c = m * E_local live pairs.

Subjects, run in one process and alternated round by round, medians quoted:
  naive    - per-expert loop over the [T, K] ids (mask, gather, 2 matmuls, index_add),
             the way transformers' eager MoE blocks run;
  loop     - the twin with per-expert matmuls on sorted segments;
  grouped  - the twin on torch._grouped_mm (two grouped GEMMs);
  triton   - (CUDA only) the fused Triton kernels at the bucket's launch config.
On CUDA the run also measures the device's copy bandwidth and a large bf16
matmul, and reports each subject's TFLOP/s, GB/s and the fraction of
min(peak, intensity x bandwidth) (PERF.md "Expert GEMMs: roofline").

CPU: H and I are divided by --cpu-scale (default 8) and a case whose GEMM
work exceeds --max-gflop (24) is skipped (recorded as skipped), so the full run
fits in under 3 minutes on 2 cores; --quick keeps ~20 s.

    .venv/bin/python bench/bench_expert_ffn.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import moeshard.kernels.fused_moe as fused_moe
from moeshard.kernels.fused_moe import (
    expert_ffn_launch_config,
    fused_expert_ffn_torch,
    fused_expert_ffn_triton,
    grouped_mm_supported,
)


@dataclass(frozen=True)
class ModelShape:
    name: str
    experts: int  # E, logical experts
    hidden: int  # H
    intermediate: int  # I
    top_k: int  # K


MODELS = {
    "qwen3-235b": ModelShape("qwen3-235b", 128, 4096, 1536, 8),
    "deepseek-v3": ModelShape("deepseek-v3", 256, 7168, 2048, 8),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 8, 4096, 14336, 2),
}
# (model, EP): the layouts the issue asks for.
LAYOUTS = [("qwen3-235b", 8), ("qwen3-235b", 32), ("deepseek-v3", 8), ("deepseek-v3", 32), ("mixtral-8x7b", 2)]
TOKENS_PER_EXPERT = (16, 64, 187, 256, 512, 2048)
SKEW_EXPONENT = 1.2


# --------------------------------------------------------------------------- routing


def rank_routing(
    tokens_per_expert: int, local_experts: int, experts: int, top_k: int, skewed: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids [R, K] int64 with -1 for other ranks' experts, topk_weights [R, K] float32).

    Live pairs: R * c = m * E_local, c = max(1, round(K * E_local / E)) per token,
    c distinct local experts drawn uniformly or with Zipf(s=1.2) popularity.
    """
    g = torch.Generator().manual_seed(seed)
    live_per_token = min(local_experts, top_k, max(1, round(top_k * local_experts / experts)))
    tokens = math.ceil(tokens_per_expert * local_experts / live_per_token)
    if skewed:
        popularity = 1.0 / torch.arange(1, local_experts + 1, dtype=torch.float64) ** SKEW_EXPONENT
    else:
        popularity = torch.ones(local_experts, dtype=torch.float64)
    live = torch.multinomial(popularity.expand(tokens, -1), live_per_token, replacement=False, generator=g)
    ids = torch.full((tokens, top_k), -1, dtype=torch.int64)
    ids[:, :live_per_token] = live
    columns = torch.argsort(torch.rand((tokens, top_k), generator=g), dim=1)  # -1s anywhere in the row
    ids = torch.gather(ids, 1, columns)
    weights = torch.rand((tokens, top_k), generator=g)
    return ids, weights / weights.sum(1, keepdim=True)


# --------------------------------------------------------------------------- subjects


def naive_expert_loop(x, topk_ids, topk_weights, w_gate_up, w_down):
    """transformers-style eager MoE: for each expert, find its pairs, run it, add back."""
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(w_gate_up.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        gate_up = x[token] @ w_gate_up[expert].T
        y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down[expert].T
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def subjects_for(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> dict:
    probe = torch.empty(0, device=device, dtype=dtype)
    subjects = {
        "naive": naive_expert_loop,
        "loop": lambda *a: fused_expert_ffn_torch(*a, gemms="loop"),
    }
    if grouped_mm_supported(probe, hidden, inter):
        subjects["grouped"] = lambda *a: fused_expert_ffn_torch(*a, gemms="grouped_mm")
    if device.type == "cuda":
        subjects["triton"] = fused_expert_ffn_triton
    return subjects


def grouped_mm_note(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> str:
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm missing in this torch build"
    if grouped_mm_supported(torch.empty(0, device=device, dtype=dtype), hidden, inter):
        return "available"
    return f"not supported for {dtype} on {device} with H={hidden}, I={inter} (CUDA needs bf16, sm90+, H and I % 8 == 0)"


# --------------------------------------------------------------------------- timing


def time_alternating(fns: dict, args: tuple, device, rounds: int, min_round_s: float) -> dict[str, list[float]]:
    """Seconds per call for each subject, subjects alternated within every round (ABCABC...).

    CPU: wall clock over enough calls to fill ``min_round_s``. CUDA:
    ``triton.testing.do_bench`` per round (CUDA events, L2 flushed before
    every call, median of the round), as PERF.md asks.
    """
    if device.type == "cuda":
        import triton.testing

        samples = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                ms = triton.testing.do_bench(lambda: fn(*args), warmup=5, rep=20, return_mode="median")
                samples[name].append(ms / 1e3)
        return samples
    reps = {}
    for name, fn in fns.items():  # warm-up and calls-per-round calibration
        fn(*args)
        start = time.perf_counter()
        fn(*args)
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn(*args)
            samples[name].append((time.perf_counter() - start) / reps[name])
    return samples


def roofline(flops: float, bytes_moved: float, peak_flops: float, bandwidth: float) -> float:
    """Best possible seconds: max(flops / peak, bytes / bandwidth)."""
    return max(flops / peak_flops, bytes_moved / bandwidth)


def measure_device_ceilings(device) -> dict:
    """CUDA: device copy bandwidth (1 GiB copy) and bf16 matmul TFLOP/s (8192^3), medians of 10."""
    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    copy_s, mm_s = [], []
    for _ in range(11):
        for fn, out in ((lambda: dst.copy_(src), copy_s), (lambda: a @ b, mm_s)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
    copy_s, mm_s = copy_s[1:], mm_s[1:]
    return {
        "copy_bytes": 2 * src.numel() * 2,
        "copy_GBps": 2 * src.numel() * 2 / statistics.median(copy_s) / 1e9,
        "matmul_shape": [8192, 8192, 8192],
        "matmul_TFLOPs": 2 * 8192**3 / statistics.median(mm_s) / 1e12,
    }


# --------------------------------------------------------------------------- one case


def gemm_flops(live_pairs: int, hidden: int, inter: int) -> float:
    """6 m H I summed over experts (gate, up, down)."""
    return 6.0 * live_pairs * hidden * inter


def gemm_bytes(live_pairs: int, active_experts: int, hidden: int, inter: int, elem: int) -> float:
    """3 H I b_w per expert with tokens + m (2H + 3I) b_a per pair (PERF.md)."""
    return 3.0 * hidden * inter * elem * active_experts + live_pairs * (2 * hidden + 3 * inter) * elem


def run_case(layout, m, skewed, *, device, dtype, scale, rounds, min_round_s, max_gflop, ceilings, seed):
    model_name, ep = layout
    model = MODELS[model_name]
    local = model.experts // ep
    hidden, inter = model.hidden // scale, model.intermediate // scale
    case = {
        "model": model_name,
        "ep": ep,
        "local_experts": local,
        "hidden": hidden,
        "intermediate": inter,
        "top_k": model.top_k,
        "tokens_per_expert": m,
        "routing": "skewed" if skewed else "balanced",
    }
    ids, weights = rank_routing(m, local, model.experts, model.top_k, skewed, seed=seed)
    live = int((ids >= 0).sum())
    counts = torch.bincount(ids[ids >= 0], minlength=local)
    flops = gemm_flops(live, hidden, inter)
    case.update(
        received_tokens=ids.shape[0],
        live_pairs=live,
        max_expert_pairs=int(counts.max()),
        gflop=flops / 1e9,
    )
    if max_gflop and flops / 1e9 > max_gflop:
        case["skipped"] = f"GEMM work {flops / 1e9:.1f} GFLOP > --max-gflop {max_gflop}"
        return case
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((ids.shape[0], hidden), generator=g).to(dtype)
    w_gate_up = (torch.randn((local, 2 * inter, hidden), generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn((local, hidden, inter), generator=g) / inter**0.5).to(dtype)
    args = tuple(t.to(device) for t in (x, ids, weights.to(dtype), w_gate_up, w_down))
    fns = subjects_for(device, dtype, hidden, inter)
    if device.type == "cuda":
        bucket, config = expert_ffn_launch_config(live, local, inter, device)
        case["bucket"], case["launch_config"] = bucket, asdict(config)
        triton_fn = fns["triton"]
        fns["triton"] = lambda *a: triton_fn(*a, num_live_pairs=live)
    # Agreement check before timing: every subject against the twin.
    ref = fns["loop"](*args).float()
    case["max_abs_diff_vs_loop"] = {n: float((f(*args).float() - ref).abs().max()) for n, f in fns.items() if n != "loop"}
    samples = time_alternating(fns, args, device, rounds, min_round_s)
    med = {n: statistics.median(s) for n, s in samples.items()}
    case["median_ms"] = {n: v * 1e3 for n, v in med.items()}
    case["min_ms"] = {n: min(s) * 1e3 for n, s in samples.items()}
    case["samples_ms"] = {n: [v * 1e3 for v in s] for n, s in samples.items()}
    case["speedup_vs_naive"] = {n: med["naive"] / v for n, v in med.items() if n != "naive"}
    if "grouped" in med:
        case["speedup_vs_grouped_mm"] = {n: med["grouped"] / v for n, v in med.items() if n != "grouped"}
    active = int((counts > 0).sum())
    moved = gemm_bytes(live, active, hidden, inter, torch.finfo(dtype).bits // 8)
    case["gemm_bytes"] = moved
    case["achieved_TFLOPs"] = {n: flops / v / 1e12 for n, v in med.items()}
    case["achieved_GBps"] = {n: moved / v / 1e9 for n, v in med.items()}
    if ceilings:
        best = roofline(flops, moved, ceilings["matmul_TFLOPs"] * 1e12, ceilings["copy_GBps"] * 1e9)
        case["roofline_ms"] = best * 1e3
        case["roofline_fraction"] = {n: best / v for n, v in med.items()}
    return case


# --------------------------------------------------------------------------- main


def environment(device) -> dict:
    import triton

    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 (CPU and CUDA)")
    p.add_argument("--cpu-scale", type=int, default=8, help="CPU: divide H and I by this (default 8)")
    p.add_argument("--max-gflop", type=float, default=None,
                   help="skip cases above this GEMM work (CPU default 24, --quick 6; CUDA none)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per subject (CPU 5, quick 3, CUDA 10)")
    p.add_argument("--quick", action="store_true", help="~20 s on 2 CPU cores: fewer cases and rounds")
    p.add_argument("--layouts", default=None, help="comma list of model:ep, e.g. qwen3-235b:8")
    p.add_argument("--tokens", default=None, help="comma list of tokens per expert")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default 1: a shared 2-core machine makes 2-thread GEMMs straggle)")
    p.add_argument("--twin-run-elements", type=int, default=None,
                   help="override fused_moe.TWIN_RUN_ELEMENTS (the twin's CPU run size) to study it")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/expert_ffn_<device>_<time>.json)")
    return p.parse_args(argv)


def plan(args):
    layouts = LAYOUTS
    tokens = TOKENS_PER_EXPERT
    routings = (False, True)
    if args.quick:
        layouts, tokens = [("qwen3-235b", 8), ("mixtral-8x7b", 2)], (16, 187, 512)
    if args.layouts:
        layouts = [(name, int(ep)) for name, ep in (item.split(":") for item in args.layouts.split(","))]
        for name, _ in layouts:
            if name not in MODELS:
                raise SystemExit(f"--layouts: unknown model {name!r}; known: {sorted(MODELS)}")
    if args.tokens:
        tokens = tuple(int(v) for v in args.tokens.split(","))
    return [(layout, m, skewed) for layout in layouts for m in tokens for skewed in routings]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or "bfloat16")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads or 1)
    if args.twin_run_elements:
        fused_moe.TWIN_RUN_ELEMENTS = args.twin_run_elements
    scale = 1 if on_gpu else args.cpu_scale
    max_gflop = args.max_gflop if args.max_gflop is not None else (None if on_gpu else (6.0 if args.quick else 24.0))
    rounds = args.rounds or (10 if on_gpu else (3 if args.quick else 5))
    min_round_s = 0.02 if on_gpu else (0.01 if args.quick else 0.02)
    ceilings = measure_device_ceilings(device) if on_gpu else None
    result = {
        "benchmark": "expert_ffn",
        "command": " ".join([sys.executable, *sys.argv]),
        "environment": environment(device),
        "inputs": {
            "dtype": str(dtype).removeprefix("torch."),
            "shape_scale": scale,
            "max_gflop": max_gflop,
            "rounds": rounds,
            "twin_run_elements": fused_moe.TWIN_RUN_ELEMENTS,
            "skew_exponent": SKEW_EXPONENT,
            "models": {k: asdict(v) for k, v in MODELS.items()},
        },
        "grouped_mm": grouped_mm_note(device, dtype, 8, 8),
        "device_ceilings": ceilings,
        "cases": [],
    }
    started = time.perf_counter()
    for n, (layout, m, skewed) in enumerate(plan(args)):
        case = run_case(layout, m, skewed, device=device, dtype=dtype, scale=scale, rounds=rounds,
                        min_round_s=min_round_s, max_gflop=max_gflop, ceilings=ceilings, seed=n)
        result["cases"].append(case)
        print(format_case(case), flush=True)
    result["wall_s"] = time.perf_counter() - started
    out = Path(args.out) if args.out else default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


def default_out(device) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(__file__).resolve().parent / "results" / f"expert_ffn_{device.type}_{stamp}.json"


def format_case(case) -> str:
    head = (f"{case['model']:>12} EP{case['ep']:<2} E{case['local_experts']:<3} m={case['tokens_per_expert']:<5}"
            f" {case['routing']:<8}")
    if "skipped" in case:
        return f"{head} skipped: {case['skipped']}"
    med = "  ".join(f"{n} {v:8.3f} ms" for n, v in case["median_ms"].items())
    ratio = "  ".join(f"{n} x{v:.2f}" for n, v in case["speedup_vs_naive"].items())
    return f"{head} {med}  | vs naive: {ratio}"


if __name__ == "__main__":
    sys.exit(main())
