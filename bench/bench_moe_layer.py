"""Benchmark: the engine's MoE layer vs a naive per-expert loop, and dispatch bytes vs the alternatives.

Part 1, throughput (CPU, one process, gloo world of one rank, one thread):
scaled-down layer shapes of Qwen3-235B-A22B, DeepSeek-V3 and Mixtral-8x7B
(H and I divided by --scale, E and K kept). Subject: ``MoELayer.forward``,
the engine's full path (router, replica choice, deduplicating dispatch,
``fused_expert_ffn``, combine). Baseline: the same routing followed by a
per-expert loop over a one-hot mask with ``index_add_``, the way
transformers' eager MoE blocks compute (``Qwen3MoeExperts.forward``).
Alternated round by round in the same process; medians and ratios.

Part 2, dispatch bytes per rank per MoE layer (full-size shapes, counted, not
timed): T tokens in the group (T/N per rank), BF16 rows (s = 2H bytes),
routing from a random router, slots from the engine's replica table, rows from
the engine's ``dedup_rows``. Compared with the formulas of PERF.md:
no-dedup (one row per (token, expert) pair), dedup expectation under uniform
routing (D = N [1 - C(E - E/N, K) / C(E, K)]), allgather ((N-1) T/N s) and,
rows crossing the fabric (domains of 8 ranks) with flat and with hierarchical
dispatch.

    .venv/bin/python bench/bench_moe_layer.py [--quick] [--out PATH]
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import alternate, standard_parser, write_result  # noqa: E402

from moeshard.engine.comm import dedup_rows, make_all_to_all  # noqa: E402
from moeshard.engine.config import ParallelConfig  # noqa: E402
from moeshard.engine.moe import MoELayer, ReplicaTable, route_topk  # noqa: E402
from moeshard.engine.verify import free_port  # noqa: E402
from moeshard.core.placement import initial_placement  # noqa: E402


@dataclass(frozen=True)
class LayerShape:
    name: str
    experts: int  # E
    top_k: int  # K
    hidden: int  # H (full size)
    intermediate: int  # I (full size)
    model_type: str  # router flavour


SHAPES = (
    LayerShape("qwen3-235b-a22b", 128, 8, 4096, 1536, "qwen3_moe"),
    LayerShape("deepseek-v3", 256, 8, 7168, 2048, "qwen3_moe"),  # softmax top-k router stands in for sigmoid+groups
    LayerShape("mixtral-8x7b", 8, 2, 4096, 14336, "mixtral"),
)


def naive_moe(x: torch.Tensor, router: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              top_k: int, model_type: str) -> torch.Tensor:
    """Baseline: routing then a per-expert loop as transformers' eager MoE experts do. x [T, H] -> [T, H]."""
    weights, experts = route_topk(F.linear(x, router), top_k, model_type, True)
    out = torch.zeros_like(x)
    e = w_gate_up.shape[0]
    mask = F.one_hot(experts, num_classes=e).permute(2, 1, 0)  # [E, K, T]
    for idx in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        k_pos, tok = torch.where(mask[idx[0]])
        gate, up = F.linear(x[tok], w_gate_up[idx[0]]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[idx[0]]) * weights[tok, k_pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def throughput(shape: LayerShape, tokens: int, scale: int, repeats: int) -> dict:
    h, i = shape.hidden // scale, shape.intermediate // scale
    g = torch.Generator().manual_seed(0)
    router = torch.randn(shape.experts, h, generator=g)
    w_gu = torch.randn(shape.experts, 2 * i, h, generator=g) / h**0.5
    w_dn = torch.randn(shape.experts, h, i, generator=g) / i**0.5
    x = torch.randn(tokens, h, generator=g)
    keys = torch.arange(tokens)
    placement = initial_placement(1, shape.experts, 1, shape.experts)
    parallel = ParallelConfig(rank=0, world_size=1)
    layer = MoELayer(moe_index=0, router_weight=router, w_gate_up=w_gu, w_down=w_dn, placement=placement, rank=0,
                     comm=make_all_to_all(parallel, shape.experts), top_k=shape.top_k, model_type=shape.model_type,
                     norm_topk_prob=True)
    err = float((layer.forward(x, keys) - naive_moe(x, router, w_gu, w_dn, shape.top_k, shape.model_type)).abs().max())
    timing = alternate(lambda: layer.forward(x, keys),
                       lambda: naive_moe(x, router, w_gu, w_dn, shape.top_k, shape.model_type), repeats=repeats)
    flops = 6 * tokens * shape.top_k * h * i
    return {
        "shape": shape.name, "tokens": tokens, "hidden": h, "intermediate": i, "experts": shape.experts,
        "top_k": shape.top_k, "max_abs_diff_vs_baseline": err,
        "engine_median_s": timing["subject_median_s"], "naive_loop_median_s": timing["baseline_median_s"],
        "speedup_vs_naive_loop": timing["speedup"], "engine_gflops": flops / timing["subject_median_s"] / 1e9,
        "repeats": repeats,
    }


def expected_distinct_ranks(e: int, k: int, n: int) -> float:
    """D = N [1 - C(E - E/N, K) / C(E, K)]: distinct ranks a token reaches under uniform routing."""
    return n * (1 - math.comb(e - e // n, k) / math.comb(e, k))


def dispatch_bytes(shape: LayerShape, ep: int, tokens: int, domain: int) -> dict:
    """Counted dispatch bytes per rank (one direction) for the full-size shape at EP = ep."""
    s = 2 * shape.hidden  # BF16 row
    g = torch.Generator().manual_seed(ep)
    # Routing from a random router on random activations (near-uniform load), at a reduced hidden size:
    # only the expert choices matter here.
    logits = torch.randn(tokens, 64, generator=g) @ torch.randn(64, shape.experts, generator=g)
    _, experts = route_topk(logits, shape.top_k, shape.model_type, True)
    placement = initial_placement(1, shape.experts, ep, shape.experts // ep)
    slots = ReplicaTable(placement, 0).slots(torch.arange(tokens)[:, None].expand_as(experts), experts)
    dest = slots // placement.slots_per_gpu
    origin = torch.arange(tokens) // (tokens // ep)  # T/N tokens per rank
    remote = dest != origin[:, None]
    no_dedup_rows = int(remote.sum())
    row_token, row_rank, _ = dedup_rows(dest, ep)
    dedup_rows_remote = int((row_rank != origin[row_token]).sum())
    flat_inter_rows = int(((row_rank // domain) != (origin[row_token] // domain)).sum())
    dom = dest // domain
    dom_token, dom_id, _ = dedup_rows(dom, math.ceil(ep / domain))
    inter_rows = int((dom_id != (origin // domain)[dom_token]).sum())
    per_rank = lambda rows: rows * s / ep  # noqa: E731
    d = expected_distinct_ranks(shape.experts, shape.top_k, ep)
    return {
        "shape": shape.name, "ep": ep, "tokens_in_group": tokens, "bytes_per_row": s,
        "no_dedup_bytes_per_rank": per_rank(no_dedup_rows),
        "no_dedup_formula_bytes_per_rank": tokens / ep * shape.top_k * (ep - 1) / ep * s,
        "dedup_bytes_per_rank": per_rank(dedup_rows_remote),
        "dedup_formula_bytes_per_rank": tokens / ep * d * (ep - 1) / ep * s,
        "allgather_bytes_per_rank": (ep - 1) * tokens / ep * s,
        "flat_inter_domain_bytes_per_rank": per_rank(flat_inter_rows),
        "hierarchical_inter_domain_bytes_per_rank": per_rank(inter_rows) if ep > domain else 0.0,
        "domain_size": domain,
        "distinct_ranks_per_token_counted": len(row_token) / tokens,
        "distinct_ranks_per_token_formula": d,
        "allgather_over_dedup": ((ep - 1) * tokens / ep * s) / per_rank(dedup_rows_remote),
        "no_dedup_over_dedup": no_dedup_rows / dedup_rows_remote,
    }


def main() -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8, help="divide H and I by this for the CPU timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tokens = [128] if args.quick else [128, 512]
        repeats = 5 if args.quick else 9
        rows = []
        for shape in SHAPES:
            for t in tokens:
                row = throughput(shape, t, args.scale, repeats)
                rows.append(row)
                print(f"{row['shape']:>16} T={t:4d} H={row['hidden']} I={row['intermediate']}: engine "
                      f"{row['engine_median_s'] * 1e3:7.2f} ms, naive loop {row['naive_loop_median_s'] * 1e3:7.2f} ms, "
                      f"x{row['speedup_vs_naive_loop']:.2f}", flush=True)
        group_tokens = 4096 if args.quick else 8192
        eps = (8, 32) if args.quick else (8, 16, 32, 64)
        bytes_rows = []
        for shape in SHAPES:
            for ep in eps:
                if shape.experts % ep:
                    continue
                row = dispatch_bytes(shape, ep, group_tokens, domain=8)
                bytes_rows.append(row)
                print(f"{row['shape']:>16} EP={ep:2d}: dedup {row['dedup_bytes_per_rank'] / 1e6:7.2f} MB/rank "
                      f"(formula {row['dedup_formula_bytes_per_rank'] / 1e6:7.2f}), no-dedup "
                      f"{row['no_dedup_bytes_per_rank'] / 1e6:7.2f}, allgather {row['allgather_bytes_per_rank'] / 1e6:7.2f}, "
                      f"inter-domain flat {row['flat_inter_domain_bytes_per_rank'] / 1e6:7.2f} / hier. "
                      f"{row['hierarchical_inter_domain_bytes_per_rank'] / 1e6:7.2f}", flush=True)
    finally:
        dist.destroy_process_group()
    path = write_result("moe_layer", {
        "scale": args.scale, "quick": args.quick, "threads": 1,
        "shapes": [asdict(s) for s in SHAPES], "throughput": rows, "dispatch_bytes": bytes_rows,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
