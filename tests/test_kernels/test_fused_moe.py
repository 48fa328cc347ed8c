"""Fused expert FFN: Triton vs twin vs a naive reference, edge cases, launcher errors.

Tolerances (outputs are O(1)): float32 atol=rtol=1e-4 (accumulation order
only); float16 atol=rtol=2e-2 (Triton rounds once per GEMM chain from a
float32 accumulator, the twin rounds gate/up and the activation to float16
in between).
"""

import pytest
import torch

from moeshard.kernels.fused_moe import fused_expert_ffn, fused_expert_ffn_torch
from moeshard.kernels.launch_config import LaunchConfig
from support.moe_reference import make_moe_inputs, naive_expert_ffn

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


def triton_vs_twin(inputs, device, config, *, apply_weights=True):
    ref = fused_expert_ffn_torch(*inputs, apply_weights=apply_weights)
    tri = fused_expert_ffn(*(a.to(device) for a in inputs), apply_weights=apply_weights, config=config)
    assert tri.dtype == ref.dtype and tri.shape == ref.shape
    torch.testing.assert_close(tri.cpu(), ref, **TOL[ref.dtype])
    return ref


# ----------------------------------------------------------------- twin vs naive reference


@pytest.mark.parametrize("gemms", ["grouped_mm", "loop"])
@pytest.mark.parametrize("apply_weights", [True, False])
def test_twin_matches_naive_reference(twin_only, gemms, apply_weights):
    inputs = make_moe_inputs(7, 2, 4, 24, 20, seed=1)
    inputs[1][2, 1] = -1
    ref = naive_expert_ffn(*inputs, apply_weights=apply_weights)
    out = fused_expert_ffn_torch(*inputs, apply_weights=apply_weights, gemms=gemms)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_twin_gemm_strategies_agree(twin_only):
    inputs = make_moe_inputs(19, 3, 6, 32, 16, seed=2)
    a = fused_expert_ffn_torch(*inputs, gemms="grouped_mm")
    b = fused_expert_ffn_torch(*inputs, gemms="loop")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_public_entry_uses_twin_on_cpu(twin_only):
    inputs = make_moe_inputs(5, 2, 3, 16, 16, seed=3)
    assert torch.equal(fused_expert_ffn(*inputs), fused_expert_ffn_torch(*inputs))


# ----------------------------------------------------------------- Triton vs twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_twin(force_triton, device, tiny_config, dtype):
    # T=13 (not a power of two), H=40 and I=24 (not multiples of the 16 block).
    inputs = make_moe_inputs(13, 2, 4, 40, 24, dtype=dtype, seed=4)
    triton_vs_twin(inputs, device, tiny_config)


def test_triton_without_weights(force_triton, device, tiny_config):
    triton_vs_twin(make_moe_inputs(6, 2, 3, 16, 16, seed=5), device, tiny_config, apply_weights=False)


def test_split_k_down_gemm(force_triton, device):
    config = LaunchConfig(block_m=16, block_n=16, block_k=16, group_m=1, split_k=3)
    triton_vs_twin(make_moe_inputs(9, 2, 3, 24, 40, seed=6), device, config)


def test_group_m_larger_than_blocks(force_triton, device):
    config = LaunchConfig(block_m=16, block_n=16, block_k=32, group_m=8)
    triton_vs_twin(make_moe_inputs(21, 2, 3, 16, 48, seed=7), device, config)


def test_non_contiguous_weights(force_triton, device, tiny_config):
    x, ids, w, wgu, wd = make_moe_inputs(5, 2, 3, 16, 16, seed=8)
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides swapped
    triton_vs_twin((x, ids, w, wgu, wd_t), device, tiny_config)


# ----------------------------------------------------------------- routing edge cases


def test_expert_with_no_tokens(force_triton, device, tiny_config):
    ids = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 3]])  # expert 1 gets nothing
    triton_vs_twin(make_moe_inputs(4, 2, 4, 16, 16, ids=ids, seed=9), device, tiny_config)


def test_every_token_to_one_expert(force_triton, device, tiny_config):
    ids = torch.full((20, 1), 1)  # 20 rows: one full block and one ragged
    ref = triton_vs_twin(make_moe_inputs(20, 1, 3, 16, 16, ids=ids, seed=10), device, tiny_config)
    assert ref.abs().sum() > 0


def test_single_token(force_triton, device, tiny_config):
    triton_vs_twin(make_moe_inputs(1, 2, 5, 24, 16, seed=11), device, tiny_config)


def test_top1(force_triton, device, tiny_config):
    triton_vs_twin(make_moe_inputs(11, 1, 4, 16, 24, seed=12), device, tiny_config)


def test_masked_pairs_contribute_zero(force_triton, device, tiny_config):
    x, ids, w, wgu, wd = make_moe_inputs(6, 2, 3, 16, 16, seed=13)
    ids[0] = -1  # token 0: no local expert
    ids[1, 0] = -1
    out = triton_vs_twin((x, ids, w, wgu, wd), device, tiny_config)
    assert bool((out[0] == 0).all())
    # Token 1 equals its single live pair computed alone.
    alone = fused_expert_ffn_torch(x[1:2], ids[1:2, 1:], w[1:2, 1:], wgu, wd)
    torch.testing.assert_close(out[1:2], alone, atol=1e-6, rtol=1e-6)


