"""Minimum-move GPU relabelling: lay a from-scratch plan onto the live slots.

A from-scratch plan says which experts go together on a GPU, not which
physical GPU they land on: any permutation of its GPUs (and of the slots
inside a GPU) balances the same. ``relabel_onto`` picks the permutation
that needs the fewest expert weight copies from the live placement:

1. cost[g, h] = replicas the new group h holds that live GPU g lacks (a
   multiset difference over experts), for every (g, h) pair;
2. a minimum-cost perfect matching of live GPUs to new groups (Hungarian
   method, ``scipy.optimize.linear_sum_assignment``), one per layer;
3. inside each GPU, an expert it keeps stays in its old slot; the new ones
   fill the freed slots in order.

Shape legend: L layers, E experts, G GPUs, S slots per GPU, N = G*S.
"""

from __future__ import annotations

import numpy as np


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's Hungarian solver, imported on first use: ``moeshard --help`` builds every subcommand's parser,
    also in the engine image, which has no scipy (the operator extra's)."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost)


def held(phy2log: np.ndarray, num_gpus: int, slots_per_gpu: int, num_experts: int) -> np.ndarray:
    """[L, G, E] replicas of each expert on each GPU."""
    num_layers = phy2log.shape[0]
    out = np.zeros((num_layers, num_gpus, num_experts), dtype=np.int32)
    rows = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    gpu = np.broadcast_to(np.arange(phy2log.shape[1])[None, :] // slots_per_gpu, phy2log.shape)
    np.add.at(out, (rows, gpu, phy2log), 1)
    return out


def relabel_onto(live: np.ndarray, plan: np.ndarray, num_gpus: int, slots_per_gpu: int,
                 num_experts: int, gpus_per_domain: int | None = None) -> np.ndarray:
    """Slot permutation perm [L, N]: ``plan[l, perm[l]]`` needs the fewest copies from ``live`` [L, N].

    The per-GPU expert multisets of ``plan`` are unchanged, so its balance is
    too; only which physical GPU and slot holds them moves. Apply the same
    permutation to the plan's shares. With ``gpus_per_domain`` whole domains
    move together (a domain's GPUs stay one domain: group-aware plans keep
    their groups inside one domain): domains are matched by the cost of
    their best GPU matching, then GPUs inside each matched pair.
    """
    live = np.asarray(live, dtype=np.int64)
    plan = np.asarray(plan, dtype=np.int64)
    if live.shape != plan.shape:
        raise ValueError(f"plan: shape {plan.shape} differs from the live placement's {live.shape}")
    g, s = num_gpus, slots_per_gpu
    h_live = held(live, g, s, num_experts)
    h_plan = held(plan, g, s, num_experts)
    perm = np.empty(plan.shape, dtype=np.int64)
    # 1. cost[l, g, h] = sum_e max(plan_h[e] - live_g[e], 0) = S - sum_e min(plan_h[e], live_g[e]).
    cost = s - np.minimum(h_plan[:, None, :, :].astype(np.int16), h_live[:, :, None, :].astype(np.int16)).sum(axis=3)
    for layer in range(live.shape[0]):
        # 2. Live GPU g takes the plan's GPU assign[g].
        if gpus_per_domain is None or gpus_per_domain >= g:
            _, assign = linear_sum_assignment(cost[layer])
        else:
            assign = _domain_assignment(cost[layer], gpus_per_domain)
        src = assign[:, None] * s + np.arange(s)[None, :]  # [G, S] plan slots per live GPU
        perm[layer] = _keep_slots(live[layer].reshape(g, s), plan[layer][src], src).ravel()
    return perm


def _domain_assignment(cost: np.ndarray, size: int) -> np.ndarray:
    """[G] plan GPU for each live GPU, moving whole domains of ``size`` GPUs; cost [G, G]."""
    domains = cost.shape[0] // size
    inner = {}
    block = np.empty((domains, domains))
    for a in range(domains):
        for b in range(domains):
            sub = cost[a * size:(a + 1) * size, b * size:(b + 1) * size]
            rows, cols = linear_sum_assignment(sub)
            inner[a, b] = cols
            block[a, b] = sub[rows, cols].sum()
    _, match = linear_sum_assignment(block)
    return np.concatenate([match[a] * size + inner[a, match[a]] for a in range(domains)])


def _keep_slots(old: np.ndarray, new: np.ndarray, src: np.ndarray) -> np.ndarray:
    """[G, S] plan slots per live slot: entries of ``new`` [G, S] that ``old`` [G, S] holds stay in their slots.

    ``src`` [G, S]: the plan slot of each entry of ``new``. Per GPU, an expert
    present in both keeps the old slot (the k-th copy matches the k-th copy),
    the rest fill the freed slots in order.
    """
    num_gpus, s = old.shape
    out = np.empty_like(src)
    for gpu in range(num_gpus):
        o, n = old[gpu].tolist(), new[gpu].tolist()
        if o == n:
            out[gpu] = src[gpu]
            continue
        free = list(range(s))
        order = [-1] * s
        for slot, expert in enumerate(o):
            for j in free:
                if n[j] == expert:
                    order[slot] = j
                    free.remove(j)
                    break
        rest = iter(free)
        out[gpu] = [src[gpu, j if j >= 0 else next(rest)] for j in order]
    return out
