"""Compiled Triton kernels in bf16 against the twin (the interpreter's tl.dot is wrong on bf16)."""

import pytest
import torch

from moeshard.kernels.fused_moe import fused_expert_ffn_torch, fused_expert_ffn_triton
from moeshard.kernels.launch_config import BUCKETS, DEFAULT_TABLE
from support.moe_reference import make_moe_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("bucket", BUCKETS)
def test_bf16_triton_matches_twin(bucket):
    # Qwen3 EP32-like rank: 4 local experts; H, I not multiples of the large tiles.
    t, k, e, h, i = 300, 2, 4, 1000, 392
    inputs = make_moe_inputs(t, k, e, h, i, dtype=torch.bfloat16, seed=1)
    inputs[1][7, 1] = -1
    cuda = [a.cuda() for a in inputs]
    ref = fused_expert_ffn_torch(*[a.float() if a.is_floating_point() else a for a in cuda]).float()
    out = fused_expert_ffn_triton(*cuda, config=DEFAULT_TABLE.configs[bucket]).float()
    # bf16 inputs, fp32 accumulation on both sides; bf16 rounding of act and output.
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def test_bf16_split_k():
    from moeshard.kernels.launch_config import LaunchConfig

    inputs = make_moe_inputs(40, 8, 16, 512, 256, dtype=torch.bfloat16, seed=2)
    cuda = [a.cuda() for a in inputs]
    ref = fused_expert_ffn_torch(*[a.float() if a.is_floating_point() else a for a in cuda]).float()
    out = fused_expert_ffn_triton(*cuda, config=LaunchConfig(16, 64, 64, split_k=4)).float()
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
