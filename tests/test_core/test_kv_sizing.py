"""KV sizing per rank (the torch-free facts the pool and the planner share)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from moeshard.core import kv_sizing
from moeshard.core.kv_sizing import (
    blocks_for_tokens,
    check_attention_tp,
    first_kv_head,
    kv_blocks_for_bytes,
    kv_bytes_per_token_per_rank,
    kv_heads_per_rank,
)


def test_qwen3_235b_at_tp8_replicates_its_four_kv_heads():
    # 94 layers, 64 query / 4 KV heads of 128, bf16: one KV head per rank, each on 2 ranks.
    assert kv_heads_per_rank(4, 8) == 1 and kv_heads_per_rank(4, 2) == 2
    assert [first_kv_head(64, 4, 8, r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [first_kv_head(64, 4, 2, r) for r in range(2)] == [0, 2]
    assert kv_bytes_per_token_per_rank(num_layers=94, num_kv_heads=4, head_dim=128, tp=8, dtype_bytes=2) == 48128
    assert kv_bytes_per_token_per_rank(num_layers=94, num_kv_heads=4, head_dim=128, tp=4, dtype_bytes=2) == 48128
    assert kv_bytes_per_token_per_rank(num_layers=94, num_kv_heads=4, head_dim=128, tp=2, dtype_bytes=2) == 96256


def test_blocks_and_tp_checks():
    assert kv_blocks_for_bytes(10_000, bytes_per_token=100, block_size=16) == 6
    assert blocks_for_tokens(0, 16) == 0 and blocks_for_tokens(17, 16) == 2
    check_attention_tp(64, 4, 8)
    with pytest.raises(ValueError, match="4 KV heads must divide one another"):
        check_attention_tp(48, 4, 6)
    with pytest.raises(ValueError, match="must divide the model.s 64 attention heads"):
        check_attention_tp(64, 4, 3)


def test_kv_sizing_imports_no_torch():
    tree = ast.parse(Path(kv_sizing.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.split(".")[0] == "torch" for name in names)
