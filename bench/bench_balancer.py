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

from moeshard.operator.acceptance import decide_placement  # noqa: E402
from moeshard.operator.balancer import rebalance_placement  # noqa: E402
from moeshard.core.placement import Placement, layer_imbalance  # noqa: E402

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


# --------------------------------------------------------------------------- scenarios (issue 12)


@dataclass(frozen=True)
class Scenario:
    """One traffic pattern, 24 windows: counts [W, L, E] and the scrape coverage the balancer sees per window."""

    name: str
    num_layers: int
    num_experts: int
    num_gpus: int
    redundant: int
    tokens: int = 2_000_000
    top_k: int = 8

    @property
    def slots_per_gpu(self) -> int:
        return (self.num_experts + self.redundant) // self.num_gpus


SCENARIOS = [
    Scenario("diurnal drift", 32, 128, 16, 16),
    Scenario("topic shift", 32, 128, 16, 16),
    Scenario("one hot layer", 48, 128, 16, 16),
    Scenario("nearly uniform", 32, 128, 16, 16),
    Scenario("few tokens", 32, 128, 16, 16, tokens=4_000),
    Scenario("lost counts", 32, 128, 16, 16),
    Scenario("256 x 60 x 64", 60, 256, 64, 64),
    Scenario("128 on 24 GPUs", 32, 128, 24, 16),
]


