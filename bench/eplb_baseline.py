"""DeepSeek's EPLB policy, reimplemented in numpy from its published description (the baseline).

Shape legend: L layers, E logical experts, N physical slots, G GPUs,
M nodes (NVLink domains), Q expert groups.

EPLB (github.com/deepseek-ai/EPLB) is stateless: every call recomputes the
whole placement from the window's load.

1. Replication: each redundant slot goes to the logical expert with the
   largest load per replica (load / replica count).
2. Balanced packing: items sorted by weight, heaviest first, each onto the
   lightest pack that still has room; every pack ends with the same number
   of items.
3. Hierarchical policy (when the Q expert groups divide over the M nodes):
   pack groups onto nodes, replicate inside each node with its share of the
   slots, then pack the node's replicas onto its GPUs. Global policy: one
   node and one group, i.e. steps 1 and 2 over all GPUs.

Dispatch splits a replicated expert's tokens evenly over its replicas, so the
shares written here are 1 / count. Written from the description above, not
from EPLB's code.
"""

from __future__ import annotations

import numpy as np

from moeshard.core.placement import Placement, placement_from_arrays


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items per layer into num_packs packs of n / num_packs items each.

    weight [L, n]. Returns pack [L, n] (pack of each item) and rank [L, n]
    (its position inside the pack).
    """
    num_layers, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly over {num_packs} packs")
    per_pack = n // num_packs
    rows = np.arange(num_layers)
    pack = np.empty((num_layers, n), dtype=np.int64)
    rank = np.empty((num_layers, n), dtype=np.int64)
    if num_packs == 1:
        pack[:] = 0
        rank[:] = np.arange(n)
        return pack, rank
    order = np.argsort(-weight, axis=1, kind="stable")
    load = np.zeros((num_layers, num_packs))
    used = np.zeros((num_layers, num_packs), dtype=np.int64)
    for i in range(n):
        item = order[:, i]
        p = np.where(used < per_pack, load, np.inf).argmin(axis=1)
        pack[rows, item] = p
        rank[rows, item] = used[rows, p]
        load[rows, p] += weight[rows, item]
        used[rows, p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Give the num_physical - m redundant slots to the largest per-replica loads.

    weight [L, m]. Returns phy2log [L, num_physical] (slot i < m holds expert
    i, the rest the replicas in the order chosen) and counts [L, m].
    """
    num_layers, m = weight.shape
    rows = np.arange(num_layers)
    phy2log = np.empty((num_layers, num_physical), dtype=np.int64)
    phy2log[:, :m] = np.arange(m)
    counts = np.ones((num_layers, m), dtype=np.int64)
    for i in range(m, num_physical):
        e = (weight / counts).argmax(axis=1)
        phy2log[:, i] = e
        counts[rows, e] += 1
    return phy2log, counts


def rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """EPLB's hierarchical policy. weight [L, E]; returns phy2log [L, N] (slot s on GPU s // (N / G))."""
    num_layers, num_experts = weight.shape
    if num_experts % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_physical % num_gpus:
        raise ValueError("hierarchical EPLB needs E % Q == Q % M == G % M == N % G == 0")
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    rows = np.arange(num_layers)[:, None]
    # 1. Groups onto nodes: node-major order of logical experts ("meta-logical" ids).
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    groups_per_node = num_groups // num_nodes
    group_slot = group_pack * groups_per_node + group_rank  # [L, Q] position of each group
    mlog_of_log = (group_slot[:, :, None] * group_size + np.arange(group_size)).reshape(num_layers, num_experts)
    log_of_mlog = np.empty_like(mlog_of_log)
    log_of_mlog[rows, mlog_of_log] = np.arange(num_experts)
    # 2. Replicate inside each node with its share of the slots.
    node_weight = np.take_along_axis(weight, log_of_mlog, axis=1).reshape(num_layers * num_nodes, experts_per_node)
    phy2mlog, mlog_counts = replicate_experts(node_weight, slots_per_node)
    # 3. Replicas onto the node's GPUs by per-replica load.
    per_replica = np.take_along_axis(node_weight / mlog_counts, phy2mlog, axis=1)
    pack, rank = balanced_packing(per_replica, gpus_per_node)
    slots_per_gpu = slots_per_node // gpus_per_node
    position = pack * slots_per_gpu + rank  # [L*M, slots_per_node]
    node_phy2mlog = np.empty_like(phy2mlog)
    node_phy2mlog[np.arange(num_layers * num_nodes)[:, None], position] = phy2mlog
    node_phy2mlog += (np.tile(np.arange(num_nodes), num_layers) * experts_per_node)[:, None]  # rows are (layer, node)
    phy2mlog_all = node_phy2mlog.reshape(num_layers, num_physical)
    return np.take_along_axis(log_of_mlog, phy2mlog_all, axis=1)


def rebalance_global(weight: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """EPLB's global policy: one node, one group. weight [L, E]; returns phy2log [L, N]."""
    return rebalance_hierarchical(weight, num_physical, 1, 1, num_gpus)


def eplb_placement(
    weight: np.ndarray, num_gpus: int, slots_per_gpu: int, version: int = 1,
    num_groups: int = 1, num_nodes: int = 1,
) -> Placement:
    """EPLB's plan as a Placement with even shares (hierarchical when num_nodes > 1)."""
    weight = np.asarray(weight, dtype=np.float64)
    num_physical = num_gpus * slots_per_gpu
    if num_nodes > 1:
        phy2log = rebalance_hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    else:
        phy2log = rebalance_global(weight, num_physical, num_gpus)
    counts = np.zeros(weight.shape, dtype=np.int64)
    np.add.at(counts, (np.broadcast_to(np.arange(weight.shape[0])[:, None], phy2log.shape), phy2log), 1)
    shares = 1.0 / np.take_along_axis(counts, phy2log, axis=1)
    return placement_from_arrays(version, num_gpus, slots_per_gpu, weight.shape[1], phy2log, shares)
