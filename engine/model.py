"""Qwen3-MoE / Mixtral decoder, written to read like transformers' models, with parallelism applied.

Tokens travel packed: a step's hidden states are [T, H] for the sequences of
this rank's attention-DP group (T = sum of their new tokens: decode tokens and
prefill chunks mixed). Attention writes each token's K/V into the rank's paged
pool and reads each sequence's keys through its block table
(moeshard.engine.paged_attention).

Parallel pieces (see moeshard.engine.parallel):

* attention: Megatron TP over the TP group. q/k/v projections are split by
  heads (rows), o_proj by its input columns, one all-reduce after o_proj.
  When tp exceeds Hkv, each rank loads and caches the one KV head its
  query heads read (replicated on tp / Hkv ranks, as vLLM does).
* MoE: each TP rank routes a 1/tp chunk of the tokens through the EP-wide
  :class:`moeshard.engine.moe.MoELayer`; the TP group all-gathers the result.
* replicated on every rank: embeddings, lm_head, norms, routers and the dense
  MLP of Qwen3-MoE's ``mlp_only_layers`` (small next to the experts).

Shape legend: T tokens, B sequences, S_q new tokens per sequence (padded),
S_kv cached + new keys, H hidden, Hq / Hkv local attention / KV heads, D head
dim, V vocabulary, L decoder layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeshard.engine.comm import AllToAll
from moeshard.engine.config import ModelConfig, ParallelConfig
from moeshard.engine.kv_cache import KVPoolShape, PagedKVCache
from moeshard.core.kv_sizing import check_attention_tp, first_kv_head, kv_heads_per_rank
from moeshard.engine.loading import PROGRESS_MIN_BYTES, CheckpointReader, maybe_progress
from moeshard.engine.moe import MoELayer
from moeshard.engine.paged_attention import PagedMetadata, paged_attention
from moeshard.engine.parallel import ProcessGroups
from moeshard.core.placement import Placement

log = logging.getLogger("moeshard.engine.model")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in float32, as transformers' Qwen3MoeRMSNorm / MixtralRMSNorm."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, D] (default RoPE, attention scaling 1)."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class StepBatch:
    """The tokens of one forward step on this rank (its attention-DP group's sequences).

    tokens [T] packed by sequence; token_keys [T]: each token's index in the
    whole group's step batch (replica choice); attn: where each token sits in
    the paged KV cache (positions, block tables, per-sequence lengths).
    """

    tokens: torch.Tensor
    token_keys: torch.Tensor
    attn: PagedMetadata

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


class Attention:
    """Grouped-query attention on this rank's heads (TP shard)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], groups: ProcessGroups, layer: int) -> None:
        self.cfg, self.w, self.groups, self.layer = cfg, weights, groups, layer
        tp = groups.parallel.tp_size
        self.heads, self.kv_heads = cfg.num_attention_heads // tp, kv_heads_per_rank(cfg.num_kv_heads, tp)
        self.scale = cfg.head_dim ** -0.5

    @staticmethod
    def load(reader: CheckpointReader, cfg: ModelConfig, parallel: ParallelConfig, prefix: str) -> dict[str, torch.Tensor]:
        """This TP rank's shard of one layer's attention weights.

        q rows and o columns are split by query heads; k/v rows are split by KV
        heads, or, when TP exceeds Hkv, the one KV head this rank's query heads
        read is loaded (replicated on tp / Hkv ranks).
        """
        tp, r, d = parallel.tp_size, parallel.tp_rank, cfg.head_dim
        hq, hkv = cfg.num_attention_heads // tp, kv_heads_per_rank(cfg.num_kv_heads, tp)
        kv0 = first_kv_head(cfg.num_attention_heads, cfg.num_kv_heads, tp, r)
        spans = {"q": (r * hq * d, (r + 1) * hq * d), "k": (kv0 * d, (kv0 + hkv) * d),
                 "v": (kv0 * d, (kv0 + hkv) * d)}
        w = {}
        for name, (a, b) in spans.items():
            w[f"{name}_proj"] = reader.rows(f"{prefix}.{name}_proj.weight", a, b)
            if cfg.attention_bias:
                w[f"{name}_bias"] = reader.rows(f"{prefix}.{name}_proj.bias", a, b)
        w["o_proj"] = reader.cols(f"{prefix}.o_proj.weight", r * hq * d, (r + 1) * hq * d)
        if cfg.attention_bias:
            w["o_bias"] = reader.tensor(f"{prefix}.o_proj.bias")
        if cfg.qk_norm:
            w["q_norm"] = reader.tensor(f"{prefix}.q_norm.weight")
            w["k_norm"] = reader.tensor(f"{prefix}.k_norm.weight")
        return w

    def forward(self, x: torch.Tensor, step: StepBatch, cache: PagedKVCache, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] (after the TP all-reduce)."""
        cfg, w, d = self.cfg, self.w, self.cfg.head_dim
        t = x.shape[0]
        # 1. Projections on this rank's heads.
        q = F.linear(x, w["q_proj"], w.get("q_bias")).view(t, self.heads, d)
        k = F.linear(x, w["k_proj"], w.get("k_bias")).view(t, self.kv_heads, d)
        v = F.linear(x, w["v_proj"], w.get("v_bias")).view(t, self.kv_heads, d)
        if cfg.qk_norm:
            q, k = rms_norm(q, w["q_norm"], cfg.rms_norm_eps), rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        # 2. Rotary embedding at each token's absolute position.
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        # 3. Write this step's keys/values into their pool slots, then attend through the block tables.
        cache.write(self.layer, step.attn.slots, k, v)
        out = paged_attention(q, cache.k[self.layer], cache.v[self.layer], step.attn, self.scale)
        # 4. Output projection (row-parallel), all-reduce over the TP group.
        o = self.groups.tp_all_reduce(F.linear(out.reshape(t, self.heads * d), w["o_proj"]))
        if "o_bias" in w:
            o = o + w["o_bias"]
        return o


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, attention: Attention, norms: tuple[torch.Tensor, torch.Tensor],
                 moe: MoELayer | None, dense: dict[str, torch.Tensor] | None, groups: ProcessGroups) -> None:
        self.cfg, self.attention, self.moe, self.dense, self.groups = cfg, attention, moe, dense, groups
        self.input_norm, self.post_norm = norms

    def mlp(self, h: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
        if self.moe is None:
            d = self.dense
            return F.linear(F.silu(F.linear(h, d["gate_proj"])) * F.linear(h, d["up_proj"]), d["down_proj"])
        start, stop = self.groups.tp_chunk(h.shape[0])
        part = self.moe.forward(h[start:stop], token_keys[start:stop])
        return self.groups.tp_all_gather_tokens(part, h.shape[0])

    def forward(self, x: torch.Tensor, step: StepBatch, cache: PagedKVCache, rope) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        if x.shape[0]:
            x = x + self.attention.forward(rms_norm(x, self.input_norm, eps), step, cache, *rope)
        # The MoE layer is collective over the EP group: ranks with no tokens still take part.
        return x + self.mlp(rms_norm(x, self.post_norm, eps), step.token_keys)


class MoEModel:
    """The decoder stack of one rank. ``moe_layers`` is indexed by MoE layer (placement layer)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, groups: ProcessGroups, embed: torch.Tensor,
                 lm_head: torch.Tensor, final_norm: torch.Tensor, layers: list[DecoderLayer], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.cfg, self.parallel, self.groups = cfg, parallel, groups
        self.embed, self.lm_head, self.final_norm, self.layers = embed, lm_head, final_norm, layers
        self.dtype, self.device = dtype, device
        self.moe_layers = [layer.moe for layer in layers if layer.moe is not None]
        d = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d))

    def kv_pool_shape(self, num_blocks: int, block_size: int) -> KVPoolShape:
        """This rank's pool of ``num_blocks`` blocks (KV heads split or replicated by attention TP)."""
        return KVPoolShape(len(self.layers), num_blocks, block_size,
                           kv_heads_per_rank(self.cfg.num_kv_heads, self.parallel.tp_size), self.cfg.head_dim)

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.kv_pool_shape(num_blocks, block_size), self.dtype, self.device)

    def forward(self, step: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """COLLECTIVE. Packed tokens -> final hidden states [T, H] (after the last norm)."""
        x = F.embedding(step.tokens, self.embed)
        rope = rope_cos_sin(step.attn.positions, self.inv_freq, self.dtype)
        for layer in self.layers:
            x = layer.forward(x, step, cache, rope)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V]."""
        return F.linear(hidden, self.lm_head)


def check_tp_shape(cfg: ModelConfig, tp: int) -> None:
    check_attention_tp(cfg.num_attention_heads, cfg.num_kv_heads, tp)


def load_local_experts(reader: CheckpointReader, cfg: ModelConfig, placement: Placement, moe_index: int, rank: int,
                       device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Read this rank's slots of one MoE layer: (w_gate_up [S, 2I, H], w_down [S, H, I])."""
    s = placement.slots_per_gpu
    layer = cfg.moe_layer_ids[moe_index]
    prefix = f"model.layers.{layer}.{cfg.moe_prefix}"
    gate_up, down = [], []
    for slot in range(rank * s, (rank + 1) * s):
        gu, dn = reader.expert(cfg.model_type, prefix, int(placement.phy2log[moe_index, slot]))
        gate_up.append(gu)
        down.append(dn)
    return torch.stack(gate_up).to(device, dtype), torch.stack(down).to(device, dtype)


