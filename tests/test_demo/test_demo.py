"""`moeshard demo`, the README's main job, end to end: plan, tiny model, 4-rank group, rebalance, reload."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_rebalances_a_live_group_and_load_evens_out(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moeshard.cli.main", "demo", "--workdir", str(tmp_path), "--requests", "12"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "engine.log").read_text()
    out = result.stdout
    assert "chosen: attention TP 4, EP 16" in out
    assert "completions identical before and after the move: True" in out
    measured = re.search(r"pairs computed per rank: \[.*\] \(max/mean ([0-9.]+), was ([0-9.]+)\)", out)
    assert measured, out
    after, before = float(measured.group(1)), float(measured.group(2))
    assert after < before, out
    assert "adopts placement version 1" in out
