"""The balancer of an earlier git revision against today's: identical plans, and the time of each.

    .venv/bin/python bench/compare_balancer_revision.py --against ce26036

Loads ``operator/balancer.py`` as it was at ``--against`` (``git show``) beside
the current module and, on seeded loads:

1. checks that both give the same placement (``phy2log`` and shares, exactly)
   from scratch and incrementally, with and without a move cap, on small shapes
   (2-8 experts, where two replicas of one expert on one GPU are forced) and on
   larger ones (up to 128 experts x 32 GPUs);
2. times the incremental plan and one whole decision (``decide_placement``)
   for 94 layers x 128 experts x 32 GPUs, old and new alternating in this
   process, and prints the medians and their ratio.

Made to show that a speed-up of the balancer changed no decision; it is not
one of the benchmarks ``bench/run.py`` runs (it needs the git history).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_balancer import GPUS_PER_DOMAIN, Workload, window_counts  # noqa: E402

import moeshard.operator.acceptance as acceptance  # noqa: E402
from moeshard.operator import balancer as current  # noqa: E402


def load_revision(rev: str):
    """``operator/balancer.py`` at ``rev`` as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:operator/balancer.py"], cwd=HERE.parent, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "balancer_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("balancer_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _same(a, b) -> bool:
    return bool(np.array_equal(a.phy2log, b.phy2log) and np.array_equal(a.weights, b.weights))


def compare_plans(old, seed: int) -> dict:
    """Plans of both modules on seeded shapes; raises AssertionError naming the first that differs."""
    rng = np.random.default_rng(seed)
    plans = 0
    forced_duplicates = 0
    shapes = []
    for _ in range(300):  # small: replicas forced onto one GPU often
        e, g = int(rng.integers(2, 9)), int(rng.integers(1, 5))
        shapes.append((e, g, -(-e // g) + int(rng.integers(0, 6)), int(rng.integers(1, 5)), None, 1.5, 50))
    for _ in range(60):  # larger, with NVLink domains
        e, g = int(rng.choice([8, 16, 64, 128])), int(rng.choice([2, 4, 8, 16, 32]))
        shapes.append((e, g, -(-e // g) + int(rng.integers(0, 3)), int(rng.integers(1, 12)),
                       int(rng.choice([g, max(1, g // 2), max(1, g // 4)])), 1.3 + rng.random(), 1000))
    for i, (e, g, s, layers, domain, zipf, scale) in enumerate(shapes):
        loads = rng.zipf(zipf, size=(layers, e)).astype(float) * rng.integers(1, scale)
        if i % 5 == 0:
            loads[:, : max(1, e // 3)] = 0  # idle experts
        base_old = old.rebalance_placement(loads, g, s, domain).placement
        base_new = current.rebalance_placement(loads, g, s, domain).placement
        assert _same(base_old, base_new), f"shape {i}: from-scratch plans differ"
        grid = np.sort(base_new.phy2log.reshape(layers, g, s), axis=2)
        forced_duplicates += bool((grid[:, :, 1:] == grid[:, :, :-1]).any())
        drifted = loads * rng.gamma(2.0, 0.5, size=loads.shape)
        for capped in (False, True):
            kw = dict(max_moves=4, sources=2, targets=3) if capped else {}
            a = old.rebalance_placement(drifted, g, s, domain, base_old, old.BalancerOptions(**kw)).placement
            b = current.rebalance_placement(drifted, g, s, domain, base_new, current.BalancerOptions(**kw)).placement
            assert _same(a, b), f"shape {i}: incremental plans differ (capped={capped})"
        plans += 3
    return {"shapes": len(shapes), "plans": plans, "shapes_with_two_replicas_on_one_gpu": forced_duplicates}


def time_both(old, repeats: int) -> dict:
    """Medians (ms) of the incremental plan and of one decision, old and new alternating."""
    counts, _ = window_counts(Workload(94, 128, 8, 3, 2_000_000), seed=123)
    live = current.rebalance_placement(counts[0], 32, 5, GPUS_PER_DOMAIN).placement
    times = {f"{what}_{who}": [] for what in ("incremental", "decision") for who in ("old", "new")}
    try:
        for _ in range(repeats):
            for who, module in (("old", old), ("new", current)):
                t0 = time.perf_counter()
                module.rebalance_placement(counts[1], 32, 5, GPUS_PER_DOMAIN, live)
                times[f"incremental_{who}"].append(time.perf_counter() - t0)
                acceptance.rebalance_placement = module.rebalance_placement
                t0 = time.perf_counter()
                decision = acceptance.decide_placement(live, counts[1], GPUS_PER_DOMAIN)
                times[f"decision_{who}"].append(time.perf_counter() - t0)
                if who == "old":
                    reference = decision.placement
                else:
                    assert _same(reference, decision.placement), "decisions differ"
    finally:
        acceptance.rebalance_placement = current.rebalance_placement
    medians = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    medians["decision_speedup"] = medians["decision_old"] / medians["decision_new"]
    medians["incremental_speedup"] = medians["incremental_old"] / medians["incremental_new"]
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="REV", help="git revision of the old balancer")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "balancer_revision.json")
    args = parser.parse_args(argv)
    old = load_revision(args.against)
    doc = {"against": args.against, "identical": compare_plans(old, args.seed),
           "median_ms_94x128x32": time_both(old, args.repeats), "repeats": args.repeats}
    print(json.dumps(doc, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
