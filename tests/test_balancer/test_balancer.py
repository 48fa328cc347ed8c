"""The balancer algorithm: invariants (property-tested), incrementality, shares, layer independence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeshard.operator.balancer import BalancerOptions, check_loads, rebalance_placement
from moeshard.core.placement import layer_imbalance
from moeshard.core.placement import (
    PlacementError, gpu_loads, imbalance, initial_placement, parse_placement, placement_from_arrays, replica_slot,
)


def zipf_loads(rng: np.random.Generator, layers: int, experts: int, tokens: float = 1e6) -> np.ndarray:
    """[L, E] Zipf loads, exponent U[0.3, 1.2], random expert order."""
    out = np.empty((layers, experts))
    for layer in range(layers):
        p = np.arange(1, experts + 1, dtype=float) ** -rng.uniform(0.3, 1.2)
        out[layer] = rng.permutation(p / p.sum()) * tokens
    return out


def gpu_duplicates(placement) -> int:
    """Replicas that share a GPU with another replica of the same expert, summed over layers."""
    grid = placement.phy2log.reshape(placement.num_layers, placement.num_gpus, placement.slots_per_gpu)
    return int(sum(len(row) - len(set(row.tolist())) for layer in grid for row in layer))


@st.composite
def problems(draw):
    experts = draw(st.integers(1, 12))
    gpus = draw(st.integers(1, 5))
    min_slots = -(-experts // gpus)
    slots = draw(st.integers(min_slots, min_slots + 3))
    layers = draw(st.integers(1, 3))
    loads = draw(st.lists(st.lists(st.one_of(st.just(0.0), st.floats(0, 1e6)), min_size=experts, max_size=experts),
                          min_size=layers, max_size=layers))
    domain = draw(st.sampled_from([None, 1, 2, 4]))
    start = draw(st.sampled_from(["scratch", "initial", "chained"]))
    max_moves = draw(st.sampled_from([None, 0, 1, 3]))
    shares = draw(st.booleans())
    return np.array(loads), gpus, slots, domain, start, max_moves, shares


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_invariants_hold_for_any_input(problem):
    loads, gpus, slots, domain, start, max_moves, shares = problem
    layers, experts = loads.shape
    options = BalancerOptions(max_moves=max_moves, use_shares=shares)
    previous = None
    if start == "initial":
        previous = initial_placement(layers, experts, gpus, slots)
    elif start == "chained":
        previous = rebalance_placement(loads[:, ::-1], gpus, slots, domain).placement
    result = rebalance_placement(loads, gpus, slots, domain, previous, options)
    p = result.placement
    # Exact slot counts, every expert kept, shares of one expert sum to 1 (the file's own validation).
    assert p.phy2log.shape == (layers, gpus * slots)
    reparsed = parse_placement(p.to_json())
    np.testing.assert_array_equal(reparsed.phy2log, p.phy2log)
    assert (p.replica_counts() >= 1).all()
    sums = np.zeros((layers, experts))
    np.add.at(sums, (np.arange(layers)[:, None].repeat(p.num_slots, 1), p.phy2log), p.weights)
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    # No two replicas of an expert on one GPU when avoidable (S <= E), unless the start had them.
    if slots <= experts and (previous is None or gpu_duplicates(previous) == 0):
        assert gpu_duplicates(p) == 0
    # Version and the move cap.
    if previous is None:
        assert p.version == 1
    else:
        assert p.version == previous.version + 1
        np.testing.assert_array_equal(result.moves, (p.phy2log != previous.phy2log).sum(axis=1))
        if max_moves is not None:
            assert (result.moves <= max_moves).all()


def test_layers_are_independent_of_each_other():
    """The vectorised run over L layers gives each layer what a run on that layer alone gives."""
    rng = np.random.default_rng(3)
    loads = zipf_loads(rng, 5, 32)
    previous = rebalance_placement(zipf_loads(rng, 5, 32), 8, 5, 4).placement
    together = rebalance_placement(loads, 8, 5, 4, previous).placement
    for layer in range(5):
        alone_prev = placement_from_arrays(previous.version, 8, 5, 32, previous.phy2log[layer:layer + 1],
                                           previous.weights[layer:layer + 1])
        alone = rebalance_placement(loads[layer:layer + 1], 8, 5, 4, alone_prev).placement
        np.testing.assert_array_equal(alone.phy2log[0], together.phy2log[layer])
        np.testing.assert_allclose(alone.weights[0], together.weights[layer], rtol=1e-9, atol=1e-12)


def test_from_scratch_balances_a_skewed_load():
    rng = np.random.default_rng(0)
    loads = zipf_loads(rng, 4, 64)
    plan = rebalance_placement(loads, 8, 9, 4).placement  # 8 redundant slots
    assert imbalance(plan, loads) < 1.02
    naive = initial_placement(4, 64, 8, 9)
    assert imbalance(naive, loads) > 1.2


def test_incremental_moves_few_slots_under_small_drift():
    rng = np.random.default_rng(1)
    loads = zipf_loads(rng, 8, 128)
    live = rebalance_placement(loads, 16, 9, 8).placement
    drifted = loads * rng.lognormal(0, 0.1, loads.shape)
    result = rebalance_placement(drifted, 16, 9, 8, live)
    assert result.moves.max() <= 144 // 4  # the default cap, N / 4
    assert result.moves.mean() < 30
    assert imbalance(result.placement, drifted) <= imbalance(live, drifted)
    assert imbalance(result.placement, drifted) < 1.03


def test_unchanged_load_moves_nothing():
    rng = np.random.default_rng(2)
    loads = zipf_loads(rng, 3, 32)
    live = rebalance_placement(loads, 8, 5, 8).placement
    again = rebalance_placement(loads, 8, 5, 8, live)
    assert again.moves.sum() == 0
    assert again.placement.version == live.version + 1


def test_move_cap_zero_still_relevels_shares():
    """maxMovesPerCycle 0: no weight copies, but shares (free to change) follow the load."""
    rng = np.random.default_rng(4)
    live = initial_placement(2, 16, 4, 5)
    loads = zipf_loads(rng, 2, 16)
    result = rebalance_placement(loads, 4, 5, None, live, BalancerOptions(max_moves=0))
    np.testing.assert_array_equal(result.placement.phy2log, live.phy2log)
    assert imbalance(result.placement, loads) < imbalance(live, loads)


def test_shares_split_a_hot_expert_towards_the_lighter_neighbour():
    """Expert 0 (10 tokens) on both GPUs; GPU 0 also holds expert 1 (6), GPU 1 expert 2 (2).

    Even split: GPU loads 11 and 7 (max/mean 1.22). Levelled shares give GPU 1
    the larger part of expert 0, and dispatch by replica_slot honours them.
    """
    live = placement_from_arrays(0, 2, 2, 3, [[0, 1, 0, 2]], [[0.5, 1.0, 0.5, 1.0]])
    loads = np.array([[10.0, 6.0, 2.0]])
    for spread, bound in ((0.0, 1.0 + 1e-9), (BalancerOptions().spread, 1.1)):
        plan = rebalance_placement(loads, 2, 2, None, live, BalancerOptions(max_moves=0, spread=spread)).placement
        np.testing.assert_array_equal(plan.phy2log, live.phy2log)
        share_gpu0, share_gpu1 = plan.weights[0, 0], plan.weights[0, 2]
        assert share_gpu1 > share_gpu0
        assert layer_imbalance(plan, loads)[0] <= bound < layer_imbalance(live, loads)[0]
    exact = rebalance_placement(loads, 2, 2, None, live, BalancerOptions(max_moves=0, spread=0.0)).placement
    np.testing.assert_allclose(gpu_loads(exact, loads), [[9.0, 9.0]])
    # Dispatch: hashed tokens of expert 0 land on its replicas in proportion to the shares.
    tokens = np.arange(100000)
    slots = replica_slot(exact, 0, tokens, np.zeros_like(tokens))
    np.testing.assert_allclose(np.mean(slots == 2), exact.weights[0, 2], atol=0.01)


def test_replicas_spread_over_gpus_and_domains():
    loads = np.array([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    plan = rebalance_placement(loads, 4, 4, 2).placement  # 8 spare slots
    counts = plan.replica_counts()[0]
    assert counts[0] == 4  # one per GPU
    assert gpu_duplicates(plan) == 0


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: rebalance_placement([[1, 2], [3]], 2, 1), "loads"),
        (lambda: rebalance_placement([[1, float("nan")]], 2, 1), "loads[0][1]"),
        (lambda: rebalance_placement([[1, -1]], 2, 1), "loads[0][1]"),
        (lambda: rebalance_placement([[1, 2, 3]], 1, 2), "slotsPerGpu"),
        (lambda: rebalance_placement([[1, 2]], 0, 2), "numGpus"),
        (lambda: rebalance_placement([[1, 2]], 2, 1, 0), "gpusPerDomain"),
        (lambda: rebalance_placement([[1, 2]], 2, 2, None, initial_placement(1, 2, 2, 1)), "slotsPerGpu"),
        (lambda: rebalance_placement([[1, 2, 3]], 2, 2, None, initial_placement(1, 2, 2, 2)), "loads"),
    ],
)
def test_bad_input_names_the_field(call, field):
    with pytest.raises(PlacementError) as info:
        call()
    assert str(info.value).startswith(field), str(info.value)


def test_check_loads_accepts_integers_and_returns_float():
    arr = check_loads([[1, 2], [3, 4]])
    assert arr.dtype == np.float64 and arr.shape == (2, 2)


def test_new_replica_prefers_another_nvlink_domain():
    """One hot expert, one spare slot, two domains of two GPUs: its second replica leaves domain 0."""
    loads = np.array([[100.0, 10, 10, 10, 10, 10, 10]])
    plan = rebalance_placement(loads, 4, 2, 2).placement
    gpus = np.flatnonzero(plan.phy2log[0] == 0) // 2
    assert gpus.size == 2
    assert len(set((gpus // 2).tolist())) == 2, gpus  # one replica per domain


def test_pinned_maximum_still_evens_the_next_gpus():
    """No spare slots and one expert heavier than a GPU's fair share: the maximum cannot move,
    but the swaps keep going on the next-heaviest GPUs (what the next window's maximum is made of)."""
    rng = np.random.default_rng(5)
    loads = zipf_loads(rng, 4, 32)
    loads[:, 0] = loads.sum(axis=1) / 4  # expert 0 alone exceeds the mean GPU load of 8 GPUs
    live = initial_placement(4, 32, 8, 4)
    plan = rebalance_placement(loads, 8, 4, None, live, BalancerOptions(max_moves=32)).placement
    before, after = np.sort(gpu_loads(live, loads), axis=1), np.sort(gpu_loads(plan, loads), axis=1)
    assert (after[:, -1] >= loads[:, 0]).all() and (after[:, -1] <= before[:, -1] + 1e-6).all()
    assert (after[:, -2] < before[:, -2]).all()  # the runner-up GPU came down
    assert (after[:, :-1].std(axis=1) < before[:, :-1].std(axis=1)).all()  # the rest are more even


def test_the_revision_comparison_finds_a_revision_identical_to_itself(tmp_path):
    """bench/compare_balancer_revision.py runs against git history and compares exactly (HEAD vs the work tree).

    Skipped outside a git checkout or when the work tree's balancer differs from HEAD's.
    """
    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "operator/balancer.py"], cwd=root)
    if diff.returncode != 0:
        pytest.skip("operator/balancer.py differs from HEAD (or this is no git checkout)")
    out = tmp_path / "revision.json"
    result = subprocess.run([sys.executable, str(root / "bench" / "compare_balancer_revision.py"), "--against", "HEAD",
                             "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["identical"]["plans"] == 3 * doc["identical"]["shapes"] == 1080
    assert doc["identical"]["shapes_with_two_replicas_on_one_gpu"] > 0
    assert set(doc["median_ms_94x128x32"]) >= {"decision_old", "decision_new", "decision_speedup"}
