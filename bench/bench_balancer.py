"""MoEShard's balancer against DeepSeek's EPLB (our reimplementation) on drifting expert load.

Every plan is built from one window and scored on the NEXT window (max/mean
GPU load, mean over layers). MoEShard plans incrementally from its own live
placement; EPLB recomputes from scratch each window (its design). Moves are
expert weight copies between consecutive plans, counted per GPU as the
experts a GPU must receive (slot order inside a GPU is free), which is the
count most favourable to EPLB.

    .venv/bin/python bench/bench_balancer.py                # full table, JSON in bench/results/
    .venv/bin/python bench/bench_balancer.py --quick        # one configuration, smoke run

Workload (per layer): Zipf exponent ~ U[0.3, 0.8] over experts in random
order, each expert's share capped at 1/top-K; window counts multinomial;
between windows every share drifts by a lognormal factor (sigma 0.1) and with
probability --shift-prob a shift moves 10-30% of the traffic to a new
hotness order.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eplb_baseline import eplb_placement  # noqa: E402

from moeshard.operator.balancer import BalancerOptions, max_mean, rebalance_placement  # noqa: E402
from moeshard.core.placement import Placement  # noqa: E402

GPUS_PER_DOMAIN = 8  # Hopper HGX node
EPLB_GROUPS = 8  # expert groups for hierarchical EPLB (DeepSeek-V3 uses 8)


# --------------------------------------------------------------------------- workload


def cap_shares(p: np.ndarray, cap: float) -> np.ndarray:
    """Clip every share at ``cap`` and hand the excess to the others in proportion. p [L, E] rows sum to 1."""
    p = p / p.sum(axis=1, keepdims=True)
    for _ in range(64):
        over = p > cap
        if not over.any():
            break
        excess = np.where(over, p - cap, 0.0).sum(axis=1, keepdims=True)
        free = np.where(over, 0.0, p)
        p = np.where(over, cap, p + excess * free / free.sum(axis=1, keepdims=True))
    return p


def zipf_shares(rng: np.random.Generator, exponents: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] Zipf shares with each layer's exponent, over experts in random order."""
    ranks = np.argsort(rng.random((exponents.size, num_experts)), axis=1) + 1
    return ranks.astype(float) ** -exponents[:, None]


@dataclass(frozen=True)
class Workload:
    num_layers: int
    num_experts: int
    top_k: int
    windows: int
    tokens_per_window: int
    drift_sigma: float = 0.1
    shift_prob: float = 0.25


def window_counts(w: Workload, seed: int) -> tuple[np.ndarray, list[bool]]:
    """Token counts [windows, L, E] and whether a shift happened before each window."""
    rng = np.random.default_rng(seed)
    exponents = rng.uniform(0.3, 0.8, w.num_layers)
    cap = 1.0 / w.top_k
    p = cap_shares(zipf_shares(rng, exponents, w.num_experts), cap)
    counts, shifts = [], []
    for t in range(w.windows):
        shifted = False
        if t > 0:
            p = p * rng.lognormal(0.0, w.drift_sigma, p.shape)
            if rng.random() < w.shift_prob:
                frac = rng.uniform(0.1, 0.3)
                q = zipf_shares(rng, exponents, w.num_experts)
                p = (1 - frac) * p / p.sum(axis=1, keepdims=True) + frac * q / q.sum(axis=1, keepdims=True)
                shifted = True
            p = cap_shares(p, cap)
        pairs = w.tokens_per_window * w.top_k
        counts.append(np.stack([rng.multinomial(pairs, row) for row in p]).astype(float))
        shifts.append(shifted)
    return np.stack(counts), shifts


# --------------------------------------------------------------------------- scoring


def gpu_moves(old: Placement, new: Placement) -> np.ndarray:
    """[L] expert weight copies: per GPU, the replicas in new that old did not have (multiset difference)."""
    num_layers, e = old.num_layers, old.num_experts
    rows = np.arange(num_layers)[:, None]
    gpu = np.arange(old.num_slots) // old.slots_per_gpu

    def held(p: Placement) -> np.ndarray:
        h = np.zeros((num_layers, old.num_gpus, e), dtype=np.int64)
        np.add.at(h, (np.broadcast_to(rows, p.phy2log.shape), gpu[None, :], p.phy2log), 1)
        return h

    return np.maximum(held(new) - held(old), 0).sum(axis=(1, 2))


