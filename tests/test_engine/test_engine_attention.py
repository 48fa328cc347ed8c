"""Attention of one rank: fused SDPA on the un-widened KV cache under the ragged causal mask.

Checked against a per-sequence reference that widens the KV heads and runs an
explicit softmax, for a step that mixes a prefill, a decode and a chunk after
a cached prefix (past_lens / new_lens differ per sequence), with and without
a sliding window.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moeshard.engine import model as model_mod
from moeshard.engine.config import ModelConfig
from moeshard.engine.model import Attention, KVCache, StepBatch, attention_mask, rope_cos_sin

HQ, HKV, D, H = 4, 2, 8, 16


def _cfg(sliding_window: int | None) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3_moe", vocab_size=32, hidden_size=H, num_layers=1, num_attention_heads=HQ,
        num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-6, rope_theta=10000.0, num_experts=4, top_k=2,
        expert_intermediate_size=8, norm_topk_prob=True, moe_layer_ids=(0,), dense_intermediate_size=8,
        qk_norm=False, attention_bias=False, sliding_window=sliding_window, tie_word_embeddings=False,
    )


def _attention(cfg: ModelConfig) -> Attention:
    g = torch.Generator().manual_seed(0)
    w = {f"{n}_proj": torch.randn(rows, H, generator=g) * 0.3
         for n, rows in (("q", HQ * D), ("k", HKV * D), ("v", HKV * D))}
    w["o_proj"] = torch.randn(H, HQ * D, generator=g) * 0.3
    groups = SimpleNamespace(parallel=SimpleNamespace(tp_size=1), tp_all_reduce=lambda x: x)
    return Attention(cfg, w, groups, layer=0)


def _reference(att: Attention, x, step: StepBatch, cache: KVCache, cos, sin, window) -> torch.Tensor:
    """Per sequence: widened KV heads, explicit float32 softmax over its valid causal keys."""
    w, out, start = att.w, [], 0
    for b in range(step.new_lens.numel()):
        n, past, row = int(step.new_lens[b]), int(step.past_lens[b]), int(step.cache_rows[b])
        xs = x[start:start + n]
        c, s = cos[start:start + n, None], sin[start:start + n, None]
        q = F.linear(xs, w["q_proj"]).view(n, HQ, D)
        q = q * c + model_mod.rotate_half(q) * s
        keys = cache.k[0][row, :, :past + n].repeat_interleave(HQ // HKV, dim=0)  # [Hq, S, D]
        vals = cache.v[0][row, :, :past + n].repeat_interleave(HQ // HKV, dim=0)
        scores = torch.einsum("thd,hsd->hts", q, keys) * D ** -0.5
        qpos = past + torch.arange(n)[:, None]
        kpos = torch.arange(past + n)[None, :]
        ok = kpos <= qpos
        if window is not None:
            ok &= kpos > qpos - window
        probs = scores.masked_fill(~ok, float("-inf")).softmax(-1)
        out.append(torch.einsum("hts,hsd->thd", probs, vals).reshape(n, HQ * D))
        start += n
    return F.linear(torch.cat(out), w["o_proj"])


@pytest.mark.parametrize("window", [None, 3])
def test_fused_attention_matches_reference_on_ragged_step(monkeypatch, window):
    cfg = _cfg(window)
    att = _attention(cfg)
    # Rows 2, 0, 3 of a 4-row cache: a 5-token prefill, a decode after 6 tokens, 3 tokens after 4.
    step = StepBatch(cache_rows=torch.tensor([2, 0, 3]), past_lens=torch.tensor([0, 6, 4]),
                     new_lens=torch.tensor([5, 1, 3]), tokens=torch.zeros(9, dtype=torch.int64),
                     token_keys=torch.arange(9))
    cache = KVCache(1, 4, HKV, 12, D, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for b in range(3):  # the cached prefix of each sequence
        row, past = int(step.cache_rows[b]), int(step.past_lens[b])
        cache.k[0][row, :, :past] = torch.randn(HKV, past, D, generator=g)
        cache.v[0][row, :, :past] = torch.randn(HKV, past, D, generator=g)
    x = torch.randn(9, H, generator=g)
    coords = step.token_coords()
    cos, sin = rope_cos_sin(step.past_lens[coords[0]] + coords[1], 1.0 / 10000 ** (torch.arange(0, D, 2) / D),
                            torch.float32)

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    got = att.forward(x, step, cache, cos, sin, coords)
    # One fused call per layer on the KV heads as cached (no repeat to Hq, keys [B, Hkv, S_kv, D]),
    # the G = Hq / Hkv query heads of each KV head folded into the query axis: [B, Hkv, G * S_q, D].
    assert calls == [((3, HKV, 2 * 5, D), (3, HKV, 7, D), (3, HKV, 7, D))]
    want = _reference(att, x, step, cache, cos, sin, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_mask_causal_ragged_and_padded():
    # Sequence 0: 2 new tokens after 1 cached; sequence 1: 1 new token (decode) after 2 cached.
    mask = attention_mask(torch.tensor([1, 2]), torch.tensor([2, 1]), s_q=2, s_kv=3, sliding_window=None)
    assert mask.shape == (2, 1, 2, 3)
    assert mask[0, 0].tolist() == [[True, True, False], [True, True, True]]
    # The padded query of sequence 1 sees key 0 only (never an empty softmax row).
    assert mask[1, 0].tolist() == [[True, True, True], [True, False, False]]
    windowed = attention_mask(torch.tensor([1, 2]), torch.tensor([2, 1]), s_q=2, s_kv=3, sliding_window=2)
    assert windowed[0, 0].tolist() == [[True, True, False], [False, True, True]]
