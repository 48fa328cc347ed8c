"""Group-aware packing for routers with expert groups (DeepSeek-V3's group-limited routing).

DeepSeek-V3 routes each token to its top-K experts inside its best
``topk_group`` of ``n_group`` expert groups (consecutive blocks of E/Q
experts). When every expert of a group, replicas included, lives inside one
NVLink domain, a token's pairs reach at most ``topk_group`` domains: the
inter-domain traffic the routing was designed to bound. This planner keeps
that property, from scratch:

1. Group loads [L, Q]; whole groups go to domains, heaviest first onto the
   lightest domain with room (Q/M groups per domain).
2. Inside each domain, the balancer's from-scratch plan (replication by
   per-replica load, greedy packing, levelled shares) over the domain's
   experts and its D*S slots.

``relabel_onto(..., gpus_per_domain=D)`` then maps such a plan onto the live
slots moving whole domains, so the property survives relabelling.

Shape legend: L layers, E experts, Q groups, M domains of D GPUs, S slots per GPU.
"""

from __future__ import annotations

import numpy as np

from moeshard.core.placement import PlacementError

from .balancer import rebalance_placement


def check_groups(num_experts: int, num_groups: int, num_gpus: int, slots_per_gpu: int, gpus_per_domain: int) -> int:
    """Validate the grouped layout; return the number of domains M. Errors name the field."""
    if num_groups < 1 or num_experts % num_groups:
        raise PlacementError(f"expertGroups: {num_groups} must divide the {num_experts} experts")
    if gpus_per_domain < 1 or num_gpus % gpus_per_domain:
        raise PlacementError(f"gpusPerDomain: {gpus_per_domain} must divide the {num_gpus} GPUs")
    domains = num_gpus // gpus_per_domain
    if num_groups % domains:
        raise PlacementError(f"expertGroups: {num_groups} groups do not split evenly over {domains} NVLink domains")
    if gpus_per_domain * slots_per_gpu < num_experts // domains:
        raise PlacementError(f"slotsPerGpu: {gpus_per_domain} GPUs x {slots_per_gpu} slots of one domain cannot hold "
                             f"its {num_experts // domains} experts")
    return domains


def grouped_routing(expert_groups: int, num_experts: int, num_gpus: int, slots_per_gpu: int,
                    gpus_per_domain: int | None) -> int | None:
    """The expert groups the balancer must keep inside NVLink domains, or None when there is nothing to keep.

    None when the router is not group-limited (``expert_groups`` <= 1), when the EP group is one
    domain (every placement keeps the groups inside it), or when the groups cannot be split over
    the domains whole (``check_groups`` refuses the layout; plans are then not grouped).
    """
    domain = num_gpus if gpus_per_domain is None else min(gpus_per_domain, num_gpus)
    if expert_groups <= 1 or domain >= num_gpus:
        return None
    try:
        check_groups(num_experts, expert_groups, num_gpus, slots_per_gpu, domain)
    except PlacementError:
        return None
    return expert_groups


def assign_groups(group_loads: np.ndarray, num_domains: int) -> np.ndarray:
    """[L, Q] domain of each group: heaviest group first onto the lightest domain with room."""
    num_layers, num_groups = group_loads.shape
    per_domain = num_groups // num_domains
    rows = np.arange(num_layers)
    order = np.argsort(-group_loads, axis=1, kind="stable")
    load = np.zeros((num_layers, num_domains))
    used = np.zeros((num_layers, num_domains), dtype=np.int64)
    out = np.empty((num_layers, num_groups), dtype=np.int64)
    for i in range(num_groups):
        q = order[:, i]
        d = np.where(used >= per_domain, np.inf, load).argmin(axis=1)
        out[rows, q] = d
        load[rows, d] += group_loads[rows, q]
        used[rows, d] += 1
    return out


def grouped_plan(loads: np.ndarray, num_gpus: int, slots_per_gpu: int, gpus_per_domain: int,
                 num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log, weights) [L, G*S] from scratch, every group's replicas inside the domain it is assigned to."""
    loads = np.asarray(loads, dtype=np.float64)
    num_layers, num_experts = loads.shape
    domains = check_groups(num_experts, num_groups, num_gpus, slots_per_gpu, gpus_per_domain)
    size = num_experts // num_groups
    domain_of = assign_groups(loads.reshape(num_layers, num_groups, size).sum(axis=2), domains)
    span = gpus_per_domain * slots_per_gpu
    phy2log = np.empty((num_layers, num_gpus * slots_per_gpu), dtype=np.int64)
    weights = np.empty_like(phy2log, dtype=np.float64)
    for d in range(domains):
        # The experts of the groups in domain d, [L, E/M] (groups in ascending order).
        groups = np.sort(np.argsort(domain_of != d, axis=1, kind="stable")[:, : num_groups // domains], axis=1)
        experts = (groups[:, :, None] * size + np.arange(size)).reshape(num_layers, -1)
        sub = rebalance_placement(np.take_along_axis(loads, experts, 1), gpus_per_domain, slots_per_gpu,
                                  gpus_per_domain).placement
        phy2log[:, d * span:(d + 1) * span] = np.take_along_axis(experts, sub.phy2log, 1)
        weights[:, d * span:(d + 1) * span] = sub.weights
    return phy2log, weights


def domains_hold_whole_groups(phy2log: np.ndarray, num_experts: int, num_groups: int, slots_per_domain: int) -> bool:
    """True when every group's slots (replicas included) lie in one domain, in every layer."""
    num_layers, n = phy2log.shape
    group = phy2log // (num_experts // num_groups)
    domain = np.broadcast_to(np.arange(n) // slots_per_domain, phy2log.shape)
    for q in range(num_groups):
        in_q = group == q
        lo = np.where(in_q, domain, np.iinfo(np.int64).max).min(axis=1)
        hi = np.where(in_q, domain, -1).max(axis=1)
        if np.any(lo != hi):
            return False
    return True
