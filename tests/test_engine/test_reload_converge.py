"""Ranks that start on different placements agree before serving; an aborted staged move keeps serving correctly.

Real gloo worlds of EngineRuntimes on the tiny qwen3_moe checkpoint: every
rank holds real expert weights, and transfers move them point to point.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from support.placement_tasks import aborted_move_task, converge_task

from moeshard.engine.verify import reference_outputs, run_ranks
from moeshard.core.placement import initial_placement, placement_from_arrays

PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82], [9]]
MAX_NEW = 6
LAYERS, EXPERTS = 2, 8


@functools.lru_cache(maxsize=None)
def _reference(model_dir: str):
    return reference_outputs(model_dir, PROMPTS, MAX_NEW)[1]


def _shifted(base, version: int, shift: int):
    """Every rank's slots move ``shift`` slots along (experts change rank), replicas split evenly."""
    row = np.roll(base.phy2log, shift, axis=1)
    w = np.roll(base.weights, shift, axis=1)
    return placement_from_arrays(version, base.num_gpus, base.slots_per_gpu, base.num_experts, row, w)


@pytest.mark.slow
def test_ranks_on_different_versions_converge_before_the_first_request(tiny_checkpoint):
    model_dir = str(tiny_checkpoint("qwen3_moe"))
    base = initial_placement(LAYERS, EXPERTS, 2, 5)  # 10 slots: two replicas
    placements = [base.with_version(2), _shifted(base, 5, 3)]
    results = run_ranks(2, converge_task, model_dir, [p.to_json() for p in placements], PROMPTS, MAX_NEW)
    assert [r["started"] for r in results] == [2, 5]
    # One placement everywhere: the highest version, its exact content, the right weights in every slot.
    assert {r["version"] for r in results} == {5}
    assert {r["digest"] for r in results} == {results[1]["digest"]}
    assert results[0]["rows"] == placements[1].phy2log.tolist()
    assert all(r["weights_ok"] for r in results)
    # The first answers are the model's.
    for r in results:
        assert r["generated"] == _reference(model_dir)


@pytest.mark.slow
def test_a_transfer_killed_halfway_keeps_serving_the_old_slots(tiny_checkpoint, tmp_path):
    model_dir = str(tiny_checkpoint("qwen3_moe"))
    start = initial_placement(LAYERS, EXPERTS, 2, 4)
    target = _shifted(start, 1, 4)  # every slot changes rank: all weights travel
    (tmp_path / "placement.json").write_text(target.to_json())
    results = run_ranks(2, aborted_move_task, model_dir, start.to_json(), str(tmp_path), PROMPTS, MAX_NEW, 1, 1)
    for r in results:
        # Layer 0 switched at the first boundary; layer 1's stage failed on rank 1 and was aborted everywhere.
        assert r["adopted"] == [False, False, False, False] and not r["moving"]
        assert r["version"] == 0
        assert r["rows"][0] == target.phy2log[0].tolist() and r["rows"][1] == start.phy2log[1].tolist()
        assert r["weights_ok"]  # every slot holds the expert its (mixed) placement names
        assert r["generated"] == r["before"] == _reference(model_dir)
    assert results[0]["digest"] == results[1]["digest"]
