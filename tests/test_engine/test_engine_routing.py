"""Routing invariants and edge cases, apart from numerics (no process group needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeshard.engine.comm import dedup_rows
from moeshard.engine.moe import ReplicaTable, expert_transfers, mix_hash_torch, route_topk
from moeshard.engine.verify import replicated_placement
from moeshard.core.placement import initial_placement, mix_hash, placement_from_arrays, replica_slot


# --------------------------------------------------------------------------- replica choice

@st.composite
def placements(draw):
    """Random valid placements: E experts over G GPUs x S slots, random replicas and shares."""
    g = draw(st.integers(1, 4))
    e = draw(st.integers(1, 12))
    s = draw(st.integers(-(-e // g), -(-e // g) + 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    rows, weights = [], []
    for _ in range(draw(st.integers(1, 2))):
        row = np.concatenate([np.arange(e), rng.integers(0, e, g * s - e)])
        rng.shuffle(row)
        w = rng.random(g * s) + 1e-3
        if draw(st.booleans()):
            w[rng.integers(0, g * s)] = 0.0  # a replica with a zero share (if its expert has another)
            for ex in range(e):
                if w[row == ex].sum() == 0:
                    w[np.flatnonzero(row == ex)[0]] = 1.0
        w = w / np.bincount(row, weights=w, minlength=e)[row]
        rows.append(row)
        weights.append(w)
    return placement_from_arrays(0, g, s, e, rows, weights)


@settings(max_examples=60, deadline=None)
@given(p=placements(), seed=st.integers(0, 2**31), n=st.integers(0, 300))
def test_replica_slot_torch_port_equals_numpy_reference(p, seed, n):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**31 - 1, n)
    experts = rng.integers(0, p.num_experts, n)
    for layer in range(p.num_layers):
        want = replica_slot(p, layer, keys, experts)
        got = ReplicaTable(p, layer).slots(torch.from_numpy(keys), torch.from_numpy(experts)).numpy()
        np.testing.assert_array_equal(got, want)
        assert np.all(p.phy2log[layer][got] == experts)  # a pair always lands on a replica of its own expert


def test_mix_hash_port_is_bit_identical():
    keys = np.array([0, 1, 2, 2**31 - 1, 123456789])
    experts = np.array([0, 7, 127, 3, 255])
    np.testing.assert_array_equal(mix_hash_torch(torch.from_numpy(keys), torch.from_numpy(experts)).numpy(),
                                  mix_hash(keys, experts))


def test_replica_shares_are_respected():
    """Over many tokens each replica gets about its share of its expert's pairs (0.7 / 0.3)."""
    p = replicated_placement(1, 8, 4, 1)
    table = ReplicaTable(p, 0)
    n = 20000
    slots = table.slots(torch.arange(n), torch.zeros(n, dtype=torch.int64)).numpy()
    replicas = np.flatnonzero(p.phy2log[0] == 0)
    share = np.array([(slots == s).mean() for s in replicas])
    np.testing.assert_allclose(share, p.weights[0][replicas], atol=0.02)


def test_unreplicated_expert_always_goes_to_its_only_slot():
    p = initial_placement(1, 8, 4, 2)
    slots = ReplicaTable(p, 0).slots(torch.arange(50), torch.full((50,), 5)).numpy()
    assert set(slots.tolist()) == {int(np.flatnonzero(p.phy2log[0] == 5)[0])}


# --------------------------------------------------------------------------- router

def _hf_router(arch: str, top_k: int, weight: torch.Tensor, norm: bool = True):
    from moeshard.engine.verify import tiny_config

    if arch == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        cfg = tiny_config(arch, top_k=top_k)
        cfg.norm_topk_prob = norm
        router = Qwen3MoeTopKRouter(cfg)
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

        router = MixtralTopKRouter(tiny_config(arch, top_k=top_k))
    router.weight.data.copy_(weight)
    return router


