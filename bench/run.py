"""Run every benchmark under bench/ (bench_*.py) and collect their JSON in bench/results/.

    .venv/bin/python bench/run.py [--quick] [NAME ...]

Each benchmark runs as its own process with ``--out bench/results/<name>.json``
(and ``--quick`` when given); a failing benchmark is reported and the others go on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (e.g. planner balancer); default: all")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.names]
        if not scripts:
            parser.error(f"no benchmark named {args.names}; have: {[s.stem.removeprefix('bench_') for s in sorted(HERE.glob('bench_*.py'))]}")
    failed = []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        out = HERE / "results" / f"{name}.json"
        command = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command)
        print(f"== {name}: exit {result.returncode} after {time.perf_counter() - start:.1f} s", flush=True)
        if result.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
