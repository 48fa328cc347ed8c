"""Typed configuration of the engine: the model (from config.json) and the parallel layout.

One object per concern, built once at start-up and passed down:

* ``ModelConfig``: architecture figures read from a Hugging Face ``config.json``
  (Qwen3-MoE and Mixtral).
* ``ParallelConfig``: where this rank sits in its expert-parallel group, built
  from the engine environment contract (moeshard.operator.engine_env).

Shape legend used across moeshard.engine: T tokens, E logical experts, K top-K,
H hidden, I expert intermediate, S slots per rank, W world (= EP) size,
Hq / Hkv attention / KV heads, D head dim, V vocabulary, L_moe MoE layers.
Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "mixtral")
# config.json keys that announce quantized weights (FP8 block scales, GPTQ, AWQ, compressed-tensors...).
# The engine would read them as plain floats and return wrong logits, so they are refused.
QUANTIZATION_KEYS = ("quantization_config", "compression_config")


class ModelConfigError(ValueError):
    """config.json is missing a field or describes something the engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # qwen3_moe | mixtral
    vocab_size: int  # V
    hidden_size: int  # H
    num_layers: int
    num_attention_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    rms_norm_eps: float
    rope_theta: float
    num_experts: int  # E
    top_k: int  # K
    expert_intermediate_size: int  # I
    norm_topk_prob: bool  # renormalise the top-K probabilities (Mixtral: always)
    moe_layer_ids: tuple[int, ...]  # decoder layers with a sparse MoE block; others are dense MLPs
    dense_intermediate_size: int  # dense MLP layers (Qwen3-MoE mlp_only_layers)
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k
    attention_bias: bool
    sliding_window: int | None
    tie_word_embeddings: bool
    eos_token_id: tuple[int, ...] = field(default=())

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def moe_prefix(self) -> str:
        """Checkpoint name of the MoE block inside a decoder layer."""
        return "mlp" if self.model_type == "qwen3_moe" else "block_sparse_moe"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Read a parsed config.json; ModelConfigError names the field that is missing or unsupported."""

        def need(*names: str) -> Any:
            for name in names:
                if raw.get(name) is not None:
                    return raw[name]
            raise ModelConfigError(f"config.json: {names[0]} is missing")

        model_type = raw.get("model_type")
        for key in QUANTIZATION_KEYS:
            if raw.get(key):
                quant = raw[key]
                method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
                raise ModelConfigError(
                    f"config.json: {key} (quant_method {method!r}) is not supported: the engine serves only "
                    "unquantized float32/bfloat16/float16 checkpoints"
                )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(f"config.json: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"config.json: hidden_act {act!r} is not supported (only silu)")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelConfigError(f"config.json: rope_parameters.rope_type {rope_type!r} is not supported (only default)")
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        layers = int(need("num_hidden_layers"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        experts = int(need("num_experts", "num_local_experts"))
        if model_type == "qwen3_moe":
            step = int(raw.get("decoder_sparse_step", 1))
            mlp_only = set(raw.get("mlp_only_layers") or [])
            moe_ids = tuple(i for i in range(layers) if i not in mlp_only and experts > 0 and (i + 1) % step == 0)
            expert_inter = int(need("moe_intermediate_size"))
            dense_inter = int(raw.get("intermediate_size") or 0)
            norm_topk = bool(raw.get("norm_topk_prob", False))
            qk_norm = True
        else:
            moe_ids = tuple(range(layers))
            expert_inter = int(need("intermediate_size"))
            dense_inter = 0
            norm_topk = True  # Mixtral: softmax over the top-K logits
            qk_norm = False
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        cfg = cls(
            model_type=model_type, vocab_size=int(need("vocab_size")), hidden_size=hidden, num_layers=layers,
            num_attention_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, num_experts=experts,
            top_k=int(need("num_experts_per_tok")), expert_intermediate_size=expert_inter, norm_topk_prob=norm_topk,
            moe_layer_ids=moe_ids, dense_intermediate_size=dense_inter, qk_norm=qk_norm,
            attention_bias=bool(raw.get("attention_bias", False)),
            sliding_window=(int(raw["sliding_window"]) if raw.get("sliding_window") and raw.get("use_sliding_window", True)
                            else None),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=eos_ids,
        )
        if cfg.num_attention_heads % cfg.num_kv_heads:
            raise ModelConfigError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ModelConfigError(f"config.json: num_experts_per_tok {cfg.top_k} must be in 1..{cfg.num_experts}")
        if not moe_ids:
            raise ModelConfigError("config.json: the model has no MoE layer")
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (expected a Hugging Face checkpoint folder)")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class ParallelConfig:
    """This rank's place in one EP group.

    The world is one EP group of ``world_size`` ranks. Attention runs in TP
    groups of ``tp_size`` consecutive ranks; there are ``dp_size = world/tp``
    attention-DP groups, each taking a slice of the batch's sequences. The MoE
    layer spans the whole world. ``gpus_per_domain`` ranks share an NVLink
    domain (consecutive ranks); above that, dispatch goes hierarchical.
    """

    rank: int
    world_size: int
    tp_size: int = 1
    gpus_per_domain: int = 8
    device: str = "cpu"
    gpus_per_pod: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} must be in 0..world_size-1 ({self.world_size})")
        if self.tp_size < 1 or self.world_size % self.tp_size:
            raise ValueError(f"attention TP ({self.tp_size}) must divide the EP world size ({self.world_size})")
        if self.gpus_per_pod % self.tp_size and self.world_size > self.gpus_per_pod:
            raise ValueError(
                f"attention TP ({self.tp_size}) must divide GPUs per pod ({self.gpus_per_pod}): a TP group never crosses a pod"
            )
        if self.gpus_per_domain < 1:
            raise ValueError(f"gpus_per_domain must be >= 1, got {self.gpus_per_domain}")
        if self.world_size > self.domain_size and self.world_size % self.domain_size:
            raise ValueError(
                f"EP world size ({self.world_size}) must be a multiple of GPUs per NVLink domain ({self.gpus_per_domain})"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def domain_size(self) -> int:
        """M: ranks per NVLink domain inside this group (the whole group when it fits in one)."""
        return min(self.gpus_per_domain, self.world_size)

    @property
    def num_domains(self) -> int:
        return math.ceil(self.world_size / self.domain_size)

    @property
    def hierarchical(self) -> bool:
        return self.num_domains > 1

    def domain_of(self, rank: int) -> int:
        return rank // self.domain_size

    def tp_group_ranks(self, dp_rank: int | None = None) -> list[int]:
        d = self.dp_rank if dp_rank is None else dp_rank
        return list(range(d * self.tp_size, (d + 1) * self.tp_size))

    @classmethod
    def from_env(cls, env: Any, local_rank: int = 0) -> "ParallelConfig":
        """From a moeshard.operator.engine_env.EngineEnvironment."""
        if not 0 <= local_rank < env.gpus_per_pod:
            raise ValueError(f"local_rank {local_rank} must be in 0..{env.gpus_per_pod - 1} (MOESHARD_GPUS_PER_POD)")
        return cls(
            rank=env.pod_index * env.gpus_per_pod + local_rank, world_size=env.expert_ep, tp_size=env.attention_tp,
            gpus_per_domain=env.gpus_per_domain, device=env.device, gpus_per_pod=env.gpus_per_pod,
        )
