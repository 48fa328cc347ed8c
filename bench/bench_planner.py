"""Planner speed: a full plan (every (TP, EP) candidate) per preset and profile.

Target (issue 2): under 10 ms for the biggest preset. Baseline in the same run:
evaluating only the chosen candidate (the plan with EP and TP fixed), so the
ratio shows what the enumeration costs.

    .venv/bin/python bench/bench_planner.py [--quick] [--out FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import alternate, standard_parser, write_result  # noqa: E402

from moeshard.core.architectures import PRESETS  # noqa: E402
from moeshard.core.hardware import PROFILES  # noqa: E402
from moeshard.operator.planner import plan_parallelism  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = standard_parser(__doc__.splitlines()[0]).parse_args(argv)
    repeats = 5 if args.quick else 31
    rows = []
    profiles = ["gb200-nvl72", "h100-hgx"] if args.quick else [p for p in PROFILES if p != "cpu"]
    for preset, model in PRESETS.items():
        for profile in profiles:
            hw = PROFILES[profile]
            full = lambda: plan_parallelism(model, hw, allow_cross_domain=True)  # noqa: E731
            chosen = full().chosen
            single = lambda: plan_parallelism(  # noqa: E731
                model, hw, expert_ep=chosen.expert_ep, attention_tp=chosen.attention_tp, allow_cross_domain=True
            )
            timing = alternate(full, single, repeats=repeats)
            rows.append({
                "preset": preset, "hardware": profile, "candidates": len(full().candidates),
                "plan_ms": timing["subject_median_s"] * 1e3,
                "single_candidate_ms": timing["baseline_median_s"] * 1e3,
                "enumeration_cost_ratio": timing["subject_median_s"] / timing["baseline_median_s"],
            })
    worst = max(rows, key=lambda r: r["plan_ms"])
    summary = {"worst_plan_ms": worst["plan_ms"], "worst_case": f"{worst['preset']} on {worst['hardware']}",
               "target_ms": 10.0}
    path = write_result("planner", {"rows": rows, "summary": summary}, args.out)
    print(f"{'preset':18} {'hardware':12} {'cands':>5} {'plan ms':>8} {'1-cand ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['preset']:18} {r['hardware']:12} {r['candidates']:5d} {r['plan_ms']:8.3f} "
              f"{r['single_candidate_ms']:9.3f} {r['enumeration_cost_ratio']:6.1f}")
    print(f"slowest full plan: {summary['worst_plan_ms']:.3f} ms ({summary['worst_case']}); target < 10 ms")
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