def test_all_masked_returns_zeros(force_triton, device, tiny_config):
    x, ids, w, wgu, wd = make_moe_inputs(3, 2, 3, 16, 16, seed=14)
    ids = torch.full_like(ids, -1)
    for fn in (fused_expert_ffn, fused_expert_ffn_torch):
        out = fn(x.to(device), ids.to(device), w.to(device), wgu.to(device), wd.to(device))
        assert out.shape == (3, 16) and bool((out == 0).all())


def test_zero_tokens_returns_empty(force_triton, device):
    x, ids, w, wgu, wd = make_moe_inputs(0, 2, 3, 16, 16, seed=15)
    for fn in (fused_expert_ffn, fused_expert_ffn_torch):
        out = fn(x.to(device), ids.to(device), w.to(device), wgu.to(device), wd.to(device))
        assert out.shape == (0, 16) and out.dtype == torch.float32


# ----------------------------------------------------------------- launcher errors


def _bad_inputs():
    x, ids, w, wgu, wd = make_moe_inputs(4, 2, 3, 16, 8, seed=16)
    return [
        ((x[0], ids, w, wgu, wd), r"x must be \[T, H\].*\(16,\)"),
        ((x, ids[:3], w, wgu, wd), r"topk_ids must be \[T, K\] with T=4.*\(3, 2\)"),
        ((x, ids, w[:, :1], wgu, wd), r"topk_weights.*\(4, 1\)"),
        ((x, ids, w, wgu[:, :, :8], wd), r"w_gate_up must be \[E, 2I, H\] with H=16.*\(3, 16, 8\)"),
        ((x, ids, w, wgu[:, :15], wd), r"w_gate_up.*\(3, 15, 16\)"),
        ((x, ids, w, wgu, wd[:, :, :4]), r"w_down must be \[E, H, I\] = \[3, 16, 8\].*\(3, 16, 4\)"),
        ((x.double(), ids, w, wgu.double(), wd.double()), "float16/bfloat16/float32"),
        ((x, ids, w, wgu.half(), wd), "weights must have x's dtype"),
        ((x, ids.float(), w, wgu, wd), "int64 or int32"),
        ((x, ids, ids, wgu, wd), "topk_weights must be floating point"),
        ((x, ids, w, wgu, torch.empty((3, 16, 8), device="meta")), "one device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_launcher_rejects_bad_inputs(force_triton, case):
    args, match = _bad_inputs()[case]
    for fn in (fused_expert_ffn, fused_expert_ffn_torch):
        with pytest.raises(ValueError, match=match):
            fn(*args)


def test_twin_rejects_unknown_gemm_strategy(twin_only):
    with pytest.raises(ValueError, match="gemms must be one of"):
        fused_expert_ffn_torch(*make_moe_inputs(2, 1, 2, 16, 16), gemms="cublas")


# ----------------------------------------------------------------- twin's expert runs


@pytest.mark.parametrize(
    "counts,max_rows,runs",
    [
        ([3, 0, 2, 4], 100, [(0, 4, 0, 9)]),
        ([3, 0, 2, 4], 5, [(0, 3, 0, 5), (3, 4, 5, 9)]),
        ([0, 7, 0, 0, 1], 4, [(1, 2, 0, 7), (4, 5, 7, 8)]),  # one expert over the budget runs alone
        ([2, 2, 2], 1, [(0, 1, 0, 2), (1, 2, 2, 4), (2, 3, 4, 6)]),
        ([0, 0], 8, []),
    ],
)
def test_expert_runs(counts, max_rows, runs):
    from moeshard.kernels.fused_moe import expert_runs

    assert expert_runs(counts, max_rows) == runs


def test_twin_with_many_small_runs(twin_only, monkeypatch):
    import moeshard.kernels.fused_moe as fm

    inputs = make_moe_inputs(23, 2, 5, 16, 16, seed=17)
    whole = fm.fused_expert_ffn_torch(*inputs)
    monkeypatch.setattr(fm, "TWIN_RUN_ELEMENTS", 3 * (16 + 32))  # runs of about 3 rows
    torch.testing.assert_close(fm.fused_expert_ffn_torch(*inputs), whole, atol=1e-6, rtol=1e-6)


def test_triton_many_pairs_wider_tiles(force_triton, device):
    # 140 pairs span two alignment chunks; 32-wide tiles with several K steps.
    config = LaunchConfig(block_m=32, block_n=32, block_k=32, group_m=4)
    triton_vs_twin(make_moe_inputs(70, 2, 6, 80, 72, dtype=torch.float16, seed=18), device, config)


def test_triton_launcher_runs_without_the_env_switch(twin_only, device, tiny_config):
    from moeshard.kernels.fused_moe import fused_expert_ffn_triton

    inputs = make_moe_inputs(5, 2, 3, 16, 16, seed=19)
    out = fused_expert_ffn_triton(*(a.to(device) for a in inputs), config=tiny_config)
    torch.testing.assert_close(out.cpu(), fused_expert_ffn_torch(*inputs), **TOL[torch.float32])


@pytest.mark.parametrize("hint", [-1, 11])
def test_live_pair_hint_is_checked(force_triton, hint):
    with pytest.raises(ValueError, match=r"num_live_pairs must be in \[0, T\*K = 10\]"):
        fused_expert_ffn(*make_moe_inputs(5, 2, 3, 16, 16), num_live_pairs=hint)
