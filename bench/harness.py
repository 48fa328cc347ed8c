"""Shared benchmark harness: alternating subject/baseline timing, environment capture, JSON output.

Every benchmark under bench/ runs its baseline in the same process, alternating
with the subject so that a noisy machine shows in both, and reports medians and
ratios. Nothing here passes or fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
    return info


def alternate(
    subject: Callable[[], Any], baseline: Callable[[], Any], *, repeats: int = 21, warmup: int = 2
) -> dict[str, Any]:
    """Time subject and baseline alternately; medians in seconds and baseline/subject ratio."""
    for _ in range(warmup):
        subject()
        baseline()
    s_times, b_times = [], []
    for i in range(repeats):
        order = (subject, baseline) if i % 2 == 0 else (baseline, subject)
        for fn in order:
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            (s_times if fn is subject else b_times).append(elapsed)
    s_med, b_med = statistics.median(s_times), statistics.median(b_times)
    return {
        "subject_median_s": s_med,
        "baseline_median_s": b_med,
        "speedup": b_med / s_med if s_med > 0 else None,
        "subject_min_s": min(s_times),
        "baseline_min_s": min(b_times),
        "repeats": repeats,
    }


def write_result(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(document, indent=2, default=float))
    return path


def standard_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", help="JSON output path (default: bench/results/<name>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes (smoke run)")
    return parser
