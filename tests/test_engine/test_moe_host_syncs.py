"""Host-sync budget of one MoE layer forward (router, replica choice, dispatch, combine).

Budget: ONE host sync per layer for the flat all-to-all (all_to_all_single
takes its uneven split sizes as host integers: the sent and received counts
are read together, comm._exchange_counts), TWO for the hierarchical one (its
second stage's sizes depend on what the first delivered), ZERO for the padded
exchange that bucketed decode steps use for CUDA-graph capture.

Expert compute is excluded from the count: on CUDA it is the Triton path
(routing aligned on the device, moe_align_block_size_triton, launch bucket
from the count dispatch already read), on CPU the torch twin, whose syncs are
CPU-side only; a capture of the whole decode layer on a GPU
(bench/gpu_check.sh) covers the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.host_syncs import SyncCounter, count_layer_syncs, sync_budget_task

from moeshard.engine.comm import FlatAllToAll
from moeshard.engine.config import ParallelConfig
from moeshard.engine.moe import MoELayer
from moeshard.engine.verify import run_ranks
from moeshard.core.placement import initial_placement

BUDGET = {"flat": 1, "hierarchical": 2, "padded": 0}


def _single_rank_layer(padded: bool) -> MoELayer:
    placement = initial_placement(1, 8, 1, 8)
    g = torch.Generator().manual_seed(0)
    comm = FlatAllToAll(ParallelConfig(rank=0, world_size=1), placement.slots_per_gpu)
    comm.padded = padded
    return MoELayer(moe_index=0, router_weight=torch.randn(8, 16, generator=g),
                    w_gate_up=torch.randn(8, 16, 16, generator=g), w_down=torch.randn(8, 16, 8, generator=g),
                    placement=placement, rank=0, comm=comm, top_k=2, model_type="mixtral", norm_topk_prob=True)


def test_counter_sees_every_kind_of_sync():
    t = torch.tensor([0, 2, 1])
    counter = SyncCounter()
    with counter.active():
        t[0].item()
        t.tolist()
        int(t[1])
        t.nonzero()
        torch.nonzero(t)
        torch.bincount(t)
        torch.bincount(t, minlength=4)  # sized by the caller: not counted
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=3)  # not counted
        with counter.paused():
            t.tolist()
    assert counter.total == 7, counter.counts


@pytest.mark.parametrize("padded", [False, True])
def test_single_rank_layer_within_budget(padded):
    layer = _single_rank_layer(padded)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    counter, out = count_layer_syncs(layer, x, torch.arange(16))
    assert counter.total == BUDGET["padded" if padded else "flat"], counter.counts
    assert out.shape == (16, 16) and torch.isfinite(out).all()


def test_padded_exchange_matches_the_deduplicated_one_on_one_rank():
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    outs = [_single_rank_layer(padded).forward(x, torch.arange(5)) for padded in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    empty = _single_rank_layer(True).forward(torch.zeros(0, 16), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, 16)


@pytest.mark.slow
def test_two_rank_gloo_layers_within_budget():
    """Flat, hierarchical (2 domains of 1 rank) and padded in real 2-rank gloo worlds; outputs agree."""
    modes = {"flat": (8, False), "hierarchical": (1, False), "padded": (8, True)}
    by_rank = run_ranks(2, sync_budget_task, list(modes.values()))
    results = {mode: [by_rank[r][i] for r in range(2)] for i, mode in enumerate(modes)}
    for mode, per_rank in results.items():
        for rank_result in per_rank:
            assert sum(rank_result["counts"].values()) == BUDGET[mode], (mode, rank_result["counts"])
    for rank in range(2):
        for mode in ("hierarchical", "padded"):
            np.testing.assert_allclose(results[mode][rank]["out"], results["flat"][rank]["out"], rtol=1e-5, atol=1e-5)
            assert results[mode][rank]["rank_tokens"] == results["flat"][rank]["rank_tokens"]
            np.testing.assert_array_equal(results[mode][rank]["experts"], results["flat"][rank]["experts"])
