"""Attention over the paged KV cache: the torch path (the oracle) and the flex_attention path.

A step mixes a prefill, a decode and a chunk after a cached prefix, whose
blocks are scattered over the pool in no particular order. Both paths are
checked against a per-sequence reference that widens the KV heads and runs an
explicit softmax, with and without a sliding window; the flex path runs
eagerly on CPU here (compiled on CUDA).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from moeshard.engine.kv_cache import BlockPool, KVPoolShape, PagedKVCache
from moeshard.engine.paged_attention import (
    PagedMetadata,
    causal_mask,
    paged_attention_flex,
    paged_attention_torch,
)

HQ, HKV, D, N = 4, 2, 8, 4
# (cached tokens before the step, tokens in the step): a chunk after a prefix, a decode, a fresh prefill.
SEQUENCES = [(5, 3), (9, 1), (0, 6)]


def _step(window: int | None):
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(KVPoolShape(1, 16, N, HKV, D), torch.float32, torch.device("cpu"))
    order = torch.randperm(16, generator=g).tolist()  # scattered block ids
    tables, slots, positions, starts, kv_lens = [], [], [], [0], []
    for past, new in SEQUENCES:
        total = past + new
        table = [order.pop() for _ in range(-(-total // N))]
        tables.append(table)
        # the cached prefix is already in the pool
        for p in range(past):
            cache.k[0][table[p // N], p % N] = torch.randn(HKV, D, generator=g)
            cache.v[0][table[p // N], p % N] = torch.randn(HKV, D, generator=g)
        slots += [table[p // N] * N + p % N for p in range(past, total)]
        positions += range(past, total)
        starts.append(starts[-1] + new)
        kv_lens.append(total)
    t = starts[-1]
    k_new, v_new = torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
    meta = PagedMetadata(starts, kv_lens, tables, torch.tensor(slots), torch.tensor(positions), N, window)
    cache.write(0, meta.slots, k_new, v_new)
    return cache, meta, torch.randn(t, HQ, D, generator=g)


def _reference(cache: PagedKVCache, meta: PagedMetadata, q: torch.Tensor) -> torch.Tensor:
    out = []
    for b, table in enumerate(meta.block_tables):
        start, stop, kv = meta.query_starts[b], meta.query_starts[b + 1], meta.kv_lens[b]
        keys = torch.stack([cache.k[0][table[p // N], p % N] for p in range(kv)], 1)  # [Hkv, S, D]
        vals = torch.stack([cache.v[0][table[p // N], p % N] for p in range(kv)], 1)
        keys, vals = keys.repeat_interleave(HQ // HKV, 0), vals.repeat_interleave(HQ // HKV, 0)
        scores = torch.einsum("thd,hsd->hts", q[start:stop], keys) * D ** -0.5
        ok = causal_mask(kv - (stop - start), stop - start, kv, meta.sliding_window, q.device)
        probs = scores.masked_fill(~ok, float("-inf")).softmax(-1)
        out.append(torch.einsum("hts,hsd->thd", probs, vals))
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 3])
def test_torch_path_matches_reference_through_scattered_blocks(window):
    cache, meta, q = _step(window)
    got = paged_attention_torch(q, cache.k[0], cache.v[0], meta, D ** -0.5)
    torch.testing.assert_close(got, _reference(cache, meta, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_flex_path_reads_the_pool_in_place_and_matches(window):
    cache, meta, q = _step(window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs unfused on CPU
        got = paged_attention_flex(q, cache.k[0], cache.v[0], meta, D ** -0.5)
    torch.testing.assert_close(got, paged_attention_torch(q, cache.k[0], cache.v[0], meta, D ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_causal_mask_with_window():
    assert causal_mask(1, 2, 3, None, torch.device("cpu")).tolist() == [[True, True, False], [True, True, True]]
    assert causal_mask(1, 2, 3, 2, torch.device("cpu")).tolist() == [[True, True, False], [False, True, True]]


def test_block_pool_grows_releases_and_refuses_without_change():
    pool = BlockPool(4, block_size=N)
    table: list[int] = []
    assert pool.grow(table, 5) and table == [0, 1] and pool.free == 2
    assert pool.grow(table, 8) and table == [0, 1]  # still fits in two blocks
    other: list[int] = []
    assert pool.grow(other, 1) and other == [2] and pool.free == 1
    assert not pool.grow(table, 13) and table == [0, 1]  # needs 2 more blocks, 1 is free: unchanged
    pool.release(other)
    assert pool.grow(table, 16) and len(table) == 4 and pool.free == 0
    pool.release(table)
    assert pool.free == 4 and table == []
