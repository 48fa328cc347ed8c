"""Attention over the paged KV cache for a packed varlen batch (decode tokens and prefill chunks mixed).

Design note: which attention reads the pool, and why.

* CPU (and the oracle in tests): :func:`paged_attention_torch`. Per sequence,
  its blocks are gathered through the block table (one index_select of its own
  keys, never the whole batch padded) and fed to SDPA with ``enable_gqa``: the
  causal mask is [S_q, S_kv] per sequence, broadcast over heads, never widened
  G times; decode tokens (S_q = 1, no window) need no mask at all.
* CUDA: :func:`paged_attention_flex`, PyTorch's own ``flex_attention``. It
  reads the pool in place: the whole pool is viewed as one key sequence
  [1, Hkv, num_blocks * N, D] and a ``mask_mod`` maps each physical slot to its
  (sequence, logical position) through the block tables; ``create_block_mask``
  marks the 128-slot tiles that hold none of a query's blocks empty, so the
  fused kernel skips them. GQA is native (``enable_gqa``). Chosen over
  FlashInfer because it ships with the pinned torch (no second CUDA build to
  match to torch 2.13 and the driver), is compiled by Triton like our kernels,
  and its eager fallback runs on CPU, so the same code is tested here against
  the torch path (tests/test_engine/test_paged_attention.py). Cost: the block
  mask is built once per step and reused by every layer; it is O(T x pool
  tiles), fine for decode-heavy steps; FlashInfer's paged kernels are the
  upgrade path if mask building shows in profiles.

Shape legend: T packed tokens of this rank's sequences, B sequences, Hq / Hkv
local query / KV heads, D head dim, N block size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class PagedMetadata:
    """Where the step's tokens sit: built once per step, read by every layer.

    query_starts [B + 1] and kv_lens [B] are host ints (kv_lens counts the
    cached tokens after this step's are written). block_tables [B][*] lists
    each sequence's blocks; slots [T] is each new token's flat pool slot.
    """

    query_starts: list[int]
    kv_lens: list[int]
    block_tables: list[list[int]]
    slots: torch.Tensor
    positions: torch.Tensor  # [T] absolute position of each token
    block_size: int
    sliding_window: int | None = None
    seq_blocks: list[torch.Tensor] = field(default_factory=list)
    flex_mask: Any = None  # the step's flex_attention BlockMask, built on first use

    def __post_init__(self) -> None:
        if not self.seq_blocks:
            device = self.slots.device
            n = self.block_size
            self.seq_blocks = [torch.tensor(table[: -(-kv // n)], dtype=torch.int64, device=device)
                               for table, kv in zip(self.block_tables, self.kv_lens)]


def causal_mask(past: int, s_q: int, s_kv: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """[S_q, S_kv] bool: query i (position past + i) sees keys at positions <= its own (within the window)."""
    q_pos = past + torch.arange(s_q, device=device)[:, None]
    k_pos = torch.arange(s_kv, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def paged_attention_torch(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedMetadata,
                          scale: float) -> torch.Tensor:
    """q [T, Hq, D], pools [num_blocks, N, Hkv, D] -> [T, Hq, D]. The oracle; loops over the B sequences."""
    out = torch.empty_like(q)
    for b, blocks in enumerate(meta.seq_blocks):
        start, stop, kv = meta.query_starts[b], meta.query_starts[b + 1], meta.kv_lens[b]
        if stop == start:
            continue
        s_q = stop - start
        keys = cache_k.index_select(0, blocks).flatten(0, 1)[:kv].transpose(0, 1)  # [Hkv, S_kv, D]
        vals = cache_v.index_select(0, blocks).flatten(0, 1)[:kv].transpose(0, 1)
        mask = None
        if s_q > 1 or (meta.sliding_window is not None and kv > meta.sliding_window):
            mask = causal_mask(kv - s_q, s_q, kv, meta.sliding_window, q.device)
        o = F.scaled_dot_product_attention(q[start:stop].transpose(0, 1)[None], keys[None], vals[None],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:stop] = o[0].transpose(0, 1)
    return out


def _flex_block_mask(meta: PagedMetadata, num_blocks: int, device: torch.device):
    """The step's BlockMask over (packed queries) x (every pool slot)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = meta.block_size
    t = meta.query_starts[-1]
    q_seq = torch.repeat_interleave(torch.arange(len(meta.kv_lens), device=device),
                                    torch.tensor([meta.query_starts[b + 1] - meta.query_starts[b]
                                                  for b in range(len(meta.kv_lens))], device=device),
                                    output_size=t)
    logical = torch.full((len(meta.kv_lens), num_blocks), -1, dtype=torch.int64, device=device)
    for b, blocks in enumerate(meta.seq_blocks):
        logical[b, blocks] = torch.arange(blocks.numel(), device=device)
    q_pos, window = meta.positions, meta.sliding_window

    def mask_mod(_b, _h, q_idx, kv_idx):
        block = logical[q_seq[q_idx], kv_idx // n]
        pos = block * n + kv_idx % n
        ok = (block >= 0) & (pos <= q_pos[q_idx])
        if window is not None:
            ok = ok & (pos > q_pos[q_idx] - window)
        return ok

    return create_block_mask(mask_mod, 1, None, t, num_blocks * n, device=device)


def paged_attention_flex(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedMetadata,
                         scale: float) -> torch.Tensor:
    """q [T, Hq, D], pools [num_blocks, N, Hkv, D] -> [T, Hq, D] with flex_attention reading the pool in place."""
    num_blocks, n, hkv, d = cache_k.shape
    if meta.flex_mask is None:
        meta.flex_mask = _flex_block_mask(meta, num_blocks, q.device)
    keys = cache_k.view(1, num_blocks * n, hkv, d).transpose(1, 2)  # [1, Hkv, slots, D]: a view
    vals = cache_v.view(1, num_blocks * n, hkv, d).transpose(1, 2)
    kernel = _flex_kernel(q.is_cuda)
    out = kernel(q.transpose(0, 1)[None], keys, vals, block_mask=meta.flex_mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


_COMPILED: list[Any] = []


def _flex_kernel(compiled: bool):
    """flex_attention, compiled into one fused Triton kernel on CUDA (eager elsewhere, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if not _COMPILED:
        _COMPILED.append(torch.compile(flex_attention, dynamic=True))
    return _COMPILED[0]


def paged_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: PagedMetadata,
                    scale: float) -> torch.Tensor:
    """The fused flex path on CUDA, the torch path elsewhere (see the module's design note)."""
    if q.is_cuda:
        return paged_attention_flex(q, cache_k, cache_v, meta, scale)
    return paged_attention_torch(q, cache_k, cache_v, meta, scale)
