"""The placement file's invariants: checked on all layers at once, the first bad layer and field named."""

from __future__ import annotations

import numpy as np
import pytest

from moeshard.core.placement import PlacementError, initial_placement, placement_from_arrays


def _with_layer_2(change):
    base = initial_placement(4, 6, 2, 4)  # 8 slots for 6 experts: two replicated
    rows, weights = base.phy2log.copy(), base.weights.copy()
    change(rows[2], weights[2])
    return rows, weights


def _expert_out_of_range(r, w):
    r[1] = 6


def _negative_share(r, w):
    w[3] = -0.1


def _nan_share(r, w):
    w[0] = np.nan


def _expert_without_slot(r, w):
    r[r == 5] = 4  # expert 5's slots go to expert 4
    w[r == 4] = 1.0 / (r == 4).sum()


def _shares_off(r, w):
    w[:] = 0.9


@pytest.mark.parametrize("change, message", [
    (_expert_out_of_range, r"layers\[2\]\.phy2log\[1\]: expert 6 outside 0\.\.5"),
    (_negative_share, r"layers\[2\]\.weights\[3\]: must be a finite share >= 0"),
    (_nan_share, r"layers\[2\]\.weights\[0\]: must be a finite share >= 0"),
    (_expert_without_slot, r"layers\[2\]\.phy2log: expert 5 has no slot"),
    (_shares_off, r"layers\[2\]\.weights: shares of expert 0 sum to"),
])
def test_the_first_bad_layer_and_field_are_named(change, message):
    rows, weights = _with_layer_2(change)
    with pytest.raises(PlacementError, match=message):
        placement_from_arrays(1, 2, 4, 6, rows, weights)


def test_a_valid_placement_passes_and_keeps_its_arrays():
    base = initial_placement(4, 6, 2, 4)
    again = placement_from_arrays(1, 2, 4, 6, base.phy2log, base.weights)
    assert np.array_equal(again.phy2log, base.phy2log) and np.array_equal(again.weights, base.weights)