def scenario_counts(sc: Scenario, windows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(observed counts [W, L, E], true counts [W, L, E], coverage [W]) of one scenario."""
    rng = np.random.default_rng(seed)
    num_layers, num_experts = sc.num_layers, sc.num_experts
    cap = 1.0 / sc.top_k
    low, high = (0.02, 0.08) if sc.name == "nearly uniform" else (0.3, 0.8)
    exponents = rng.uniform(low, high, num_layers)
    if sc.name == "one hot layer":
        exponents[:] = rng.uniform(0.05, 0.15, num_layers)
    p = cap_shares(zipf_shares(rng, exponents, num_experts), cap)
    hot_row = zipf_shares(rng, np.array([1.2]), num_experts)[0]
    hot_row = hot_row / hot_row.sum()
    observed, true, coverage = [], [], []
    for t in range(windows):
        if t > 0:
            sigma = 0.05 if sc.name in ("diurnal drift", "nearly uniform") else 0.1
            p = p * rng.lognormal(0.0, sigma, p.shape)
            shift_prob = 0.5 if sc.name == "topic shift" else 0.1
            if rng.random() < shift_prob and sc.name not in ("nearly uniform", "one hot layer"):
                frac = rng.uniform(0.2, 0.5) if sc.name == "topic shift" else rng.uniform(0.1, 0.3)
                q = zipf_shares(rng, exponents, num_experts)
                p = (1 - frac) * p / p.sum(axis=1, keepdims=True) + frac * q / q.sum(axis=1, keepdims=True)
            if sc.name == "one hot layer" and t >= 2:
                # Layer 7 turns hot over four windows (a new workload routed through it) and stays hot.
                ramp = min(1.0, (t - 1) / 4)
                p[7] = (1 - ramp) * p[7] / p[7].sum() + ramp * hot_row
            p = cap_shares(p, cap)
        tokens = sc.tokens
        if sc.name == "diurnal drift":
            tokens = int(sc.tokens * (0.55 + 0.45 * np.sin(2 * np.pi * t / 24)))
        pairs = tokens * sc.top_k
        counts = np.stack([rng.multinomial(pairs, row) for row in p]).astype(float)
        seen, cov = counts, 1.0
        if sc.name == "lost counts" and rng.random() < 0.3:
            # Half of the replica groups were not scraped; they served a different tenant mix.
            other = cap_shares(zipf_shares(rng, exponents, num_experts), cap)
            seen = np.stack([rng.multinomial(pairs // 2, row) for row in other]).astype(float)
            cov = 0.5
        observed.append(seen)
        true.append(counts)
        coverage.append(cov)
    return np.stack(observed), np.stack(true), np.array(coverage)


def run_scenario(sc: Scenario, windows: int, seed: int = 0) -> dict:
    """Plan from window t (what the balancer saw), score on the true window t+1; MoEShard's decision vs EPLB."""
    g, s = sc.num_gpus, sc.slots_per_gpu
    nodes = max(1, g // GPUS_PER_DOMAIN)
    hier_ok = (sc.num_experts % EPLB_GROUPS == 0 and EPLB_GROUPS % nodes == 0 and g % nodes == 0
               and (g * s) % g == 0)
    seen, true, coverage = scenario_counts(sc, windows, seed)
    planners = ["moeshard", "eplb_global", "eplb_hier"]
    stats = {k: {"mean": [], "worst": [], "copies": [], "ms": []} for k in planners}
    live: dict[str, Placement | None] = {k: None for k in planners}
    for t in range(windows - 1):
        for k in (planners if t % 2 == 0 else planners[::-1]):
            t0 = time.perf_counter()
            if k == "moeshard":
                if live[k] is None:
                    plan = rebalance_placement(seen[t], g, s, GPUS_PER_DOMAIN).placement
                else:
                    decision = decide_placement(live[k], seen[t], GPUS_PER_DOMAIN, coverage=float(coverage[t]))
                    plan = decision.placement or live[k]
            elif k == "eplb_global" or not hier_ok:
                plan = eplb_placement(seen[t], g, s)  # hierarchical needs groups and slots to divide over nodes
            else:
                plan = eplb_placement(seen[t], g, s, num_groups=EPLB_GROUPS, num_nodes=nodes)
            elapsed = time.perf_counter() - t0
            if t > 0:  # window 0: every planner starts from scratch
                ratio = layer_imbalance(plan, true[t + 1])
                stats[k]["mean"].append(float(ratio.mean()))
                stats[k]["worst"].append(float(ratio.max()))
                stats[k]["copies"].append(float(gpu_moves(live[k], plan).sum()))
                stats[k]["ms"].append(1000 * elapsed)
            live[k] = plan
    out = {"scenario": asdict(sc) | {"slots_per_gpu": s}, "windows": windows, "seed": seed}
    for k in planners:
        out[k] = {"next_window_max_mean": float(np.mean(stats[k]["mean"])),
                  "worst_layer_max_mean": float(np.mean(stats[k]["worst"])),
                  "copies_per_window": float(np.mean(stats[k]["copies"])),
                  "plan_ms_median": float(np.median(stats[k]["ms"]))}
    best = min(("eplb_global", "eplb_hier"), key=lambda k: out[k]["next_window_max_mean"])
    ms, ep = out["moeshard"], out[best]
    fewest = min(out["eplb_global"]["copies_per_window"], out["eplb_hier"]["copies_per_window"])
    out["verdict"] = {
        "best_eplb": best,
        "mean_ok": ms["next_window_max_mean"] <= ep["next_window_max_mean"] * 1.005,
        "worst_ok": ms["worst_layer_max_mean"] <= ep["worst_layer_max_mean"] * 1.02,
        "copies_ok": ms["copies_per_window"] <= fewest / 3,
        "copies_ratio": ms["copies_per_window"] / max(fewest, 1e-9),
    }
    return out


def time_large(layers: int, experts: int, gpus: int, redundant: int, repeats: int) -> dict:
    """Wall time of one decision for the large shape (MoEShard's full cycle, incremental) against EPLB, alternating."""
    counts, _ = window_counts(Workload(layers, experts, 8, 3, 2_000_000), seed=123)
    s = (experts + redundant) // gpus
    live = rebalance_placement(counts[0], gpus, s, GPUS_PER_DOMAIN).placement
    times = {"moeshard_decision": [], "moeshard_incremental": [], "eplb_global": []}
    cpu = {k: [] for k in times}
    for _ in range(repeats):
        for k in times:
            t0, c0 = time.perf_counter(), time.process_time()
            if k == "moeshard_decision":
                decide_placement(live, counts[1], GPUS_PER_DOMAIN)
            elif k == "moeshard_incremental":
                rebalance_placement(counts[1], gpus, s, GPUS_PER_DOMAIN, live)
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
    parser.add_argument("--windows", type=int, default=24, help="windows per scenario (plans scored on windows 2..)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small shapes, 6 windows (a smoke run for tests)")
    parser.add_argument("--only", default=None, help="run only scenarios whose name contains this")
    parser.add_argument("--no-timing", action="store_true", help="skip the 94-layer timing")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "balancer.json")
    args = parser.parse_args(argv)
    scenarios = [sc for sc in SCENARIOS if args.only is None or args.only in sc.name]
    if args.quick:
        args.windows = 6
        scenarios = [Scenario(sc.name, 8, 64, 8, 8, tokens=min(sc.tokens, 200_000)) for sc in scenarios[:3]]
    results = []
    print(f"{'scenario':16s} {'MoEShard mean/worst':>20s} {'EPLB g mean/worst':>18s} {'EPLB h mean/worst':>18s} "
          f"{'copies ours/g/h':>18s} {'ms ours/g':>12s}  ok(mean,worst,copies)")
    for sc in scenarios:
        res = run_scenario(sc, args.windows, args.seed)
        results.append(res)
        m, g_, h = res["moeshard"], res["eplb_global"], res["eplb_hier"]
        v = res["verdict"]
        print(f"{sc.name:16s} {m['next_window_max_mean']:9.4f}/{m['worst_layer_max_mean']:.4f} "
              f"{g_['next_window_max_mean']:9.4f}/{g_['worst_layer_max_mean']:.4f} "
              f"{h['next_window_max_mean']:9.4f}/{h['worst_layer_max_mean']:.4f} "
              f"{m['copies_per_window']:6.0f}/{g_['copies_per_window']:.0f}/{h['copies_per_window']:.0f} "
              f"{m['plan_ms_median']:6.0f}/{g_['plan_ms_median']:.0f}  "
              f"{v['mean_ok']},{v['worst_ok']},{v['copies_ok']}", flush=True)
    timing = None if args.no_timing else time_large(94, 128, 32, 32, repeats=1 if args.quick else 5)
    if timing is not None:
        print(f"timing 94x128x32 (R=32) median wall ms: {timing['median_ms']} cpu ms: {timing['median_cpu_ms']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
                        "processor": platform.processor()},
        "results": results,
        "timing": timing,
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
