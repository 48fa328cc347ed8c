"""The EPLB baseline of bench/ (our reimplementation): packing, replication and both policies."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from eplb_baseline import balanced_packing, eplb_placement, rebalance_hierarchical, replicate_experts  # noqa: E402

from moeshard.core.placement import imbalance  # noqa: E402


def test_balanced_packing_is_greedy_heaviest_first_with_equal_counts():
    weight = np.array([[9.0, 7, 6, 5, 4, 1]])
    pack, rank = balanced_packing(weight, 2)
    # 9->A, 7->B, 6->B(13), 5->A(14), 4->B(17, B full), 1->A(15).
    assert pack[0].tolist() == [0, 1, 1, 0, 1, 0]
    assert rank[0].tolist() == [0, 0, 1, 1, 2, 2]


def test_replicate_gives_spare_slots_to_largest_per_replica_load():
    phy2log, counts = replicate_experts(np.array([[8.0, 3, 1]]), 6)
    # per replica: 8 -> 4 -> 2.67 < 3, so the third spare slot goes to expert 1.
    assert counts.tolist() == [[3, 2, 1]]
    assert phy2log.tolist() == [[0, 1, 2, 0, 0, 1]]


def test_hierarchical_keeps_each_group_inside_one_node():
    rng = np.random.default_rng(0)
    weight = rng.random((3, 32)) * 100
    phy2log = rebalance_hierarchical(weight, 40, num_groups=4, num_nodes=2, num_gpus=4)
    for layer in range(3):
        for node in range(2):
            groups = set((phy2log[layer, node * 20:(node + 1) * 20] // 8).tolist())
            assert len(groups) == 2  # two whole groups of 8 experts per node
        assert set(phy2log[layer].tolist()) == set(range(32))


def test_eplb_balances_in_sample_and_splits_replicas_evenly():
    rng = np.random.default_rng(1)
    weight = rng.zipf(1.3, (4, 64)).astype(float)
    for kwargs in ({}, {"num_groups": 8, "num_nodes": 2}):
        placement = eplb_placement(weight, 8, 9, **kwargs)
        counts = placement.replica_counts()
        np.testing.assert_allclose(placement.weights, 1.0 / np.take_along_axis(counts, placement.phy2log, 1))
        assert imbalance(placement, weight) < imbalance(eplb_placement(np.ones_like(weight), 8, 9), weight)


def test_moeshard_moves_a_third_of_eplb_at_eplb_balance():
    """The bench's claim on a small case: incremental MoEShard copies <= 1/3 of EPLB's, next-window balance within 1%."""
    from bench_balancer import Workload, gpu_moves, window_counts

    from moeshard.operator.balancer import max_mean, rebalance_placement

    counts, _ = window_counts(Workload(num_layers=8, num_experts=64, top_k=8, windows=5, tokens_per_window=500_000), 7)
    ours = rebalance_placement(counts[0], 8, 9, 4).placement
    theirs = eplb_placement(counts[0], 8, 9)
    our_moves = their_moves = 0.0
    for t in range(1, 4):
        new_ours = rebalance_placement(counts[t], 8, 9, 4, ours).placement
        new_theirs = eplb_placement(counts[t], 8, 9)
        our_moves += gpu_moves(ours, new_ours).sum()
        their_moves += gpu_moves(theirs, new_theirs).sum()
        assert max_mean(new_ours, counts[t + 1]).mean() <= 1.01 * max_mean(new_theirs, counts[t + 1]).mean()
        ours, theirs = new_ours, new_theirs
    assert our_moves <= their_moves / 3, (our_moves, their_moves)
