"""Quantized (FP8, GPTQ, ...) checkpoints are refused with one line naming the config key, never loaded as floats."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeshard.engine.config import ModelConfig, ModelConfigError
from moeshard.engine.loading import CheckpointError, CheckpointReader

FAKE_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


@pytest.fixture
def fp8_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny Qwen3-MoE checkpoint with a DeepSeek/Qwen-style fp8 quantization_config and fp8 expert weights."""
    src = tiny_checkpoint("qwen3_moe")
    dst = tmp_path / "fp8"
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["quantization_config"] = FAKE_FP8
    (dst / "config.json").write_text(json.dumps(raw))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in [k for k in tensors if ".experts." in k]:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("key,value,method", [
    ("quantization_config", FAKE_FP8, "fp8"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "gptq"),
    ("compression_config", {"quant_method": "compressed-tensors"}, "compressed-tensors"),
])
def test_config_with_quantization_is_refused_naming_key_and_method(tiny_checkpoint, key, value, method):
    raw = json.loads((tiny_checkpoint("mixtral") / "config.json").read_text())
    raw[key] = value
    with pytest.raises(ModelConfigError) as info:
        ModelConfig.from_dict(raw)
    message = str(info.value)
    assert f"config.json: {key}" in message and repr(method) in message and "\n" not in message


def test_fp8_checkpoint_folder_is_refused_before_any_weight_is_read(fp8_checkpoint):
    with pytest.raises(ModelConfigError, match="quantization_config .quant_method 'fp8'"):
        ModelConfig.from_pretrained(fp8_checkpoint)


def test_undeclared_fp8_tensors_are_refused_by_the_reader(fp8_checkpoint):
    """A checkpoint that stores fp8 weights without saying so is still not read as floats."""
    reader = CheckpointReader(fp8_checkpoint)
    assert reader.tensor("model.embed_tokens.weight").dtype == torch.float32
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight' is stored as F8_E4M3"):
        reader.expert("qwen3_moe", "model.layers.0.mlp", 0)
    assert reader.bytes_loaded["experts"] == 0
