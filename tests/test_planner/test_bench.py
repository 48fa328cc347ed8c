"""The planner benchmark runs and writes its JSON (it never fails on time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_planner_benchmark_writes_json(tmp_path):
    out = tmp_path / "planner.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_planner.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["benchmark"] == "planner" and document["environment"]["python"]
    assert {r["preset"] for r in document["rows"]} >= {"qwen3-235b-a22b", "deepseek-v3", "mixtral-8x7b"}
    assert all(r["plan_ms"] > 0 and r["candidates"] > 0 for r in document["rows"])
