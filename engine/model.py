"""Qwen3-MoE / Mixtral decoder, written to read like transformers' models, with parallelism applied.

Tokens travel packed: a step's hidden states are [T, H] for the sequences of
this rank's attention-DP group (T = sum of their new tokens). Attention pads
them per sequence internally and reads/writes a per-rank KV cache.

Parallel pieces (see moeshard.engine.parallel):

* attention: Megatron TP over the TP group. q/k/v projections are split by
  heads (rows), o_proj by its input columns, one all-reduce after o_proj.
  Requires Hkv % tp == 0 (KV heads are not replicated).
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
from moeshard.engine.loading import PROGRESS_MIN_BYTES, CheckpointReader, maybe_progress
from moeshard.engine.moe import MoELayer
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

    cache_rows [B]: KV-cache row of each sequence; past_lens [B]: tokens
    already cached; new_lens [B]: tokens in this step; tokens [T] packed;
    token_keys [T]: each token's index in the whole group's step batch.
    max_new / max_kv: the step's S_q = max(new_lens) and S_kv =
    max(past_lens + new_lens) as Python ints (0 when B = 0). Pass them when
    the lengths are known on the host; otherwise they are read from the
    tensors once here, not once per layer.
    """

    cache_rows: torch.Tensor
    past_lens: torch.Tensor
    new_lens: torch.Tensor
    tokens: torch.Tensor
    token_keys: torch.Tensor
    max_new: int | None = None
    max_kv: int | None = None

    def __post_init__(self) -> None:
        if self.max_new is None or self.max_kv is None:
            if self.new_lens.numel() == 0:
                self.max_new, self.max_kv = 0, 0
            else:
                spans = torch.stack([self.new_lens.max(), (self.past_lens + self.new_lens).max()]).tolist()
                self.max_new, self.max_kv = int(spans[0]), int(spans[1])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def token_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence index in the batch [T], offset inside the step [T]) of each packed token."""
        seq = torch.repeat_interleave(torch.arange(self.new_lens.numel(), device=self.tokens.device), self.new_lens,
                                      output_size=self.tokens.numel())  # known size: no host sync
        starts = torch.cumsum(self.new_lens, 0) - self.new_lens
        return seq, torch.arange(seq.numel(), device=seq.device) - starts[seq]


class KVCache:
    """Per-rank cache: k, v [rows, Hkv, capacity, D] per decoder layer."""

    def __init__(self, num_layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity


def attention_mask(past_lens: torch.Tensor, new_lens: torch.Tensor, s_q: int, s_kv: int,
                   sliding_window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, S_q, S_kv], True where a query may attend to a key.

    Sequence b's query i sits at absolute position past_lens[b] + i and sees
    keys 0..that position (the last ``sliding_window`` of them when set).
    Padded queries (i >= new_lens[b]) see key 0 only, so no softmax row is
    empty; their outputs are dropped.
    """
    q_idx = torch.arange(s_q, device=past_lens.device)
    q_pos = past_lens[:, None] + q_idx[None, :]  # [B, S_q]
    k_pos = torch.arange(s_kv, device=past_lens.device)[None, None, :]
    allowed = k_pos <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= k_pos > q_pos[:, :, None] - sliding_window
    q_valid = q_idx[None, :] < new_lens[:, None]
    return torch.where(q_valid[:, :, None], allowed, k_pos == 0)[:, None]


