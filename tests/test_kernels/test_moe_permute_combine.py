"""Permute / unpermute (exact copies) and combine (float32 sums): Triton vs twin."""

import pytest
import torch

from moeshard.kernels.moe_align import moe_align_block_size_torch
from moeshard.kernels.moe_combine import moe_combine, moe_combine_torch
from moeshard.kernels.moe_permute import moe_permute, moe_permute_torch, moe_unpermute, moe_unpermute_torch
from support.moe_reference import distinct_topk


def _routing(t, k, e, block_m, seed=0, masked=()):
    g = torch.Generator().manual_seed(seed)
    ids = distinct_topk(t, k, e, g)
    for tk in masked:
        ids[tk] = -1
    return ids, moe_align_block_size_torch(ids, e, block_m)


@pytest.mark.parametrize("t,k,e,h", [(7, 2, 3, 40), (1, 1, 4, 16), (33, 3, 5, 300)])
def test_permute_unpermute_match_twin_exactly(force_triton, device, t, k, e, h):
    ids, routing = _routing(t, k, e, 16, seed=t, masked=[(0, 0)])
    x = torch.randn(t, h)
    ref = moe_permute_torch(x, routing, k)
    tri = moe_permute(x.to(device), _to(routing, device), k)
    assert torch.equal(tri.cpu(), ref)
    # Padding slots are zero; live slots hold their token's row.
    slots = routing.sorted_pair_ids.long()
    live = slots < routing.num_pairs
    assert bool((ref[~live] == 0).all())
    assert torch.equal(ref[live], x[slots[live] // k])
    # Unpermute: inverse scatter; the masked pair's row comes back as zeros.
    y = torch.randn_like(ref)
    y[~live] = float("nan")  # padding rows must never be read
    back_ref = moe_unpermute_torch(y, routing)
    back_tri = moe_unpermute(y.to(device), _to(routing, device))
    assert torch.equal(back_tri.cpu(), back_ref)
    assert bool((back_ref[0] == 0).all()) and not back_ref.isnan().any()
    assert torch.equal(moe_unpermute_torch(ref, routing)[1:], x.repeat_interleave(k, 0)[1:])


def _to(routing, device):
    if device == "cpu":
        return routing
    import dataclasses

    return dataclasses.replace(
        routing,
        **{f: getattr(routing, f).to(device) for f in ("sorted_pair_ids", "block_expert_ids", "expert_counts", "expert_offsets")},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("apply_weights", [True, False])
def test_combine_matches_twin(force_triton, device, dtype, apply_weights):
    t, k, e, h = 9, 3, 4, 300  # H spans two 256-wide column blocks
    ids, _ = _routing(t, k, e, 16, seed=3, masked=[(2, 1), (5, 0)])
    ids[4, 2] = 9  # not a local expert: masked like -1
    y = torch.randn(t, k, h).to(dtype)
    y[2, 1] = float("nan")  # rows of masked pairs may be garbage: never read
    y[5, 0] = float("inf")
    y[4, 2] = float("nan")
    w = torch.rand(t, k).to(dtype)
    ref = moe_combine_torch(y, ids, w, num_experts=e, apply_weights=apply_weights)
    tri = moe_combine(y.to(device), ids.to(device), w.to(device), num_experts=e, apply_weights=apply_weights)
    assert ref.dtype == dtype and torch.isfinite(ref).all()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(tri.cpu(), ref, **tol)
    # Hand-checked row: token 0 has all K pairs live.
    coef = w[0].float() if apply_weights else torch.ones(k)
    torch.testing.assert_close(ref[0].float(), (y[0].float() * coef[:, None]).sum(0), **tol)


def test_combine_single_expert_and_empty(force_triton, device):
    y = torch.randn(1, 1, 16)
    out = moe_combine(y.to(device), torch.zeros(1, 1, dtype=torch.int64, device=device), torch.ones(1, 1, device=device), num_experts=1)
    torch.testing.assert_close(out.cpu(), y[:, 0])
    empty = moe_combine(torch.empty(0, 2, 16), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), num_experts=2)
    assert empty.shape == (0, 16)


@pytest.mark.parametrize(
    "y,ids,w,match",
    [
        (torch.zeros(4, 2, 8), torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3), r"\[T, K, H\] = \[4, 3, H\].*\(4, 2, 8\)"),
        (torch.zeros(4, 2, 8), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 1), r"topk_weights.*\(4, 1\)"),
        (torch.zeros(4, 2, 8, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2), "float16"),
        (torch.zeros(4, 2, 8), torch.zeros(4, 2), torch.zeros(4, 2), "int64 or int32"),
    ],
)
def test_combine_rejects_bad_inputs(force_triton, y, ids, w, match):
    for fn in (moe_combine, moe_combine_torch):
        with pytest.raises(ValueError, match=match):
            fn(y, ids, w, num_experts=2)


def test_permute_rejects_mismatched_sizes(force_triton):
    _, routing = _routing(4, 2, 3, 16)
    with pytest.raises(ValueError, match=r"T\*K = 8 pairs.*\(5, 16\)"):
        moe_permute(torch.zeros(5, 16), routing, 2)
    with pytest.raises(ValueError, match=r"y must be \[53, H\].*\(8, 16\)"):
        moe_unpermute(torch.zeros(8, 16), routing)


def test_unfused_pipeline_equals_fused_ffn(force_triton, device):
    """align -> permute -> per-expert FFN on padded segments -> unpermute -> combine == fused FFN."""
    import torch.nn.functional as F

    from moeshard.kernels.fused_moe import fused_expert_ffn_torch
    from moeshard.kernels.moe_align import moe_align_block_size
    from support.moe_reference import make_moe_inputs

    t, k, e, h, i = 10, 2, 3, 24, 16
    x, ids, w, wgu, wd = make_moe_inputs(t, k, e, h, i, seed=21)
    ids[3, 0] = -1
    routing = moe_align_block_size(ids.to(device), e, 8)
    slots = moe_permute(x.to(device), routing, k).cpu()  # [P_max, H], expert segments padded to 8
    offsets = routing.expert_offsets.cpu().tolist()
    y = torch.zeros(slots.shape[0], h)
    for expert in range(e):
        seg = slice(offsets[expert], offsets[expert + 1])
        gate_up = slots[seg] @ wgu[expert].T
        y[seg] = (F.silu(gate_up[:, :i]) * gate_up[:, i:]) @ wd[expert].T
    pairs = moe_unpermute(y.to(device), routing)
    out = moe_combine(pairs.view(t, k, h), ids.to(device), w.to(device), num_experts=e)
    torch.testing.assert_close(out.cpu(), fused_expert_ffn_torch(x, ids, w, wgu, wd), atol=1e-5, rtol=1e-5)
