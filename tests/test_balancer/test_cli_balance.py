"""``moeshard balance``: placement JSON out, incremental from --previous, one-line errors with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeshard.cli.main import main
from moeshard.core.placement import imbalance, initial_placement, parse_placement


@pytest.fixture
def loads_file(tmp_path):
    loads = np.full((2, 16), 100.0)
    loads[:, :4] = 1000.0
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"loads": loads.tolist()}))
    return path, loads


def test_prints_a_valid_placement(loads_file, capsys):
    path, loads = loads_file
    assert main(["balance", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5", "-o", "json"]) == 0
    placement = parse_placement(capsys.readouterr().out)
    assert (placement.version, placement.num_gpus, placement.slots_per_gpu, placement.num_experts) == (1, 4, 5, 16)
    assert imbalance(placement, loads) < 1.05


def test_incremental_from_previous(loads_file, tmp_path, capsys):
    path, loads = loads_file
    previous = initial_placement(2, 16, 4, 5).with_version(4)
    prev_path = tmp_path / "placement.json"
    prev_path.write_text(previous.to_json())
    args = ["balance", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5", "--gpus-per-domain", "2",
            "--previous", str(prev_path), "--max-moves", "2"]
    assert main(args) == 0
    placement = parse_placement(capsys.readouterr().out)
    assert placement.version == 5
    assert ((placement.phy2log != previous.phy2log).sum(axis=1) <= 2).all()
    assert imbalance(placement, loads) < imbalance(previous, loads)
    assert main(args + ["-o", "text"]) == 0
    assert "placement v5" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("{not json", [], "not valid JSON"),
        ('{"load": [[1, 2]]}', [], "loads: required"),
        ('{"loads": [[1, "x"]]}', [], "loads"),
        ('{"loads": [[1, -3]]}', [], "loads[0][1]"),
        ('{"loads": [[1, 2, 3, 4, 5]]}', [], "slotsPerGpu"),
        ('{"loads": [[1, 2]]}', ["--max-moves", "-1"], "--max-moves"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, extra, message):
    path = tmp_path / "loads.json"
    path.write_text(content)
    code = main(["balance", "--loads", str(path), "--gpus", "2", "--slots-per-gpu", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_bad_previous_names_the_field(loads_file, tmp_path, capsys):
    path, _ = loads_file
    prev = tmp_path / "placement.json"
    prev.write_text(json.dumps({"version": 0, "numGpus": 4, "slotsPerGpu": 5, "numExperts": 16, "layers": []}))
    code = main(["balance", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5", "--previous", str(prev)])
    err = capsys.readouterr().err
    assert code == 2 and "--previous" in err and "layers" in err, err


def test_missing_file_exit_2(tmp_path, capsys):
    assert main(["balance", "--loads", str(tmp_path / "nope.json"), "--gpus", "2", "--slots-per-gpu", "2"]) == 2
    assert "nope.json" in capsys.readouterr().err
