"""Per-rank tasks for engine tests, run in spawned worlds (must be importable by the children).

``run_ranks`` tasks take (rank, world, ...); ``run_world`` tasks take (runtime, ...).
Everything a test checks is returned to the parent, which asserts there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moeshard.core.placement import parse_placement


def moe_layer_weights(seed: int, e: int, h: int, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded router [E, H], w_gate_up [E, 2I, H], w_down [E, H, I] (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(e, h, generator=g) * 2.0
    w_gate_up = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w_down = torch.randn(e, h, i, generator=g) / i**0.5
    return router, w_gate_up, w_down


def rank_tokens(seed: int, rank: int, counts: list[int], h: int, same_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens x [T_r, H] and their global keys [T_r] (offset by the earlier ranks' counts)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(counts[rank], h, generator=g)
    if same_row and counts[rank]:
        x = torch.ones(counts[rank], h)  # every token routes identically
    start = sum(counts[:rank])
    return x, torch.arange(start, start + counts[rank], dtype=torch.int64)


def moe_layer_task(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every case in this world (one world for many checks); results in case order."""
    return [moe_layer_case(rank, world, case) for case in cases]


def moe_layer_case(rank: int, world: int, case: dict[str, Any]) -> dict[str, Any]:
    """One EP MoE layer forward on this rank's tokens, with byte and count accounting."""
    from moeshard.engine.comm import make_all_to_all
    from moeshard.engine.config import ParallelConfig
    from moeshard.engine.moe import MoELayer

    placement = parse_placement(case["placement"])
    parallel = ParallelConfig(rank=rank, world_size=world, gpus_per_domain=case["gpus_per_domain"])
    comm = make_all_to_all(parallel, placement.slots_per_gpu, case["mode"])
    router, w_gu, w_dn = moe_layer_weights(case["seed"], placement.num_experts, case["hidden"], case["inter"])
    s = placement.slots_per_gpu
    mine = placement.phy2log[0, rank * s:(rank + 1) * s]
    layer = MoELayer(moe_index=0, router_weight=router, w_gate_up=w_gu[mine].clone(), w_down=w_dn[mine].clone(),
                     placement=placement, rank=rank, comm=comm, top_k=case["top_k"], model_type=case["model_type"],
                     norm_topk_prob=True)
    x, keys = rank_tokens(case["seed"], rank, case["counts"], case["hidden"], case.get("same_row", False))
    out = layer.forward(x, keys)
    return {
        "out": out.numpy(), "x": x.numpy(), "keys": keys.numpy(), "link_bytes": dict(comm.stats.link_bytes),
        "rank_tokens": list(comm.stats.rank_tokens), "counts": layer.counts.numpy(),
    }


def _expert_weights_match_checkpoint(runtime) -> bool:
    """Every local slot holds exactly the checkpoint weights of the logical expert the placement names."""
    from moeshard.engine.loading import CheckpointReader
    from moeshard.engine.model import load_local_experts

    reader = CheckpointReader(runtime.reader.model_dir)
    for li, moe in enumerate(runtime.model.moe_layers):
        gu, dn = load_local_experts(reader, runtime.config, runtime.placement, li, runtime.rank, moe.w_gate_up.device,
                                    moe.w_gate_up.dtype)
        if not (torch.equal(gu, moe.w_gate_up) and torch.equal(dn, moe.w_down)):
            return False
    return True


def oracle_task(runtime, prompts: list[list[int]], max_new_tokens: int, new_placements: list[str],
                probe: list[list[int]]) -> dict[str, Any]:
    """A probe forward (few tokens: experts with no tokens), then forward_logits + generate under the
    initial placement and again after applying each of ``new_placements`` in turn."""
    probe_logits = runtime.forward_logits(probe)
    probe_counts = runtime.expert_token_counts()
    phases = []
    placements = [None, *new_placements]
    for placement_json in placements:
        if placement_json is not None:
            runtime.apply_placement(parse_placement(placement_json))
        logits = runtime.forward_logits(prompts)
        generated = runtime.generate(prompts, max_new_tokens)
        phases.append({
            "logits": logits.numpy() if runtime.rank == 0 else None,
            "generated": generated,
            "placement_version": runtime.placement_version,
            "weights_ok": _expert_weights_match_checkpoint(runtime),
        })
    return {
        "probe_logits": probe_logits.numpy() if runtime.rank == 0 else None,
        "probe_counts": probe_counts,
        "phases": phases,
        "expert_tokens": runtime.expert_token_counts(),
        "rank_tokens": runtime.rank_token_counts(),
        "link_bytes": runtime.link_bytes(),
        "loaded_bytes": runtime.loaded_bytes(),
        "tp_rank": runtime.parallel.tp_rank,
    }


def generate_task(runtime, prompts: list[list[int]], max_new_tokens, eos_token_id) -> list[list[int]]:
    return runtime.generate(prompts, max_new_tokens, eos_token_id=eos_token_id)


def counts_after(runtime, prompts: list[list[int]]) -> np.ndarray:
    runtime.forward_logits(prompts)
    return runtime.expert_token_counts()
