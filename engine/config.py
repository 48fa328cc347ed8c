"""Typed configuration of the engine: the model (from config.json) and the parallel layout.

One object per concern, built once at start-up and passed down:

* ``ModelConfig``: architecture figures read from a Hugging Face ``config.json``
  (Qwen3-MoE and Mixtral).
* ``ParallelConfig``: where this rank sits in its expert-parallel group, built
  from the engine environment contract (moeshard.core.engine_env).

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

from moeshard.core.errors import UserError
from moeshard.core.hf_config import ConfigError, read_hf_config

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "mixtral")


class ModelConfigError(UserError):
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
        """Read a parsed config.json (moeshard.core.hf_config, the reader the planner uses too) and refuse
        what this engine cannot run; ModelConfigError names the field."""
        try:
            hf = read_hf_config(raw)
        except ConfigError as exc:
            raise ModelConfigError(f"config.json: {exc}") from None
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(f"config.json: model_type {hf.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        if hf.hidden_act != "silu":
            raise ModelConfigError(f"config.json: hidden_act {hf.hidden_act!r} is not supported (only silu)")
        if hf.rope_type != "default":
            raise ModelConfigError(f"config.json: rope_parameters.rope_type {hf.rope_type!r} is not supported (only default)")
        if hf.quantization is not None:
            # Loading quantized weights as if they were bf16 gives garbage logits: refuse until supported.
            raise ModelConfigError(
                f"config.json: quantization_config (quant_method {hf.quantization!r}) is not supported yet; "
                "serve a bf16/fp16/fp32 checkpoint"
            )
        return cls(
            model_type=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_layers,
            num_attention_heads=hf.num_attention_heads, num_kv_heads=hf.num_kv_heads, head_dim=hf.head_dim,
            rms_norm_eps=hf.rms_norm_eps, rope_theta=hf.rope_theta, num_experts=hf.num_experts, top_k=hf.top_k,
            expert_intermediate_size=hf.expert_intermediate_size, norm_topk_prob=hf.norm_topk_prob,
            moe_layer_ids=hf.moe_layer_ids, dense_intermediate_size=hf.dense_intermediate_size,
            qk_norm=hf.model_type == "qwen3_moe", attention_bias=hf.attention_bias, sliding_window=hf.sliding_window,
            tie_word_embeddings=hf.tie_word_embeddings, eos_token_id=hf.eos_token_ids,
        )

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
        """From a moeshard.core.engine_env.EngineEnvironment."""
        if not 0 <= local_rank < env.gpus_per_pod:
            raise ValueError(f"local_rank {local_rank} must be in 0..{env.gpus_per_pod - 1} (MOESHARD_GPUS_PER_POD)")
        return cls(
            rank=env.pod_index * env.gpus_per_pod + local_rank, world_size=env.expert_ep, tp_size=env.attention_tp,
            gpus_per_domain=env.gpus_per_domain, device=env.device, gpus_per_pod=env.gpus_per_pod,
        )