def build_model(reader: CheckpointReader, cfg: ModelConfig, parallel: ParallelConfig, groups: ProcessGroups,
                placement: Placement, comm: AllToAll, *, dtype: torch.dtype | None = None) -> MoEModel:
    """Read this rank's share of the checkpoint and assemble its model."""
    check_tp_shape(cfg, parallel.tp_size)
    device = reader.device
    embed = reader.tensor("model.embed_tokens.weight")
    dtype = dtype or embed.dtype
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    lm_head = embed if cfg.tie_word_embeddings or not reader.has("lm_head.weight") else reader.tensor("lm_head.weight")
    layers = []
    show = reader.total_bytes >= PROGRESS_MIN_BYTES and parallel.rank == 0
    moe_index = 0
    for i in maybe_progress(range(cfg.num_layers), total=cfg.num_layers, desc="loading layers", show=show):
        prefix = f"model.layers.{i}"
        attn_w = {k: cast(v) for k, v in Attention.load(reader, cfg, parallel, f"{prefix}.self_attn").items()}
        norms = (cast(reader.tensor(f"{prefix}.input_layernorm.weight")),
                 cast(reader.tensor(f"{prefix}.post_attention_layernorm.weight")))
        moe = dense = None
        if i in cfg.moe_layer_ids:
            w_gu, w_dn = load_local_experts(reader, cfg, placement, moe_index, parallel.rank, device, dtype)
            moe = MoELayer(
                moe_index=moe_index, router_weight=cast(reader.tensor(f"{prefix}.{cfg.moe_prefix}.gate.weight")),
                w_gate_up=w_gu, w_down=w_dn, placement=placement, rank=parallel.rank, comm=comm, top_k=cfg.top_k,
                model_type=cfg.model_type, norm_topk_prob=cfg.norm_topk_prob,
            )
            moe_index += 1
        else:
            dense = {n: cast(reader.tensor(f"{prefix}.mlp.{n}.weight")) for n in ("gate_proj", "up_proj", "down_proj")}
        layers.append(DecoderLayer(cfg, Attention(cfg, attn_w, groups, i), norms, moe, dense, groups))
    log.info("rank %d loaded %s bytes", parallel.rank, dict(reader.bytes_loaded))
    return MoEModel(cfg, parallel, groups, cast(embed), cast(lm_head), cast(reader.tensor("model.norm.weight")),
                    layers, dtype, device)
