"""The expert-parallel MoE layer.

    Router -> replica choice -> Dispatch -> Experts -> Combine -> weighted sum
    (this module)   (this module)  (comm.py)   (kernels)  (comm.py)

1. Router, exactly as the architecture defines it: Qwen3-MoE takes the softmax
   over all E logits, then the top-K, renormalised when ``norm_topk_prob``;
   Mixtral takes the top-K then renormalises (= softmax over the K logits).
2. Replica choice: each (token, logical expert) pair goes to one physical slot
   of that expert, by the placement's deterministic hash
   (:func:`moeshard.core.placement.replica_slot`, ported bit for bit in
   :class:`ReplicaTable`). The token key is the token's index in the step's
   whole batch, so the choice does not depend on EP/TP layout.
3. Dispatch / combine through an :class:`moeshard.engine.comm.AllToAll`.
4. Local experts: :func:`moeshard.kernels.fused_moe.fused_expert_ffn` over this
   rank's S slots, with -1 for pairs computed on other ranks.

Shape legend: T tokens, E logical experts, K top-K, H hidden, I expert
intermediate, S slots per rank, W world (EP) size, R rows received.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moeshard.engine.comm import AllToAll
from moeshard.kernels.fused_moe import fused_expert_ffn
from moeshard.core.placement import Placement, replica_table

_M32 = 0xFFFFFFFF


def route_topk(router_logits: torch.Tensor, top_k: int, model_type: str, norm_topk_prob: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K routing. router_logits [T, E] -> (weights [T, K] float32, experts [T, K] int64).

    Softmax in float32 over all experts, top-K, then renormalise over the K
    (always for Mixtral, when ``norm_topk_prob`` for Qwen3-MoE), as
    transformers' Qwen3MoeTopKRouter / MixtralTopKRouter do.
    """
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if model_type == "mixtral" or norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def mix_hash_torch(token_keys: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Torch port of placement.mix_hash: uniform float64 in [0, 1) per pair, bit-identical."""
    h = (token_keys.to(torch.int64) * 0x9E3779B1 + experts.to(torch.int64) * 0x85EBCA77) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    h = h ^ (h >> 12)
    h = (h * 0x297A2D39) & _M32
    h = h ^ (h >> 15)
    return h.to(torch.float64) / 2.0**32


class ReplicaTable:
    """One layer's replica lookup, precomputed from the placement (torch port of replica_slot).

    Tables [G*S]: ``order`` slots grouped by expert (slot order inside a
    group), ``sorted_experts``, and ``key`` = expert + cumulative share inside
    the group. Built with the same numpy operations as the reference so the
    float64 keys are identical.
    """

    def __init__(self, placement: Placement, layer: int, device: torch.device | str = "cpu") -> None:
        order, sorted_experts, key = replica_table(placement, layer)
        self.order = torch.as_tensor(order, dtype=torch.int64, device=device)
        self.sorted_experts = torch.as_tensor(sorted_experts, dtype=torch.int64, device=device)
        self.key = torch.as_tensor(key, dtype=torch.float64, device=device)

    def slots(self, token_keys: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Physical slot of each (token, expert) pair. token_keys, experts: same shape, e.g. [T, K]."""
        experts = experts.to(torch.int64)
        u = mix_hash_torch(token_keys, experts)
        idx = torch.searchsorted(self.key, experts.to(torch.float64) + u, right=True)
        first = torch.searchsorted(self.sorted_experts, experts, right=False)
        last = torch.searchsorted(self.sorted_experts, experts, right=True) - 1
        return self.order[torch.minimum(torch.maximum(idx, first), last)]


class MoELayer:
    """One sparse MoE block spread over the EP group.

    Holds the router weight [E, H] (replicated) and this rank's S expert slots:
    w_gate_up [S, 2I, H] (gate rows first), w_down [S, H, I]. ``counts`` [E]
    accumulates the (token, k) pairs this rank routed to each logical expert.
    """

    def __init__(self, *, moe_index: int, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 placement: Placement, rank: int, comm: AllToAll, top_k: int, model_type: str,
                 norm_topk_prob: bool) -> None:
        self.moe_index = moe_index
        self.router_weight = router_weight
        self.top_k = top_k
        self.model_type = model_type
        self.norm_topk_prob = norm_topk_prob
        self.rank = rank
        self.comm = comm
        self.counts = torch.zeros(placement.num_experts, dtype=torch.int64, device=router_weight.device)
        self.set_placement(placement, w_gate_up, w_down)

    def set_placement(self, placement: Placement, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """Adopt a placement and the matching local slot weights [S, 2I, H], [S, H, I]."""
        s = placement.slots_per_gpu
        if w_gate_up.shape[0] != s or w_down.shape[0] != s:
            raise ValueError(f"expert weights hold {w_gate_up.shape[0]} slots, placement has slotsPerGpu {s}")
        self.placement = placement
        self.slots_per_rank = s
        self.table = ReplicaTable(placement, self.moe_index, self.router_weight.device)
        self.w_gate_up = w_gate_up
        self.w_down = w_down
        self.comm.slots_per_rank = s

    def route(self, x: torch.Tensor, token_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H], token_keys [T] -> (experts [T, K] logical, slots [T, K] physical, weights [T, K] float32)."""
        logits = F.linear(x, self.router_weight)
        weights, experts = route_topk(logits, self.top_k, self.model_type, self.norm_topk_prob)
        slots = self.table.slots(token_keys[:, None].expand_as(experts), experts)
        return experts, slots, weights

    def forward(self, x: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
        """COLLECTIVE over the EP group (every rank calls it, T may be 0). x [T, H] -> [T, H]."""
        experts, slots, weights = self.route(x, token_keys)
        self.counts += torch.bincount(experts.reshape(-1), minlength=self.counts.numel())
        s = self.slots_per_rank
        recv_x, recv_slot, recv_w, handle = self.comm.dispatch(x, slots // s, slots % s, weights.to(x.dtype))
        # The kernel picks its launch bucket by the pairs it really computes; rows
        # received for other slots are -1. Counting them costs a sync on CUDA, which
        # the uneven all-to-all (host-side split sizes) has already paid. The CPU
        # twin does not bucket.
        live = int((recv_slot >= 0).sum()) if recv_x.is_cuda else None
        y = fused_expert_ffn(recv_x, recv_slot, recv_w, self.w_gate_up, self.w_down, num_live_pairs=live)
        return self.comm.combine(y, handle)


def expert_transfers(old: Placement, new: Placement, layer: int) -> list[tuple[int, int, int, int]]:
    """Weight moves for one layer when the placement changes: (src_rank, src_slot, dst_rank, dst_slot).

    Only slots whose logical expert changes (or that are new) need weights.
    The source is the destination rank itself when it already holds the
    expert in an old slot (a local copy), else the old slot of that expert
    with the lowest index. Slots are local indices. Every rank computes the
    same list.
    """
    so, sn = old.slots_per_gpu, new.slots_per_gpu
    old_row, new_row = old.phy2log[layer], new.phy2log[layer]
    moves = []
    for g in range(new.num_gpus):
        for s in range(sn):
            expert = int(new_row[g * sn + s])
            if s < so and int(old_row[g * so + s]) == expert:
                continue
            holders = np.flatnonzero(old_row == expert)
            local = [h for h in holders if h // so == g]
            src = int(local[0]) if local else int(holders[0])
            moves.append((src // so, src % so, g, s))
    return moves
