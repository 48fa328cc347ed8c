"""The one reader of a Hugging Face ``config.json`` (both planes use it).

``read_hf_config`` turns the parsed JSON into an ``HFConfig`` with every
figure MoEShard uses; the planner's catalog entry (``ModelArchitecture``, in
architectures.py) and the engine's ``ModelConfig`` (moeshard.engine.config)
are both built from it, so the two can never read one file differently.
Rules that belong to one consumer stay with it: the engine refuses what it
cannot run (activation, RoPE scaling, quantized weights), the API refuses
what the chosen engine backend cannot serve.

Legend: L decoder layers, E routed experts, K top-K, H hidden, I expert
intermediate, Hq/Hkv attention/KV heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeshard.core.errors import UserError

HF_MODEL_TYPES = ("qwen3_moe", "mixtral", "deepseek_v3")
# config.json keys that announce quantized weights (FP8 block scales, GPTQ, AWQ, compressed-tensors...).
QUANTIZATION_KEYS = ("quantization_config", "compression_config")


class ConfigError(UserError):
    """A config.json that does not describe a supported MoE model; ``key`` names the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class LatentAttention:
    """DeepSeek's multi-head latent attention shapes (MLA)."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class HFConfig:
    model_type: str  # one of HF_MODEL_TYPES
    vocab_size: int  # V
    hidden_size: int  # H
    num_layers: int  # L
    num_attention_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    num_experts: int  # E
    top_k: int  # K
    expert_intermediate_size: int  # I
    moe_layer_ids: tuple[int, ...]  # decoder layers with a routed MoE block; the others are dense MLPs
    dense_intermediate_size: int  # the dense MLP layers' intermediate size (0 when none)
    shared_experts: int  # always-on experts per MoE layer (DeepSeek)
    norm_topk_prob: bool  # renormalise the top-K routing probabilities
    rms_norm_eps: float
    rope_theta: float
    rope_type: str  # "default" or a scaling type
    hidden_act: str
    attention_bias: bool
    sliding_window: int | None
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    quantization: str | None  # "KEY (quant_method METHOD)" when the weights are quantized, e.g. fp8 block scales
    latent_attention: LatentAttention | None = None
    # Group-limited routing (DeepSeek-V3: n_group 8, topk_group 4): the experts form this many consecutive
    # groups and a token picks its experts inside its best topk_group groups. 1: routing is not group-limited.
    expert_groups: int = 1

    @property
    def dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layer_ids)


def _int(raw: dict, *keys: str, default: int | None = None) -> int:
    """The first present key of ``keys`` as a non-negative integer (config files differ in naming)."""
    for key in keys:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(key, f"must be a non-negative integer, got {value!r}")
        return value
    if default is not None:
        return default
    raise ConfigError(keys[0], "missing from config.json")


def _moe_layers(raw: dict, model_type: str, layers: int, experts: int) -> tuple[int, ...]:
    if model_type == "qwen3_moe":
        step = _int(raw, "decoder_sparse_step", default=1) or 1
        dense = set(raw.get("mlp_only_layers") or [])
        return tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
    if model_type == "deepseek_v3":
        first_dense = _int(raw, "first_k_dense_replace", default=0)
        freq = _int(raw, "moe_layer_freq", default=1) or 1
        return tuple(i for i in range(first_dense, layers) if i % freq == 0)
    return tuple(range(layers))


def read_hf_config(raw: Any) -> HFConfig:
    """Read a parsed config.json; ConfigError names the key that is missing or wrong."""
    if not isinstance(raw, dict):
        raise ConfigError("(document)", f"config.json must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(
            "model_type", f"{model_type!r} is not a supported MoE architecture (supported: {', '.join(HF_MODEL_TYPES)})"
        )
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    if heads == 0:
        raise ConfigError("num_attention_heads", "must be at least 1")
    layers = _int(raw, "num_hidden_layers")
    # Hub config.json files say num_experts; transformers 5 writes num_local_experts; DeepSeek n_routed_experts.
    experts = _int(raw, *{"qwen3_moe": ("num_experts", "num_local_experts"), "mixtral": ("num_local_experts",),
                          "deepseek_v3": ("n_routed_experts",)}[model_type])
    if experts == 0:
        raise ConfigError({"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(model_type, "num_experts"),
                          "must be at least 1 for a MoE model")
    top_k = _int(raw, "num_experts_per_tok")
    if not 1 <= top_k <= experts:
        raise ConfigError("num_experts_per_tok", f"{top_k} must be in 1..{experts}")
    kv_heads = _int(raw, "num_key_value_heads", default=heads) or heads
    if heads % kv_heads:
        raise ConfigError("num_key_value_heads", f"{kv_heads} must divide num_attention_heads ({heads})")
    moe_ids = _moe_layers(raw, model_type, layers, experts)
    if not moe_ids:
        raise ConfigError("num_hidden_layers", "the model has no MoE layer")
    if model_type == "mixtral":
        expert_inter, dense_inter = _int(raw, "intermediate_size"), 0
    else:
        expert_inter = _int(raw, "moe_intermediate_size")
        dense_inter = _int(raw, "intermediate_size", default=0)
    latent = None
    head_dim = raw.get("head_dim") or hidden // heads
    if model_type == "deepseek_v3":
        latent = LatentAttention(
            q_lora_rank=_int(raw, "q_lora_rank", default=0), kv_lora_rank=_int(raw, "kv_lora_rank"),
            qk_nope_head_dim=_int(raw, "qk_nope_head_dim"), qk_rope_head_dim=_int(raw, "qk_rope_head_dim"),
            v_head_dim=_int(raw, "v_head_dim"),
        )
        head_dim = latent.v_head_dim
    groups = _expert_groups(raw, model_type, experts)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    eos = raw.get("eos_token_id")
    quantization = None
    for key in QUANTIZATION_KEYS:
        if raw.get(key):
            method = raw[key].get("quant_method", "unknown") if isinstance(raw[key], dict) else raw[key]
            quantization = f"{key} (quant_method {method!r})"
            break
    return HFConfig(
        model_type=model_type, vocab_size=_int(raw, "vocab_size"), hidden_size=hidden, num_layers=layers,
        num_attention_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim), num_experts=experts, top_k=top_k,
        expert_intermediate_size=expert_inter, moe_layer_ids=moe_ids,
        dense_intermediate_size=dense_inter,
        shared_experts=_int(raw, "n_shared_experts", default=0) if model_type == "deepseek_v3" else 0,
        # Mixtral always renormalises (softmax over the top-K logits); Qwen3 and DeepSeek say so in the file.
        norm_topk_prob=True if model_type == "mixtral" else bool(raw.get("norm_topk_prob", False)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_type=str(rope.get("rope_type", rope.get("type", "default"))),
        hidden_act=str(raw.get("hidden_act", "silu")),
        attention_bias=bool(raw.get("attention_bias", False)),
        sliding_window=(int(raw["sliding_window"]) if raw.get("sliding_window") and raw.get("use_sliding_window", True)
                        else None),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        quantization=quantization,
        latent_attention=latent,
        expert_groups=groups,
    )


def _expert_groups(raw: dict, model_type: str, experts: int) -> int:
    """DeepSeek-V3's n_group when its routing is group-limited (topk_group < n_group), else 1."""
    if model_type != "deepseek_v3":
        return 1
    groups = _int(raw, "n_group", default=1) or 1
    if experts % groups:
        raise ConfigError("n_group", f"{groups} must divide n_routed_experts ({experts})")
    topk_group = _int(raw, "topk_group", default=groups)
    if not 1 <= topk_group <= groups:
        raise ConfigError("topk_group", f"{topk_group} must be in 1..n_group ({groups})")
    return groups if topk_group < groups else 1
