"""One config.json reader for both planes: the planner's catalog entry and the engine's ModelConfig agree."""

from __future__ import annotations

import pytest

from moeshard.core.architectures import architecture_from_hf_config
from moeshard.core.hf_config import ConfigError, read_hf_config
from moeshard.engine.config import ModelConfig, ModelConfigError

QWEN = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "intermediate_size": 48, "mlp_only_layers": [0], "eos_token_id": [5, 6]}


def test_planner_and_engine_read_the_same_figures():
    arch = architecture_from_hf_config(QWEN)
    engine = ModelConfig.from_dict(QWEN)
    assert (arch.num_experts, arch.top_k, arch.expert_intermediate_size, arch.num_kv_heads, arch.head_dim) == (
        engine.num_experts, engine.top_k, engine.expert_intermediate_size, engine.num_kv_heads, engine.head_dim)
    # Qwen3 mlp_only_layers: served by the engine as dense layers, sized by the planner as dense layers.
    assert engine.moe_layer_ids == (1, 2, 3)
    assert arch.moe_layers == engine.num_moe_layers == 3
    assert arch.dense_intermediate_size == 48
    assert engine.eos_token_id == (5, 6)


def test_quantized_checkpoint_is_read_but_refused_by_the_engine():
    raw = QWEN | {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert read_hf_config(raw).quantization == "fp8"
    with pytest.raises(ModelConfigError, match=r"quantization_config \(quant_method 'fp8'\)"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("patch,key", [
    ({"num_experts_per_tok": True}, "num_experts_per_tok"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"mlp_only_layers": [0, 1, 2, 3]}, "num_hidden_layers"),
])
def test_reader_names_the_key(patch, key):
    with pytest.raises(ConfigError) as info:
        read_hf_config(QWEN | patch)
    assert info.value.key == key