class Attention:
    """Grouped-query attention on this rank's heads (TP shard)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], groups: ProcessGroups, layer: int) -> None:
        self.cfg, self.w, self.groups, self.layer = cfg, weights, groups, layer
        tp = groups.parallel.tp_size
        self.heads, self.kv_heads = cfg.num_attention_heads // tp, cfg.num_kv_heads // tp
        self.scale = cfg.head_dim ** -0.5

    @staticmethod
    def load(reader: CheckpointReader, cfg: ModelConfig, parallel: ParallelConfig, prefix: str) -> dict[str, torch.Tensor]:
        """This TP rank's shard of one layer's attention weights."""
        tp, r, d = parallel.tp_size, parallel.tp_rank, cfg.head_dim
        hq, hkv = cfg.num_attention_heads // tp, cfg.num_kv_heads // tp
        spans = {"q": (r * hq * d, (r + 1) * hq * d), "k": (r * hkv * d, (r + 1) * hkv * d),
                 "v": (r * hkv * d, (r + 1) * hkv * d)}
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

    def forward(self, x: torch.Tensor, step: StepBatch, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor,
                coords: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
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
        # 3. Write this step's keys/values into the cache.
        seq, off = coords
        rows = step.cache_rows[seq]
        pos = step.past_lens[seq] + off
        ck, cv = cache.k[self.layer], cache.v[self.layer]
        ck[rows, :, pos] = k
        cv[rows, :, pos] = v
        # 4. Pad queries per sequence, folding each KV head's G = Hq / Hkv query heads into the
        #    query axis: [B, Hkv, G * S_q, D] (query head h uses KV head h // G). Keys/values are
        #    this step's cache rows as stored, [B, Hkv, S_kv, D], never widened to Hq heads; no
        #    enable_gqa is needed, so SDPA's fused masked kernels apply (its GQA path with a mask
        #    falls back to the math kernel, which widens KV and materialises the scores).
        b, g = step.new_lens.numel(), self.heads // self.kv_heads
        s_q, s_kv = step.max_new, step.max_kv  # host ints, computed once per step
        qp = x.new_zeros((b, self.kv_heads, g, s_q, d))
        qp[seq, :, :, off] = q.view(t, self.kv_heads, g, d)
        keys = ck[step.cache_rows, :, :s_kv]
        vals = cv[step.cache_rows, :, :s_kv]
        # 5. Fused attention under the causal + ragged mask, repeated for the G folded heads.
        mask = attention_mask(step.past_lens, step.new_lens, s_q, s_kv, cfg.sliding_window)  # [B, 1, S_q, S_kv]
        mask = mask[:, :, None].expand(b, 1, g, s_q, s_kv).reshape(b, 1, g * s_q, s_kv)
        out = F.scaled_dot_product_attention(qp.view(b, self.kv_heads, g * s_q, d), keys, vals, attn_mask=mask,
                                             scale=self.scale)
        # 6. Unpad, output projection (row-parallel), all-reduce over the TP group.
        out = out.view(b, self.kv_heads, g, s_q, d)[seq, :, :, off].reshape(t, self.heads * d)
        o = self.groups.tp_all_reduce(F.linear(out, w["o_proj"]))
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

    def forward(self, x: torch.Tensor, step: StepBatch, cache: KVCache, rope, coords) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        if x.shape[0]:
            x = x + self.attention.forward(rms_norm(x, self.input_norm, eps), step, cache, *rope, coords)
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

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        kv_heads = self.cfg.num_kv_heads // self.parallel.tp_size
        return KVCache(len(self.layers), rows, kv_heads, capacity, self.cfg.head_dim, self.dtype, self.device)

    def forward(self, step: StepBatch, cache: KVCache) -> torch.Tensor:
        """COLLECTIVE. Packed tokens -> final hidden states [T, H] (after the last norm)."""
        x = F.embedding(step.tokens, self.embed)
        coords = step.token_coords()
        positions = step.past_lens[coords[0]] + coords[1]
        rope = rope_cos_sin(positions, self.inv_freq, self.dtype)
        for layer in self.layers:
            x = layer.forward(x, step, cache, rope, coords)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V]."""
        return F.linear(hidden, self.lm_head)


def check_tp_shape(cfg: ModelConfig, tp: int) -> None:
    if cfg.num_kv_heads % tp or cfg.num_attention_heads % tp:
        raise ValueError(
            f"attention TP ({tp}) must divide num_attention_heads ({cfg.num_attention_heads}) and "
            f"num_key_value_heads ({cfg.num_kv_heads})"
        )


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
