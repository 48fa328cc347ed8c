"""Reading Hugging Face config.json files, checked against transformers' own config classes."""

from __future__ import annotations

import dataclasses

import pytest

from moeshard.core.architectures import PRESETS, architecture_from_hf_config
from moeshard.core.hf_config import ConfigError

transformers = pytest.importorskip("transformers")


def _same_shape(a, b):
    skip = {"name", "source"}
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.name not in skip} == {
        f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.name not in skip
    }


def test_qwen3_moe_config_matches_preset():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536, tie_word_embeddings=False,
    )
    assert _same_shape(architecture_from_hf_config(cfg.to_dict()), PRESETS["qwen3-235b-a22b"])


def test_mixtral_config_matches_preset():
    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    )
    assert _same_shape(architecture_from_hf_config(cfg.to_dict()), PRESETS["mixtral-8x7b"])


def test_deepseek_v3_config_matches_preset():
    cfg = transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    )
    assert _same_shape(architecture_from_hf_config(cfg.to_dict()), PRESETS["deepseek-v3"])


@pytest.mark.parametrize(
    "config, key",
    [
        ({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 8}, "model_type"),
        ({"model_type": "mixtral", "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 8}, "num_hidden_layers"),
        ({"model_type": "qwen3_moe", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
          "vocab_size": 8, "num_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 4}, "num_experts"),
    ],
)
def test_bad_config_names_the_key(config, key):
    with pytest.raises(ConfigError) as info:
        architecture_from_hf_config(config)
    assert info.value.key == key


@pytest.mark.parametrize("n_group, topk_group, groups", [(8, 4, 8), (8, 8, 1), (1, 1, 1)])
def test_deepseek_group_limited_routing_is_read(n_group, topk_group, groups):
    """Groups count only when routing is limited to some of them (topk_group < n_group)."""
    cfg = transformers.DeepseekV3Config(n_routed_experts=64, n_group=n_group, topk_group=topk_group).to_dict()
    assert architecture_from_hf_config(cfg).expert_groups == groups


@pytest.mark.parametrize("change, key", [({"n_group": 6}, "n_group"), ({"topk_group": 9}, "topk_group")])
def test_bad_deepseek_groups_name_the_key(change, key):
    cfg = {**transformers.DeepseekV3Config(n_routed_experts=64, n_group=8, topk_group=4).to_dict(), **change}
    with pytest.raises(ConfigError) as info:
        architecture_from_hf_config(cfg)
    assert info.value.key == key
