"""MoE model architectures: presets and Hugging Face ``config.json`` reading.

Only the figures the planner and the operator need: layer counts and shapes,
to size weights, KV cache, expert GEMMs and dispatch payloads. A config.json
is read by moeshard.core.hf_config, the reader the engine uses too.

Shape legend used across MoEShard: T tokens, E experts, K top-K, H hidden,
I expert intermediate size, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeshard.core.hf_config import HF_MODEL_TYPES, read_hf_config

ARCHITECTURES = HF_MODEL_TYPES


@dataclass(frozen=True)
class ModelArchitecture:
    name: str
    architecture: str  # one of ARCHITECTURES
    num_layers: int  # L, all decoder layers
    hidden_size: int  # H
    num_experts: int  # E, routed experts per MoE layer
    top_k: int  # K
    expert_intermediate_size: int  # I
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    first_dense_layers: int = 0  # DeepSeek-V3: first 3 layers are dense FFN
    dense_intermediate_size: int = 0
    shared_experts: int = 0  # always-on experts, replicated on every EP rank
    expert_groups: int = 1  # Q: group-limited routing over Q consecutive expert groups (DeepSeek-V3: 8); 1 = none
    tie_embeddings: bool = False
    # Overrides for attention variants whose size does not follow from heads
    # (DeepSeek's multi-head latent attention).
    attention_params_per_layer_override: int | None = None
    kv_bytes_per_token_per_layer_override: int | None = None
    weight_bytes: int = 2  # BF16
    source: str = field(default="", compare=False)

    # -- derived sizes ---------------------------------------------------
    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate, up ([I, H] each) and down ([H, I])."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def attention_params_per_layer(self) -> int:
        if self.attention_params_per_layer_override is not None:
            return self.attention_params_per_layer_override
        q = self.num_attention_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * q + 2 * self.hidden_size * kv + q * self.hidden_size

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        if self.kv_bytes_per_token_per_layer_override is not None:
            return self.kv_bytes_per_token_per_layer_override
        return 2 * self.num_kv_heads * self.head_dim * self.weight_bytes

    @property
    def routed_expert_params(self) -> int:
        return self.moe_layers * self.num_experts * self.expert_params

    @property
    def replicated_params(self) -> int:
        """Parameters every EP rank holds apart from routed experts, before TP sharding.

        Attention, router, shared experts, dense FFN layers, embeddings.
        """
        h = self.hidden_size
        attention = self.num_layers * self.attention_params_per_layer
        router = self.moe_layers * h * self.num_experts
        shared = self.moe_layers * self.shared_experts * self.expert_params
        dense = self.first_dense_layers * 3 * h * self.dense_intermediate_size
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return attention + router + shared + dense + embeddings

    @property
    def total_params(self) -> int:
        return self.routed_expert_params + self.replicated_params

    @property
    def active_params(self) -> int:
        return self.replicated_params + self.moe_layers * self.top_k * self.expert_params


PRESETS: dict[str, ModelArchitecture] = {
    # Qwen/Qwen3-235B-A22B config.json
    "qwen3-235b-a22b": ModelArchitecture(
        name="qwen3-235b-a22b", architecture="qwen3_moe", num_layers=94, hidden_size=4096,
        num_experts=128, top_k=8, expert_intermediate_size=1536, num_attention_heads=64,
        num_kv_heads=4, head_dim=128, vocab_size=151936, source="Qwen/Qwen3-235B-A22B config.json",
    ),
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": ModelArchitecture(
        name="qwen3-30b-a3b", architecture="qwen3_moe", num_layers=48, hidden_size=2048,
        num_experts=128, top_k=8, expert_intermediate_size=768, num_attention_heads=32,
        num_kv_heads=4, head_dim=128, vocab_size=151936, source="Qwen/Qwen3-30B-A3B config.json",
    ),
    # deepseek-ai/DeepSeek-V3 config.json. MLA: q_lora_rank 1536, kv_lora_rank 512,
    # qk_nope 128, qk_rope 64, v_head 128, 128 heads. Attention parameters per layer:
    # q_a 7168x1536 + q_b 1536x(128x192) + kv_a 7168x(512+64) + kv_b 512x(128x256)
    # + o (128x128)x7168 = 187,105,280. KV cache per token per layer: the
    # compressed latent plus the rope key, (512 + 64) x 2 bytes.
    "deepseek-v3": ModelArchitecture(
        name="deepseek-v3", architecture="deepseek_v3", num_layers=61, hidden_size=7168,
        num_experts=256, top_k=8, expert_intermediate_size=2048, num_attention_heads=128,
        num_kv_heads=128, head_dim=128, vocab_size=129280, first_dense_layers=3,
        dense_intermediate_size=18432, shared_experts=1, expert_groups=8,  # n_group 8, topk_group 4
        attention_params_per_layer_override=187_105_280,
        kv_bytes_per_token_per_layer_override=(512 + 64) * 2,
        source="deepseek-ai/DeepSeek-V3 config.json",
    ),
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": ModelArchitecture(
        name="mixtral-8x7b", architecture="mixtral", num_layers=32, hidden_size=4096,
        num_experts=8, top_k=2, expert_intermediate_size=14336, num_attention_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=32000, source="mistralai/Mixtral-8x7B-v0.1 config.json",
    ),
    # mistralai/Mixtral-8x22B-v0.1 config.json
    "mixtral-8x22b": ModelArchitecture(
        name="mixtral-8x22b", architecture="mixtral", num_layers=56, hidden_size=6144,
        num_experts=8, top_k=2, expert_intermediate_size=16384, num_attention_heads=48,
        num_kv_heads=8, head_dim=128, vocab_size=32768, source="mistralai/Mixtral-8x22B-v0.1 config.json",
    ),
}


def get_preset(name: str) -> ModelArchitecture:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise KeyError(f"unknown model preset {name!r} (known: {known})") from None


def architecture_from_hf_config(config: dict, name: str = "custom") -> ModelArchitecture:
    """The catalog entry of a Hugging Face ``config.json`` (as a dict), read by the one reader.

    Supported ``model_type``: ``qwen3_moe``, ``mixtral``, ``deepseek_v3``.
    Raises ConfigError naming the key that is missing or wrong.
    """
    cfg = read_hf_config(config)
    common = dict(
        name=name, architecture=cfg.model_type, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_experts=cfg.num_experts, top_k=cfg.top_k, expert_intermediate_size=cfg.expert_intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, first_dense_layers=cfg.dense_layers,
        dense_intermediate_size=cfg.dense_intermediate_size if cfg.dense_layers else 0,
        shared_experts=cfg.shared_experts, expert_groups=cfg.expert_groups, tie_embeddings=cfg.tie_word_embeddings,
        source="config.json",
    )
    mla = cfg.latent_attention
    if mla is None:
        return ModelArchitecture(**common)
    # Multi-head latent attention: sizes do not follow from the head counts.
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    q_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    q_params = hidden * mla.q_lora_rank + mla.q_lora_rank * heads * q_head if mla.q_lora_rank else hidden * heads * q_head
    attention = (
        q_params
        + hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim)
        + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        + heads * mla.v_head_dim * hidden
    )
    return ModelArchitecture(
        **common, attention_params_per_layer_override=attention,
        kv_bytes_per_token_per_layer_override=(mla.kv_lora_rank + mla.qk_rope_head_dim) * 2,
    )
