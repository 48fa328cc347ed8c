"""Token-count buckets: thresholds, table files, lookup, and every bucket run end to end."""

import json

import pytest
import torch

import moeshard.kernels.fused_moe as fused_moe
from moeshard.kernels.launch_config import (
    BUCKETS,
    CONFIG_DIR_ENV,
    DEFAULT_TABLE,
    BucketTable,
    LaunchConfig,
    config_file_name,
    load_config_table,
    select_launch_config,
    tokens_per_expert,
    write_config_table,
)
from support.moe_reference import make_moe_inputs


@pytest.mark.parametrize("m,bucket", [(1, "small"), (32, "small"), (33, "medium"), (256, "medium"), (257, "large")])
def test_default_thresholds(m, bucket):
    assert DEFAULT_TABLE.bucket(m) == bucket


def test_tokens_per_expert_rounds_up():
    assert tokens_per_expert(0, 4) == 0
    assert tokens_per_expert(9, 4) == 3
    assert tokens_per_expert(8, 4) == 2


def test_defaults_when_no_table(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    assert select_launch_config(16 * 8, 8, 1536, "No Such GPU") == ("small", DEFAULT_TABLE.configs["small"])
    assert select_launch_config(2048 * 8, 8, 1536, "No Such GPU") == ("large", DEFAULT_TABLE.configs["large"])


def test_table_round_trip(tmp_path):
    path = write_config_table(tmp_path / "t.json", DEFAULT_TABLE, meta={"note": "x"})
    assert load_config_table(path) == DEFAULT_TABLE
    assert config_file_name(16, 1536, "NVIDIA H200") == "E=16,I=1536,device=NVIDIA_H200.json"


def _table(small_m=16, medium_m=32, large_m=64, **thresholds):
    return BucketTable(
        small_max_tokens_per_expert=thresholds.get("small", 2),
        medium_max_tokens_per_expert=thresholds.get("medium", 5),
        configs={
            "small": LaunchConfig(small_m, 16, 16, group_m=1, split_k=2),
            "medium": LaunchConfig(medium_m, 16, 16, group_m=2),
            "large": LaunchConfig(large_m, 16, 32, group_m=4),
        },
    )


@pytest.mark.parametrize(
    "data,match",
    [
        ({"configs": {}}, r"lacks bucket\(s\) \['small', 'medium', 'large'\]"),
        ({"configs": {"huge": {}}}, r"unknown bucket\(s\) \['huge'\]"),
        ({"configs": {b: {"block_m": 16, "block_n": 16} for b in BUCKETS}}, r"configs\.small.*block_k"),
        ({"configs": {b: {"block_m": 24, "block_n": 16, "block_k": 16} for b in BUCKETS}}, "block_m must be a power of two"),
        ({"configs": {b: {"block_m": 16, "block_n": 16, "block_k": 16, "warps": 4} for b in BUCKETS}}, r"unknown field\(s\) \['warps'\]"),
        ({"small_max_tokens_per_expert": 300, "configs": {b: {"block_m": 16, "block_n": 16, "block_k": 16} for b in BUCKETS}}, "thresholds"),
        ([], "expected an object"),
    ],
)
def test_bad_tables_name_the_field(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_config_table(path)


def test_not_json_is_a_value_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config_table(path)


def test_launch_config_rejects_bad_knobs():
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        LaunchConfig(16, 16, 16, split_k=0)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        LaunchConfig(16, 8, 16)


def test_every_bucket_runs_through_table_lookup(force_triton, device, monkeypatch, tmp_path):
    """The table in MOESHARD_KERNEL_CONFIG_DIR drives each call's tiles, bucket by bucket."""
    e, h, i, k = 3, 24, 16, 2
    dev_name = fused_moe.device_name(torch.device(device))
    write_config_table(tmp_path / config_file_name(e, i, dev_name), _table())
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    used_block_m = []
    real_align = fused_moe.moe_align_block_size_triton

    def spy(topk_ids, num_experts, block_m):
        used_block_m.append(block_m)
        return real_align(topk_ids, num_experts, block_m)

    monkeypatch.setattr(fused_moe, "moe_align_block_size_triton", spy)
    expected = {"small": 16, "medium": 32, "large": 64}
    # T*K/E = 2, 4, 10 tokens per expert -> small, medium, large.
    for t, bucket in ((3, "small"), (6, "medium"), (15, "large")):
        assert fused_moe.expert_ffn_launch_config(t * k, e, i, device)[0] == bucket
        inputs = make_moe_inputs(t, k, e, h, i, seed=t)
        out = fused_moe.fused_expert_ffn(*(a.to(device) for a in inputs))
        torch.testing.assert_close(out.cpu(), fused_moe.fused_expert_ffn_torch(*inputs), atol=1e-4, rtol=1e-4)
        assert used_block_m[-1] == expected[bucket]
    # The live-pair hint moves a call whose ids are mostly -1 into the bucket of its real load.
    x, ids, w, wgu, wd = make_moe_inputs(15, k, e, h, i, seed=99)
    ids[:, 1] = -1
    ids[5:] = -1
    live = int((ids >= 0).sum())
    assert fused_moe.expert_ffn_launch_config(live, e, i, device)[0] == "small"
    out = fused_moe.fused_expert_ffn(*(a.to(device) for a in (x, ids, w, wgu, wd)), num_live_pairs=live)
    assert used_block_m[-1] == 16
    torch.testing.assert_close(out.cpu(), fused_moe.fused_expert_ffn_torch(x, ids, w, wgu, wd), atol=1e-4, rtol=1e-4)
