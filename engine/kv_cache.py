"""The paged KV cache: a block allocator (rank 0's scheduler) and the pre-allocated pool (every rank).

Every rank of attention-DP group d holds one pool of ``num_blocks`` blocks of
``block_size`` tokens per decoder layer; a sequence's tokens live in the
blocks its block table lists (token at position p: block ``table[p // N]``,
offset ``p % N``). Rank 0 allocates blocks for every DP group
(:class:`BlockPool`, pure Python, one per DP group) and broadcasts the tables
with each step's plan, so all ranks agree without further messages.

Shape legend: N block size (tokens), Hkv KV heads on this rank, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moeshard.core.kv_sizing import blocks_for_tokens

DEFAULT_BLOCK_SIZE = 16


class BlockPool:
    """Free-list allocator of one DP group's KV blocks; block ids are 0..num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def extra_blocks(self, table: list[int], tokens: int) -> int:
        """Blocks a table must gain to hold ``tokens`` tokens."""
        return max(0, blocks_for_tokens(tokens, self.block_size) - len(table))

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend ``table`` in place to hold ``tokens`` tokens; False (table unchanged) when blocks run out."""
        need = self.extra_blocks(table, tokens)
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, table: list[int]) -> None:
        """Return a table's blocks to the pool and empty it."""
        self._free.extend(reversed(table))
        table.clear()


@dataclass(frozen=True)
class KVPoolShape:
    """The pool of one rank: L layers x [num_blocks, N, Hkv, D]."""

    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int


class PagedKVCache:
    """Per-rank K and V pools, allocated once: ``k[layer]``, ``v[layer]`` [num_blocks, N, Hkv, D]."""

    def __init__(self, shape: KVPoolShape, dtype: torch.dtype, device: torch.device) -> None:
        dims = (shape.num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
        self.shape = shape
        self.k = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.v = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's keys/values k, v [T, Hkv, D] at flat slots [T] (block * N + offset)."""
        n = self.shape.num_blocks * self.shape.block_size
        self.k[layer].view(n, self.shape.kv_heads, self.shape.head_dim)[slots] = k
        self.v[layer].view(n, self.shape.kv_heads, self.shape.head_dim)[slots] = v
