"""`moeshard plan` and `moeshard crd` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CANDIDATE_KEYS = {"attentionTP", "expertEP", "replicas", "podsPerReplica", "gpusPerPod", "tokensPerExpert",
                  "dispatchMicros", "gemmMicros", "verdict"}


def moeshard(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeshard.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_plan_json_for_the_brief_cases():
    gb200 = moeshard("plan", "--preset", "qwen3-235b-a22b", "--hardware", "gb200-nvl72", "-o", "json")
    assert gb200.returncode == 0, gb200.stderr
    plan = json.loads(gb200.stdout)
    assert CANDIDATE_KEYS <= plan["chosen"].keys()
    assert (plan["chosen"]["expertEP"], plan["chosen"]["attentionTP"]) == (16, 4)
    assert all(CANDIDATE_KEYS <= c.keys() for c in plan["candidates"])
    h100 = json.loads(moeshard("plan", "--preset", "qwen3-235b-a22b", "--hardware", "h100-hgx", "-o", "json").stdout)
    assert h100["chosen"]["expertEP"] == 8
    assert all(c["crossesFabric"] for c in h100["candidates"] if c["expertEP"] > 8)


def test_plan_table_marks_the_chosen_row_and_yaml_parses():
    table = moeshard("plan", "examples/qwen3-235b-gb200.yaml")
    assert table.returncode == 0, table.stderr
    chosen = [line for line in table.stdout.splitlines() if line.startswith("*")]
    assert len(chosen) == 1 and "sweet spot" in chosen[0]
    assert chosen[0].split()[1:3] == ["4", "16"]
    as_yaml = yaml.safe_load(moeshard("plan", "examples/qwen3-235b-h100.yaml", "-o", "yaml").stdout)
    assert as_yaml["chosen"]["expertEP"] == 8 and as_yaml["chosen"]["replicas"] == 2


def test_plan_plot_writes_a_png(tmp_path):
    out = tmp_path / "steps.png"
    result = moeshard("plan", "--preset", "mixtral-8x7b", "--hardware", "h200-hgx", "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, field",
    [
        (["--preset", "qwen3-235b-a22b", "--hardware", "h100-hgx", "--ep", "12"], "--ep"),
        (["--preset", "qwen3-235b-a22b", "--hardware", "h100-hgx", "--ep", "4"], "--ep"),
        (["--preset", "qwen3-235b-a22b"], "--hardware"),
        (["--preset", "deepseek-v3", "--hardware", "h100-hgx"], "--allow-cross-domain"),
        (["--preset", "qwen3-235b-a22b", "--hardware", "h100-hgx", "--tokens", "0"], "--tokens"),
        (["{bad}"], "{bad}"),
        (["missing.yaml"], "missing.yaml"),
    ],
)
def test_plan_bad_input_is_one_line_exit_2(args, field, tmp_path):
    if args == ["{bad}"]:
        bad = tmp_path / "bad.yaml"
        bad.write_text("apiVersion: moeshard.io/v1alpha1\nkind: MoEDeployment\nmetadata: {name: x}\nspec:\n  model: {preset: qwen3-235b-a22b, weights: {uri: hf://Qwen/Qwen3-235B-A22B}}\n  hardware: {profile: h100-hgx}\n  parallelism: {expertEP: 7}\n")
        args, field = [str(bad)], "spec.parallelism.expertEP"
    result = moeshard("plan", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert field in lines[0]


def test_crd_check_detects_staleness(tmp_path):
    target = tmp_path / "crd.yaml"
    assert moeshard("crd", "--out", str(target)).returncode == 0
    assert moeshard("crd", "--out", str(target), "--check").returncode == 0
    target.write_text(target.read_text() + "# edited\n")
    assert moeshard("crd", "--out", str(target), "--check").returncode == 1


def test_help_lists_every_command():
    result = moeshard("--help")
    assert result.returncode == 0
    for command in ("plan", "crd"):
        assert command in result.stdout


def test_malformed_inputs_to_render_and_plan_config_are_one_line_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [\n")
    listed = tmp_path / "config.json"
    listed.write_text("[1, 2]")
    for args in (["render", str(bad_yaml)], ["plan", "--config", str(listed), "--hardware", "cpu"]):
        result = moeshard(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
