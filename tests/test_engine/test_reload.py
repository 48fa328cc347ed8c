"""Placement reload: the file watcher (by path, Kubernetes symlink swaps, refusals) and the agreement rule."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from moeshard.engine.reload import (
    PlacementShape,
    PlacementWatcher,
    agreed_version,
    agreement_vector,
    check_fits,
    placement_digest,
)
from moeshard.core.placement import PlacementError, initial_placement, placement_from_arrays

LAYERS, EXPERTS, GPUS, SLOTS = 2, 4, 2, 3


def placement(version: int, shift: int = 0):
    base = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS)
    row = np.roll(base.phy2log[0], shift)
    counts = np.bincount(row, minlength=EXPERTS)
    return placement_from_arrays(version, GPUS, SLOTS, EXPERTS, [row] * LAYERS, [1.0 / counts[row]] * LAYERS)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def kubelet_publish(folder, text: str, generation: int) -> str:
    """Write ``text`` the way the kubelet updates a ConfigMap volume; return the stable path."""
    target = folder / f"..{generation}"
    target.mkdir()
    (target / "placement.json").write_text(text)
    tmp = folder / "..data_tmp"
    os.symlink(target.name, tmp)
    os.replace(tmp, folder / "..data")
    path = folder / "placement.json"
    if not path.is_symlink():
        os.symlink("..data/placement.json", path)
    return str(path)


@pytest.fixture
def rejected():
    return []


def make_watcher(path, rejected, clock=None, interval=0.0):
    return PlacementWatcher(str(path), placement(0), on_reject=rejected.append, poll_interval=interval,
                            clock=clock or Clock())


def test_follows_a_kubelet_symlink_swap(tmp_path, rejected):
    path = kubelet_publish(tmp_path, placement(0).to_json(), 1)
    watcher = make_watcher(path, rejected)
    assert watcher.poll() is None  # the file holds the placement in use
    kubelet_publish(tmp_path, placement(1, shift=1).to_json(), 2)
    candidate = watcher.poll()
    assert candidate is not None and candidate.version == 1
    assert placement_digest(candidate) == placement_digest(placement(1, shift=1))
    watcher.adopted(candidate)
    assert watcher.poll() is None and watcher.current.version == 1
    kubelet_publish(tmp_path, placement(2, shift=2).to_json(), 3)
    assert watcher.poll().version == 2
    assert rejected == []


def test_polls_are_rate_limited(tmp_path, rejected):
    path = tmp_path / "placement.json"
    clock = Clock()
    watcher = make_watcher(path, rejected, clock, interval=1.0)
    assert watcher.poll() is None  # no file yet: nothing, no refusal
    path.write_text(placement(1, shift=1).to_json())
    clock.now = 0.5
    assert watcher.poll() is None  # not due
    clock.now = 1.0
    assert watcher.poll().version == 1
    assert rejected == []


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: "{broken", "not valid JSON"),
        (lambda d: {**d, "numGpus": 3, "slotsPerGpu": 2}, "numGpus: 3"),
        (lambda d: {**d, "slotsPerGpu": 2, "numGpus": 3}, "numGpus"),
        (lambda d: {**d, "layers": d["layers"][:1]}, "layers: 1"),
        (lambda d: {**d, "numExperts": EXPERTS + 2, "layers": [
            {"phy2log": list(range(6)), "weights": [1.0] * 6}] * LAYERS}, "numExperts"),
        (lambda d: {**d, "layers": [{"phy2log": [0, 0, 1, 1, 2, 2], "weights": [0.5] * 6}] * LAYERS}, "expert 3 has no slot"),
        (lambda d: {**d, "layers": [{**d["layers"][0], "weights": [0.9] * 6}] * LAYERS}, "sum to"),
        (lambda d: {**d, "version": -1}, "version"),
        (lambda d: {**d, "version": 0}, "not newer"),  # different content, same version as in use
    ],
)
def test_invalid_files_are_refused_once_and_change_nothing(tmp_path, rejected, caplog, mutate, needle):
    path = tmp_path / "placement.json"
    watcher = make_watcher(path, rejected)
    good = json.loads(placement(1, shift=1).to_json())
    bad = mutate(good)
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with caplog.at_level(logging.WARNING, logger="moeshard.engine.reload"):
        for _ in range(3):
            assert watcher.poll() is None
    assert len(rejected) == 1 and needle in rejected[0], rejected
    assert len(caplog.records) == 1 and needle in caplog.records[0].getMessage()
    assert watcher.current.version == 0


def test_a_bad_file_withdraws_an_unadopted_candidate(tmp_path, rejected):
    path = tmp_path / "placement.json"
    watcher = make_watcher(path, rejected)
    path.write_text(placement(1, shift=1).to_json())
    assert watcher.poll().version == 1
    path.write_text("{")
    assert watcher.poll() is None  # the file no longer says version 1
    path.write_text(placement(1, shift=1).to_json())
    assert watcher.poll().version == 1
    assert len(rejected) == 1


def test_check_fits_names_the_field():
    shape = PlacementShape.of(placement(0))
    check_fits(placement(5, shift=2), shape)
    other = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS + 1)
    with pytest.raises(PlacementError, match="slotsPerGpu"):
        check_fits(other, shape)


def reduce_min(vectors):
    return np.minimum.reduce(vectors)


def test_agreement_needs_every_rank_on_the_same_content():
    current = 3
    v4, v4_other, v5 = placement(4, shift=1), placement(4, shift=2), placement(5, shift=1)
    everyone = [agreement_vector(v4, current) for _ in range(4)]
    assert agreed_version(reduce_min(everyone), current) == 4
    one_lags = everyone[:3] + [agreement_vector(None, current)]
    assert agreed_version(reduce_min(one_lags), current) is None
    one_ahead = everyone[:3] + [agreement_vector(v5, current)]
    assert agreed_version(reduce_min(one_ahead), current) is None
    differ = everyone[:3] + [agreement_vector(v4_other, current)]
    assert agreed_version(reduce_min(differ), current) is None
    nobody = [agreement_vector(None, current)] * 4
    assert agreed_version(reduce_min(nobody), current) is None
    assert agreed_version(reduce_min(everyone), 4) is None  # already in use


def test_digest_ignores_formatting_but_not_content():
    p = placement(1, shift=1)
    pretty = json.dumps(json.loads(p.to_json()), indent=2)
    from moeshard.core.placement import parse_placement

    assert placement_digest(parse_placement(pretty)) == placement_digest(p)
    assert placement_digest(placement(1, shift=2)) != placement_digest(p)
    assert 0 <= placement_digest(p) < 2**63
