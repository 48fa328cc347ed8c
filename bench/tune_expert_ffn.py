"""Tune the expert FFN's launch configs per token-count bucket; write the table as JSON.

For one (local experts E, hidden H, intermediate I, top-K) shape on the
current GPU, times ``fused_expert_ffn_triton`` over a grid of LaunchConfigs
at a representative tokens-per-expert count for each bucket (small 16,
medium 128, large 1024 by default), checks the winner against the torch twin,
and writes ``E=<E>,I=<I>,device=<name>.json`` (format in
moeshard.kernels.launch_config) to --out-dir, by default the packaged
kernels/configs/. Needs a CUDA GPU: Triton's CPU interpreter is for
correctness, and its timings mean nothing.

    .venv/bin/python bench/tune_expert_ffn.py --model qwen3-235b --ep 8
    .venv/bin/python bench/tune_expert_ffn.py --experts 16 --hidden 4096 --intermediate 1536 --top-k 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_expert_ffn import MODELS, rank_routing  # noqa: E402

from moeshard.kernels.launch_config import (  # noqa: E402
    BUCKETS,
    DEFAULT_TABLE,
    PACKAGED_CONFIG_DIR,
    BucketTable,
    LaunchConfig,
    config_file_name,
    write_config_table,
)

REPRESENTATIVE_TOKENS = {"small": 16, "medium": 128, "large": 1024}
NEEDS_GPU = (
    "tune_expert_ffn.py needs a CUDA GPU: it times compiled Triton kernels, and Triton's CPU "
    "interpreter gives no meaningful timings. Run it on the GPU node that will serve the model."
)


def candidate_configs(bucket: str, quick: bool = False) -> list[LaunchConfig]:
    """The search grid for a bucket: small tiles and split-K for decode, big tiles for prefill."""
    block_m = {"small": (16, 32), "medium": (32, 64, 128), "large": (64, 128)}[bucket]
    block_n = (32, 64, 128)
    block_k = (64, 128)
    group_m = (1, 8) if bucket == "small" else (1, 8, 16)
    split_k = (1, 2, 4) if bucket == "small" else (1,)
    warps = (4, 8)
    stages = (3, 4) if quick else (2, 3, 4, 5)
    if quick:
        block_n, group_m = (64, 128), group_m[:2]
    return [
        LaunchConfig(bm, bn, bk, gm, sk, w, s)
        for bm, bn, bk, gm, sk, w, s in itertools.product(block_m, block_n, block_k, group_m, split_k, warps, stages)
    ]


def tune_bucket(bucket, m, shape, device, dtype, quick):
    """Fastest config for ``m`` tokens per expert; (config, timings) or raises if none runs."""
    import triton.testing

    from moeshard.kernels.fused_moe import fused_expert_ffn_torch, fused_expert_ffn_triton

    local, experts, hidden, inter, top_k = shape
    ids, weights = rank_routing(m, local, experts, top_k, skewed=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((ids.shape[0], hidden), generator=g).to(device, dtype)
    w_gate_up = (torch.randn((local, 2 * inter, hidden), generator=g) / hidden**0.5).to(device, dtype)
    w_down = (torch.randn((local, hidden, inter), generator=g) / inter**0.5).to(device, dtype)
    args = (x, ids.to(device), weights.to(device, dtype), w_gate_up, w_down)
    timings = []
    for config in candidate_configs(bucket, quick):
        try:
            ms = triton.testing.do_bench(lambda: fused_expert_ffn_triton(*args, config=config), warmup=5, rep=25)
        except Exception as exc:  # out of shared memory / registers for this tile: not a candidate
            timings.append({"config": asdict(config), "error": type(exc).__name__})
            continue
        timings.append({"config": asdict(config), "ms": ms})
    ok = [t for t in timings if "ms" in t]
    if not ok:
        raise RuntimeError(f"no candidate config ran for bucket {bucket}")
    best = LaunchConfig.from_dict(min(ok, key=lambda t: t["ms"])["config"])
    # The winner must agree with the twin (bf16: loose tolerance, outputs O(1)).
    diff = (fused_expert_ffn_triton(*args, config=best).float() - fused_expert_ffn_torch(*args).float()).abs().max()
    if float(diff) > 5e-2:
        raise RuntimeError(f"bucket {bucket}: best config {best} disagrees with the twin (max abs diff {float(diff)})")
    default_ms = next((t["ms"] for t in ok if t["config"] == asdict(DEFAULT_TABLE.configs[bucket])), None)
    summary = {
        "tokens_per_expert": m,
        "best_ms": min(t["ms"] for t in ok),
        "default_config_ms": default_ms,
        "median_candidate_ms": statistics.median(t["ms"] for t in ok),
        "candidates": len(timings),
        "failed": len(timings) - len(ok),
        "max_abs_diff_vs_twin": float(diff),
    }
    return best, summary, timings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), help="take E, H, I, K from a model (with --ep)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size: local experts = E / EP")
    p.add_argument("--experts", type=int, help="local experts (overrides --model/--ep)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="smaller grid (about a tenth)")
    p.add_argument("--out-dir", default=str(PACKAGED_CONFIG_DIR))
    p.add_argument("--timings-out", default=None, help="also write every candidate's time here (JSON)")
    return p.parse_args(argv)


def resolve_shape(args) -> tuple[int, int, int, int, int]:
    """(local experts, logical experts, H, I, K) from --model/--ep and explicit overrides."""
    model = MODELS.get(args.model) if args.model else None
    experts = model.experts if model else None
    local = args.experts or (model.experts // args.ep if model else None)
    hidden = args.hidden or (model.hidden if model else None)
    inter = args.intermediate or (model.intermediate if model else None)
    top_k = args.top_k or (model.top_k if model else None)
    missing = [n for n, v in (("--experts", local), ("--hidden", hidden), ("--intermediate", inter), ("--top-k", top_k)) if not v]
    if missing:
        raise SystemExit(f"give --model (and --ep) or {', '.join(missing)}")
    return local, experts or local, hidden, inter, top_k


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = resolve_shape(args)
    if not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    dtype = getattr(torch, args.dtype)
    configs, meta = {}, {"buckets": {}}
    all_timings = {}
    for bucket in BUCKETS:
        m = REPRESENTATIVE_TOKENS[bucket]
        best, summary, timings = tune_bucket(bucket, m, shape, device, dtype, args.quick)
        configs[bucket] = best
        meta["buckets"][bucket] = summary
        all_timings[bucket] = timings
        print(f"{bucket:>6} (m={m}): {best}  {summary['best_ms']:.3f} ms (default {summary['default_config_ms']})")
    table = BucketTable(
        small_max_tokens_per_expert=DEFAULT_TABLE.small_max_tokens_per_expert,
        medium_max_tokens_per_expert=DEFAULT_TABLE.medium_max_tokens_per_expert,
        configs=configs,
    )
    local, experts, hidden, inter, top_k = shape
    meta.update(
        device=name,
        dtype=args.dtype,
        shape={"local_experts": local, "experts": experts, "hidden": hidden, "intermediate": inter, "top_k": top_k},
        date_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        command=" ".join([sys.executable, *sys.argv]),
    )
    path = write_config_table(Path(args.out_dir) / config_file_name(local, inter, name), table, meta)
    print(f"wrote {path}")
    if args.timings_out:
        import json

        Path(args.timings_out).write_text(json.dumps(all_timings, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