@pytest.mark.parametrize("arch,top_k,norm", [("qwen3_moe", 4, True), ("qwen3_moe", 2, False), ("mixtral", 2, True)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_router_matches_transformers(arch, top_k, norm, tokens):
    g = torch.Generator().manual_seed(tokens)
    weight = torch.randn(8, 64, generator=g)
    x = torch.randn(tokens, 64, generator=g)
    _, hf_w, hf_idx = _hf_router(arch, top_k, weight, norm)(x)
    w, idx = route_topk(torch.nn.functional.linear(x, weight), top_k, arch, norm)
    torch.testing.assert_close(idx, hf_idx, rtol=0, atol=0)
    torch.testing.assert_close(w, hf_w.float(), rtol=0, atol=1e-7)


def test_mixtral_router_is_softmax_over_the_top_k_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5]])
    w, idx = route_topk(logits, 2, "mixtral", False)  # Mixtral renormalises whatever the flag says
    assert idx.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[2.0, 1.5]]), dim=-1))


# --------------------------------------------------------------------------- deduplication

def test_dedup_sends_each_token_once_per_destination():
    dest = torch.tensor([[1, 1, 0], [2, 2, 2], [-1, 3, 3], [0, 1, 2]])
    row_token, row_rank, counts = dedup_rows(dest, 4)
    pairs = sorted(zip(row_rank.tolist(), row_token.tolist()))
    assert pairs == [(0, 0), (0, 3), (1, 0), (1, 3), (2, 1), (2, 3), (3, 2)]
    assert row_rank.tolist() == sorted(row_rank.tolist())  # grouped by destination
    assert counts.tolist() == [2, 2, 2, 1]


@pytest.mark.parametrize("t", [0, 1, 5, 17])
def test_dedup_edge_sizes(t):
    dest = torch.randint(0, 3, (t, 2), generator=torch.Generator().manual_seed(t))
    row_token, row_rank, counts = dedup_rows(dest, 3)
    assert int(counts.sum()) == row_token.numel() == len({(a, b) for a, b in zip(row_token.tolist(), row_rank.tolist())})
    assert row_token.numel() == sum(len(set(r)) for r in dest.tolist())


def test_dedup_all_tokens_to_one_rank():
    dest = torch.full((9, 4), 2)
    row_token, _, counts = dedup_rows(dest, 4)
    assert counts.tolist() == [0, 0, 9, 0] and row_token.tolist() == list(range(9))


# --------------------------------------------------------------------------- placement changes

def _simulate(old, new, layer):
    """Apply expert_transfers to a map slot -> expert; returns the resulting per-rank rows."""
    so, sn = old.slots_per_gpu, new.slots_per_gpu
    held = old.phy2log[layer].reshape(old.num_gpus, so)
    result = np.full((new.num_gpus, sn), -1)
    for g in range(new.num_gpus):
        for s in range(min(so, sn)):
            result[g, s] = held[g, s]
    moves = expert_transfers(old, new, layer)
    for src_rank, src_slot, dst_rank, dst_slot in moves:
        result[dst_rank, dst_slot] = held[src_rank, src_slot]
    return result.reshape(-1), moves


def test_expert_transfers_reach_the_new_placement_and_move_only_changed_slots():
    old = replicated_placement(2, 8, 4, 1)
    row = old.phy2log.copy()
    row[0, [1, 6]] = row[0, [6, 1]]  # swap two slots across ranks in layer 0
    w = 1.0 / np.stack([np.bincount(r, minlength=8)[r] for r in row])
    new = placement_from_arrays(2, 4, 3, 8, row, w)
    for layer in range(2):
        got, moves = _simulate(old, new, layer)
        np.testing.assert_array_equal(got, new.phy2log[layer])
        changed = int(np.sum(old.phy2log[layer] != new.phy2log[layer]))
        assert len(moves) == changed
    assert expert_transfers(old, old, 0) == []


def test_expert_transfers_prefer_a_local_copy():
    old = initial_placement(1, 4, 2, 3)
    assert old.phy2log[0].tolist() == [0, 1, 1, 2, 3, 0]
    row = old.phy2log[0].copy()
    row[2] = 0  # rank 0's spare slot now replicates expert 0, which rank 0 holds
    w = 1.0 / np.bincount(row, minlength=4)[row]
    new = placement_from_arrays(1, 2, 3, 4, [row], [w])
    assert expert_transfers(old, new, 0) == [(0, 0, 0, 2)]  # from rank 0's own slot 0, no transfer