@dataclass
class Config:
    num_experts: int
    num_gpus: int
    redundant: int
    top_k: int = 8

    @property
    def slots_per_gpu(self) -> int:
        return (self.num_experts + self.redundant) // self.num_gpus

    @property
    def valid(self) -> bool:
        return (self.num_experts + self.redundant) % self.num_gpus == 0

    @property
    def name(self) -> str:
        return f"E{self.num_experts}-top{self.top_k}-G{self.num_gpus}-R{self.redundant}"


def run_config(cfg: Config, layers: int, windows: int, tokens: int, seeds: list[int]) -> dict:
    """Plan from window t-1, score on window t, for MoEShard (shares and even), EPLB global and hierarchical."""
    g, s, e = cfg.num_gpus, cfg.slots_per_gpu, cfg.num_experts
    nodes = max(1, g // GPUS_PER_DOMAIN)
    planners = ["moeshard", "moeshard_even", "eplb_global", "eplb_hier"]
    ratio = {k: [] for k in planners}
    moves = {k: [] for k in planners}
    seconds = {k: [] for k in planners}
    in_sample = {k: [] for k in planners}
    shift_flags: list[bool] = []
    for seed in seeds:
        counts, shifts = window_counts(Workload(layers, e, cfg.top_k, windows, tokens), seed)
        live: dict[str, Placement | None] = {k: None for k in planners}
        for t in range(windows - 1):
            # Alternate who goes first so a noisy machine shows in both.
            order = planners if t % 2 == 0 else planners[::-1]
            for k in order:
                t0 = time.perf_counter()
                if k.startswith("moeshard"):
                    opts = BalancerOptions(use_shares=(k == "moeshard"))
                    plan = rebalance_placement(counts[t], g, s, GPUS_PER_DOMAIN, live[k], opts).placement
                elif k == "eplb_global":
                    plan = eplb_placement(counts[t], g, s)
                else:
                    plan = eplb_placement(counts[t], g, s, num_groups=EPLB_GROUPS, num_nodes=nodes)
                elapsed = time.perf_counter() - t0
                if t > 0:  # window 0 has no live placement: every planner starts from scratch
                    ratio[k].append(float(max_mean(plan, counts[t + 1]).mean()))
                    in_sample[k].append(float(max_mean(plan, counts[t]).mean()))
                    moves[k].append(float(gpu_moves(live[k], plan).mean()))
                    seconds[k].append(elapsed)
                live[k] = plan
            if t > 0:
                shift_flags.append(shifts[t + 1])
    out = {"config": asdict(cfg) | {"slots_per_gpu": s, "name": cfg.name}, "windows_scored": len(shift_flags)}
    for k in planners:
        r = np.array(ratio[k])
        out[k] = {
            "next_window_max_mean": float(r.mean()),
            "next_window_max_mean_median": float(np.median(r)),
            "in_sample_max_mean": float(np.mean(in_sample[k])),
            "moves_per_layer": float(np.mean(moves[k])),
            "seconds_median": float(np.median(seconds[k])),
            "per_window": r.tolist(),
        }
    best_eplb = min(("eplb_global", "eplb_hier"), key=lambda k: out[k]["next_window_max_mean"])
    ms, ep = out["moeshard"], out[best_eplb]
    wins = np.array(ratio["moeshard"]) <= np.array(ratio[best_eplb])
    diff = np.array(ratio["moeshard"]) - np.array(ratio[best_eplb])  # paired: same windows
    out["verdict"] = {
        "best_eplb": best_eplb,
        "ratio_vs_best_eplb": ms["next_window_max_mean"] / ep["next_window_max_mean"],
        "windows_at_or_below_eplb": f"{int(wins.sum())}/{wins.size}",
        "ratio_diff_mean": float(diff.mean()),
        "ratio_diff_stderr": float(diff.std(ddof=1) / np.sqrt(diff.size)),
        "moves_vs_fewest_eplb": ms["moves_per_layer"]
        / max(1e-9, min(out["eplb_global"]["moves_per_layer"], out["eplb_hier"]["moves_per_layer"])),
        "meets_balance": ms["next_window_max_mean"] <= ep["next_window_max_mean"],
        "meets_moves": ms["moves_per_layer"]
        <= min(out["eplb_global"]["moves_per_layer"], out["eplb_hier"]["moves_per_layer"]) / 3,
        "shares_vs_even": ms["next_window_max_mean"] / out["moeshard_even"]["next_window_max_mean"],
    }
    return out


def time_large(layers: int, experts: int, gpus: int, redundant: int, repeats: int) -> dict:
    """Wall time of one plan for the large shape, MoEShard (incremental and scratch) against EPLB, alternating."""
    counts, _ = window_counts(Workload(layers, experts, 8, 3, 2_000_000), seed=123)
    s = (experts + redundant) // gpus
    live = rebalance_placement(counts[0], gpus, s, GPUS_PER_DOMAIN).placement
    times = {"moeshard_incremental": [], "moeshard_scratch": [], "eplb_global": []}
    cpu = {k: [] for k in times}
    for _ in range(repeats):
        for k in times:
            t0, c0 = time.perf_counter(), time.process_time()
            if k == "moeshard_incremental":
                rebalance_placement(counts[1], gpus, s, GPUS_PER_DOMAIN, live)
            elif k == "moeshard_scratch":
                rebalance_placement(counts[1], gpus, s, GPUS_PER_DOMAIN)
            else:
                eplb_placement(counts[1], gpus, s)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {
        "shape": {"layers": layers, "experts": experts, "gpus": gpus, "redundant": redundant, "slots_per_gpu": s},
        "median_ms": {k: 1000 * float(np.median(v)) for k, v in times.items()},
        "median_cpu_ms": {k: 1000 * float(np.median(v)) for k, v in cpu.items()},
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="MoE layers per configuration")
    parser.add_argument("--windows", type=int, default=12, help="windows per seed (plans scored on windows 2..)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens per window")
    parser.add_argument("--quick", action="store_true", help="one configuration, few windows")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "balancer.json")
    args = parser.parse_args(argv)
    configs = [Config(e, g, r) for e in (128, 256) for g in (16, 32) for r in (0, 16, 32, 64)]
    configs = [c for c in configs if c.redundant != 64 or (c.num_gpus == 32 and not Config(c.num_experts, 32, 16).valid)]
    if args.quick:
        configs, args.windows, args.seeds = [Config(128, 16, 16)], 5, 1
    results, skipped = [], []
    for cfg in configs:
        if not cfg.valid:
            skipped.append({"name": cfg.name, "why": f"{cfg.num_experts + cfg.redundant} slots do not divide over {cfg.num_gpus} GPUs"})
            continue
        res = run_config(cfg, args.layers, args.windows, args.tokens, list(range(args.seeds)))
        results.append(res)
        v = res["verdict"]
        print(
            f"{cfg.name:24s} moeshard {res['moeshard']['next_window_max_mean']:.4f} "
            f"(even {res['moeshard_even']['next_window_max_mean']:.4f}) "
            f"eplb g/h {res['eplb_global']['next_window_max_mean']:.4f}/{res['eplb_hier']['next_window_max_mean']:.4f} "
            f"moves {res['moeshard']['moves_per_layer']:.1f} vs {res['eplb_global']['moves_per_layer']:.1f}/"
            f"{res['eplb_hier']['moves_per_layer']:.1f} of {cfg.num_experts + cfg.redundant} "
            f"diff {1e3 * v['ratio_diff_mean']:+.1f}e-3 +- {1e3 * v['ratio_diff_stderr']:.1f}e-3 "
            f"wins {v['windows_at_or_below_eplb']} balance_ok={v['meets_balance']} moves_ok={v['meets_moves']}",
            flush=True,
        )
    timing = time_large(94, 128, 32, 32, repeats=3 if args.quick else 7)
    print(f"timing 94x128x32 (R=32) wall ms: {timing['median_ms']} cpu ms: {timing['median_cpu_ms']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
                        "processor": platform.processor()},
        "workload": {"layers": args.layers, "windows": args.windows, "seeds": args.seeds, "tokens": args.tokens,
                     "gpus_per_domain": GPUS_PER_DOMAIN, "eplb_groups": EPLB_GROUPS},
        "results": results,
        "skipped": skipped,
        "timing": timing,
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
