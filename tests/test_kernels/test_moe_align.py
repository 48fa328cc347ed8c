"""Routing alignment: Triton vs twin (exact) and the invariants on their own."""

import pytest
import torch

from moeshard.kernels.moe_align import (
    ALIGN_CHUNK,
    max_padded_length,
    moe_align_block_size,
    moe_align_block_size_torch,
)

FIELDS = ("sorted_pair_ids", "block_expert_ids", "expert_counts", "expert_offsets")


def check_invariants(r, topk_ids, num_experts, block_m):
    """Every live pair exactly once, in its expert's segment, ascending; padding is the sentinel."""
    flat = topk_ids.reshape(-1).long()
    live = (flat >= 0) & (flat < num_experts)
    n = flat.numel()
    assert r.num_pairs == n and r.sentinel == n
    assert r.sorted_pair_ids.numel() == max_padded_length(n, num_experts, block_m)
    assert torch.equal(r.expert_counts.long(), torch.bincount(flat[live], minlength=num_experts))
    offsets = r.expert_offsets.long()
    assert offsets[0] == 0 and bool(((offsets[1:] - offsets[:-1]) % block_m == 0).all())
    slots = r.sorted_pair_ids.long()
    for e in range(num_experts):
        seg = slots[offsets[e] : offsets[e + 1]]
        count = int(r.expert_counts[e])
        expected = live.nonzero().squeeze(1)[flat[live] == e]
        assert torch.equal(seg[:count], expected)  # stable: ascending pair index
        assert bool((seg[count:] == n).all())  # padding
        blocks = r.block_expert_ids[offsets[e] // block_m : offsets[e + 1] // block_m]
        assert bool((blocks == e).all())
    assert bool((slots[offsets[-1] :] == n).all())  # unused tail
    assert bool((r.block_expert_ids[offsets[-1] // block_m :] == -1).all())


def run_both(topk_ids, num_experts, block_m, device):
    ref = moe_align_block_size_torch(topk_ids, num_experts, block_m)
    tri = moe_align_block_size(topk_ids.to(device), num_experts, block_m)
    for field in FIELDS:
        assert torch.equal(getattr(tri, field).cpu(), getattr(ref, field)), field
    check_invariants(ref, topk_ids, num_experts, block_m)
    return ref


def _ids(t, k, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((t, e), generator=g).topk(k, dim=1).indices


@pytest.mark.parametrize(
    "t,k,e,block_m",
    [
        (5, 2, 4, 16),  # T not a power of two
        (1, 2, 8, 16),  # T=1: most experts empty
        (9, 1, 3, 4),  # K=1
        (70, 2, 6, 16),  # 140 pairs: spans two alignment chunks
        (3 * ALIGN_CHUNK + 1, 1, 2, 64),  # several chunks, one ragged
    ],
)
def test_align_matches_twin(force_triton, device, t, k, e, block_m):
    run_both(_ids(t, k, e, seed=t), e, block_m, device)


def test_expert_with_no_tokens(force_triton, device):
    ids = torch.tensor([[0, 2], [2, 0], [0, 3]])
    r = run_both(ids, 4, 4, device)
    assert int(r.expert_counts[1]) == 0
    assert int(r.expert_offsets[1]) == int(r.expert_offsets[2])  # empty segment


def test_every_token_to_one_expert(force_triton, device):
    ids = torch.full((37, 1), 2)
    r = run_both(ids, 4, 16, device)
    assert r.expert_counts.tolist() == [0, 0, 37, 0]
    assert int(r.expert_offsets[-1]) == 48


def test_masked_and_out_of_range_ids_are_left_out(force_triton, device):
    ids = torch.tensor([[-1, 1], [3, -1], [-1, -1], [1, 7]])  # 7 >= E: not a local expert
    r = run_both(ids, 4, 4, device)
    assert r.expert_counts.tolist() == [0, 2, 0, 1]
    assert set(r.sorted_pair_ids[r.sorted_pair_ids < r.sentinel].tolist()) == {1, 2, 6}


def test_all_masked_and_empty(force_triton, device):
    r = run_both(torch.full((4, 2), -1), 3, 16, device)
    assert int(r.expert_offsets[-1]) == 0 and bool((r.block_expert_ids == -1).all())
    r = run_both(torch.empty((0, 2), dtype=torch.int64), 3, 16, device)
    assert r.num_pairs == 0 and int(r.expert_offsets[-1]) == 0


def test_int32_ids_match_int64(force_triton, device):
    ids = _ids(11, 3, 5)
    a = moe_align_block_size(ids.to(device), 5, 8)
    b = moe_align_block_size(ids.int().to(device), 5, 8)
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize(
    "ids,e,bm,match",
    [
        (torch.zeros(4, dtype=torch.int64), 2, 16, r"\[T, K\].*\(4,\)"),
        (torch.zeros((2, 2)), 2, 16, "int64 or int32"),
        (torch.zeros((2, 2), dtype=torch.int64), 0, 16, "num_experts"),
        (torch.zeros((2, 2), dtype=torch.int64), 2, 0, "block_m"),
    ],
)
def test_align_rejects_bad_inputs(force_triton, ids, e, bm, match):
    for fn in (moe_align_block_size, moe_align_block_size_torch):
        with pytest.raises(ValueError, match=match):
            fn(ids, e, bm)
