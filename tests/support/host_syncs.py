"""Counting host syncs: calls that read a device value back to the host (or size an output by data).

Used in one process and inside spawned gloo ranks (importable by the children).
Counted: ``Tensor.item``, ``Tensor.tolist``, ``int()/float()/bool()`` of a
tensor, ``torch.nonzero`` / ``Tensor.nonzero``, ``torch.bincount`` without
``minlength`` and ``torch.repeat_interleave`` / ``Tensor.repeat_interleave``
with a tensor of repeats and no ``output_size``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch


class SyncCounter:
    """Patches the calls above while active; ``counts`` by name, ``paused()`` stops counting inside."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._paused = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _hit(self, name: str) -> None:
        if not self._paused:
            self.counts[name] += 1

    @contextlib.contextmanager
    def active(self) -> Iterator[SyncCounter]:
        saved: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, counted: Any) -> None:
            original = getattr(owner, name)
            saved.append((owner, name, original))

            def wrapper(*args, **kwargs):
                if counted(args, kwargs):
                    self._hit(f"{getattr(owner, '__name__', owner)}.{name}")
                with self.paused():  # a counted call made inside another is one sync
                    return original(*args, **kwargs)

            setattr(owner, name, wrapper)

        always = lambda args, kwargs: True  # noqa: E731
        for name in ("item", "tolist", "nonzero", "__int__", "__float__", "__bool__", "__index__"):
            patch(torch.Tensor, name, always)
        patch(torch, "nonzero", always)
        patch(torch, "bincount", lambda args, kwargs: not kwargs.get("minlength", args[2] if len(args) > 2 else 0))

        def repeats_unsized(args, kwargs) -> bool:
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
            return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None

        patch(torch, "repeat_interleave", repeats_unsized)
        patch(torch.Tensor, "repeat_interleave", repeats_unsized)
        try:
            yield self
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)


def count_layer_syncs(layer: Any, x: torch.Tensor, keys: torch.Tensor) -> tuple[SyncCounter, torch.Tensor]:
    """One ``layer.forward(x, keys)`` under a SyncCounter, expert compute excluded (see the test module)."""
    import moeshard.engine.moe as moe

    counter = SyncCounter()
    kernel = moe.fused_expert_ffn

    def uncounted_kernel(*args, **kwargs):
        with counter.paused():
            return kernel(*args, **kwargs)

    moe.fused_expert_ffn = uncounted_kernel
    try:
        with counter.active():
            out = layer.forward(x, keys)
    finally:
        moe.fused_expert_ffn = kernel
    return counter, out


def sync_budget_task(rank: int, world: int, layouts: list[tuple[int, bool]]) -> list[dict[str, Any]]:
    """One counted MoE layer forward per (gpus_per_domain, padded) layout, in one gloo world."""
    return [_sync_budget_case(rank, world, domain, padded) for domain, padded in layouts]


def _sync_budget_case(rank: int, world: int, gpus_per_domain: int, padded: bool) -> dict[str, Any]:
    """One MoE layer forward on this rank of a gloo world, counted; returns counts and the output."""
    from moeshard.engine.comm import make_all_to_all
    from moeshard.engine.config import ParallelConfig
    from moeshard.engine.moe import MoELayer
    from moeshard.core.placement import initial_placement

    experts, hidden, inter, tokens = 8, 16, 8, 6
    placement = initial_placement(1, experts, world, experts // world)
    parallel = ParallelConfig(rank=rank, world_size=world, gpus_per_domain=gpus_per_domain)
    comm = make_all_to_all(parallel, placement.slots_per_gpu)
    comm.padded = padded
    g = torch.Generator().manual_seed(7)
    router = torch.randn(experts, hidden, generator=g)
    w_gu, w_dn = torch.randn(experts, 2 * inter, hidden, generator=g), torch.randn(experts, hidden, inter, generator=g)
    s = placement.slots_per_gpu
    mine = placement.phy2log[0, rank * s:(rank + 1) * s]
    layer = MoELayer(moe_index=0, router_weight=router, w_gate_up=w_gu[mine].clone(), w_down=w_dn[mine].clone(),
                     placement=placement, rank=rank, comm=comm, top_k=2, model_type="mixtral", norm_topk_prob=True)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(100 + rank))
    keys = torch.arange(rank * tokens, (rank + 1) * tokens)
    counter, out = count_layer_syncs(layer, x, keys)
    return {"counts": dict(counter.counts), "out": out.numpy(), "rank_tokens": comm.stats.rank_tokens,
            "link_bytes": dict(comm.stats.link_bytes), "experts": np.asarray(layer.counts)}
