"""PlacementSync's protocol without processes: two ranks as threads over an in-memory group.

The runtime is a fake that records moves (the real transfers are covered by
test_reload_converge.py); what is checked here is that the ranks take the
same decisions: start-up agreement, serving-digest repair, staged moves one
layer per boundary, abort and retry.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from moeshard.core.placement import initial_placement, placement_from_arrays
from moeshard.engine.reload import PlacementDivergence, PlacementSync, PlacementWatcher, placement_digest

LAYERS, EXPERTS, GPUS, SLOTS = 3, 4, 2, 3


def version(v: int, shift: int):
    base = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS)
    row = np.roll(base.phy2log[0], shift)
    counts = np.bincount(row, minlength=EXPERTS)
    return placement_from_arrays(v, GPUS, SLOTS, EXPERTS, [row] * LAYERS, [1.0 / counts[row]] * LAYERS)


class Group:
    """reduce_min / reduce_sum over two threads (a barrier per collective)."""

    def __init__(self, world: int):
        self.world, self.barrier, self.lock, self.slots = world, threading.Barrier(world), threading.Lock(), {}

    def channel(self, rank: int) -> "Channel":
        return Channel(self, rank)


class Channel:
    def __init__(self, group: Group, rank: int):
        self.group, self.rank, self.world_size, self.calls = group, rank, group.world, 0

    def _reduce(self, values: np.ndarray, op) -> np.ndarray:
        key = self.calls
        self.calls += 1
        with self.group.lock:
            self.group.slots.setdefault(key, []).append(np.asarray(values, dtype=np.int64))
        self.group.barrier.wait(timeout=30)
        result = op(np.stack(self.group.slots[key]), axis=0)
        self.group.barrier.wait(timeout=30)
        return result

    def reduce_min(self, values):
        return self._reduce(values, np.min)

    def reduce_sum(self, values):
        return self._reduce(values, np.sum)


class Runtime:
    def __init__(self, rank: int, placement, fail_layers=()):
        self.rank, self.placement, self.placement_version = rank, placement, placement.version
        self.fail_layers, self.moves = set(fail_layers), []

    def move_layers(self, target, layers, *, old_rows=None, timeout_s=None):
        layers = list(layers)
        self.moves.append((target.version, layers, None if old_rows is None else old_rows.tolist()))
        if self.fail_layers & set(layers):
            return False
        rows, shares = self.placement.phy2log.copy(), self.placement.weights.copy()
        rows[layers], shares[layers] = target.phy2log[layers], target.weights[layers]
        if np.array_equal(rows, target.phy2log) and np.array_equal(shares, target.weights):
            self.placement, self.placement_version = target, target.version
        else:
            self.placement = placement_from_arrays(self.placement.version, GPUS, SLOTS, EXPERTS, rows, shares)
        return True


def run_ranks(body, world: int = 2):
    group, results, errors = Group(world), [None] * world, []

    def run(rank):
        try:
            results[rank] = body(rank, group.channel(rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_start_up_agreement_takes_the_highest_version_and_moves_the_others():
    starts = [version(2, 0), version(5, 1)]

    def body(rank, channel):
        runtime = Runtime(rank, starts[rank])
        agreed = PlacementSync(runtime, channel).agree_before_serving()
        return agreed.version, placement_digest(runtime.placement), runtime.moves

    (v0, d0, moves0), (v1, d1, moves1) = run_ranks(body)
    assert v0 == v1 == 5 and d0 == d1 == placement_digest(starts[1])
    # Every rank takes part in the move; the old rows are what each rank really holds (its own block).
    expected = np.concatenate([starts[0].phy2log[:, :SLOTS], starts[1].phy2log[:, SLOTS:]], axis=1)
    assert moves0 == moves1 == [(5, [0, 1, 2], expected.tolist())]


def test_a_serving_mismatch_is_repaired_at_the_next_boundary():
    def body(rank, channel):
        runtime = Runtime(rank, version(3, 0))
        sync = PlacementSync(runtime, channel)
        sync.agree_before_serving()
        if rank == 1:  # something swapped this rank's placement behind the group's back
            runtime.placement, runtime.placement_version = version(4, 2), 4
        adopted = sync.at_step_boundary()
        return adopted.version, placement_digest(runtime.placement)

    (v0, d0), (v1, d1) = run_ranks(body)
    assert v0 == v1 == 4 and d0 == d1


def test_a_failed_repair_fails_loudly():
    def body(rank, channel):
        runtime = Runtime(rank, version(3 + rank, rank), fail_layers=[0])
        with pytest.raises(PlacementDivergence, match="restart the group"):
            PlacementSync(runtime, channel).agree_before_serving()
        return True

    assert run_ranks(body) == [True, True]


def test_staged_move_one_layer_per_boundary_then_abort_and_retry(tmp_path):
    target = version(1, 1)
    (tmp_path / "placement.json").write_text(target.to_json())

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    def body(rank, channel):
        clock = Clock()
        runtime = Runtime(rank, version(0, 0), fail_layers=[1])  # the group vote aborts on every rank
        watcher = PlacementWatcher(str(tmp_path / "placement.json"), runtime.placement, poll_interval=0.0)
        sync = PlacementSync(runtime, channel, watcher, layers_per_step=1, retry_after_s=10.0, clock=clock)
        steps = [sync.at_step_boundary() for _ in range(3)]  # layer 0 moves, layer 1 aborts, retry not due
        mixed = runtime.placement.phy2log.tolist()
        runtime.fail_layers = set()
        clock.now = 11.0  # the retry is due: layers 1 and 2 move, one per boundary
        steps += [sync.at_step_boundary() for _ in range(3)]
        return [s.version if s else None for s in steps], mixed, runtime.placement_version, [m[1] for m in runtime.moves]

    results = run_ranks(body)
    for steps, mixed, final, moved in results:
        assert steps == [None, None, None, None, None, 1]
        assert mixed[0] == target.phy2log[0].tolist() and mixed[1] == version(0, 0).phy2log[1].tolist()
        assert final == 1
        assert moved == [[0], [1], [0], [1], [2]]  # the retry starts over: layer 0 is already there (no copies)
    assert results[0][1] == results[1][1]
