"""Combine (float32 sums of the top-K expert outputs): Triton vs twin."""

import pytest
import torch

from moeshard.kernels.moe_align import moe_align_block_size_torch
from moeshard.kernels.moe_combine import moe_combine, moe_combine_torch
from support.moe_reference import distinct_topk


def _routing(t, k, e, block_m, seed=0, masked=()):
    g = torch.Generator().manual_seed(seed)
    ids = distinct_topk(t, k, e, g)
    for tk in masked:
        ids[tk] = -1
    return ids, moe_align_block_size_torch(ids, e, block_m)


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
