"""Hot-expert replication: a new expert placement from measured load (pure numpy).

Shape legend: L MoE layers, E logical experts, G GPUs (EP ranks), S slots per
GPU, N = G*S physical slots, C most replicas of one expert, R most replicated
experts in one layer.

The balancer turns the tokens each logical expert received over the last
window, ``loads[L, E]``, into a Placement (see placement.py): which logical
expert each of the N slots holds and which share of that expert's tokens
each replica serves. Dispatch honours the shares, so a replicated expert's
load is a continuous quantity the balancer can pour where it is needed.

It differs from DeepSeek's EPLB (replicate by largest per-replica load, then
balanced packing, recomputed from scratch) in three ways:

* Incremental. Starting from the live placement it keeps every slot that is
  fine and changes a few: replica counts change only when the hottest
  per-replica load beats the coldest spare replica by a margin, and GPUs are
  evened by pairwise slot swaps from the heaviest GPUs (lexicographic: when
  the heaviest is pinned by one hot expert, the next ones, which make the
  next window's maximum). Each changed slot is one expert weight copy; the
  number per layer is capped.
* Shares. Once the slots are fixed, the replicated experts' shares are
  levelled by water-filling (block coordinate descent on the sum of squared
  GPU loads plus ``spread`` times the squared shares: spread 0 levels this
  window exactly, a little spread keeps part of the even split, whose lower
  per-GPU variance pays off on the next window). An expert split across a
  busy and an idle GPU gives the idle one more.
* Vectorised across layers. Every step works on [L, ...] arrays at once; the
  Python loops run over slots, experts of one colour class, or iterations,
  never over layers.

Topology: replicas of one expert never share a GPU when that is avoidable,
and, as a tie-break worth ``DOMAIN_PENALTY`` of the mean GPU load, a new
replica prefers an NVLink domain that does not hold the expert yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeshard.core.placement import Placement, PlacementError, placement_from_arrays, round_shares

DOMAIN_PENALTY = 0.01  # of the mean GPU load: how much balance a domain-spread tie-break may cost


@dataclass(frozen=True)
class BalancerOptions:
    """Knobs of ``rebalance_placement``; the defaults are what the bench measures.

    max_moves: most expert weight copies (slots whose expert changes) per layer
        in an incremental step; None means N // 4.
    min_gain: a swap must lower the pair's heavier GPU by this fraction of the
        mean GPU load (smaller gains are noise next window and cost a copy).
    replication_margin: move a replica from expert d to expert r only when r's
        per-replica load exceeds d's (after losing one) by this factor.
    use_shares: level replica shares by water-filling; False splits evenly
        (what EPLB's dispatch does), kept for the ablation in the bench.
    sweeps: water-filling sweeps (Gauss-Seidel over colour classes).
    spread: weight of the squared shares in the levelling objective (see _level_shares).
    sources: swaps start from one of this many heaviest GPUs (the heaviest that can improve).
    targets: swaps go to one of this many lightest GPUs (None: all).
    """

    max_moves: int | None = None
    min_gain: float = 0.008
    replication_margin: float = 0.1
    use_shares: bool = True
    sweeps: int = 8
    spread: float = 0.2
    sources: int = 4
    targets: int | None = None


# --------------------------------------------------------------------------- inputs


def check_loads(loads: object, num_experts: int | None = None) -> np.ndarray:
    """Validate per-layer expert loads; return float64 [L, E]. Errors name the field."""
    try:
        arr = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlacementError("loads: must be a list of per-layer lists of numbers") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise PlacementError(f"loads: must be [layers][experts] with at least one of each, got shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        layer, expert = bad[0]
        raise PlacementError(f"loads[{layer}][{expert}]: must be a finite count >= 0, got {arr[layer, expert]}")
    if num_experts is not None and arr.shape[1] != num_experts:
        raise PlacementError(f"loads: has {arr.shape[1]} experts per layer, the placement has {num_experts}")
    return arr


def check_topology(num_experts: int, num_gpus: int, slots_per_gpu: int, gpus_per_domain: int | None) -> int:
    """Validate the topology; return the domain size (G when not given)."""
    if num_gpus < 1:
        raise PlacementError(f"numGpus: must be >= 1, got {num_gpus}")
    if slots_per_gpu < 1:
        raise PlacementError(f"slotsPerGpu: must be >= 1, got {slots_per_gpu}")
    if num_gpus * slots_per_gpu < num_experts:
        raise PlacementError(
            f"slotsPerGpu: {num_gpus} GPUs x {slots_per_gpu} slots = {num_gpus * slots_per_gpu} "
            f"is less than the {num_experts} experts"
        )
    domain = num_gpus if gpus_per_domain is None else gpus_per_domain
    if domain < 1:
        raise PlacementError(f"gpusPerDomain: must be >= 1, got {gpus_per_domain}")
    return min(domain, num_gpus)


# --------------------------------------------------------------------------- step 1: replica counts


def replicate_counts(loads: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """Replica counts [L, E] from scratch: each spare slot goes to the largest per-replica load.

    Counts never exceed G (one replica per GPU) unless N > E*G forces it.
    """
    num_layers, num_experts = loads.shape
    counts = np.ones((num_layers, num_experts), dtype=np.int64)
    rows = np.arange(num_layers)
    cap = num_gpus if num_slots <= num_experts * num_gpus else num_slots
    for _ in range(num_slots - num_experts):
        per_replica = np.where(counts < cap, loads / counts, -1.0)
        counts[rows, per_replica.argmax(axis=1)] += 1
    return counts


# --------------------------------------------------------------------------- step 2: packing from scratch


def pack_replicas(
    loads: np.ndarray, counts: np.ndarray, num_gpus: int, slots_per_gpu: int, gpus_per_domain: int
) -> np.ndarray:
    """Assign replicas to slots, heaviest per-replica load first, onto the lightest GPU with room.

    A GPU already holding the expert is skipped when another has room; a
    domain already holding it costs ``DOMAIN_PENALTY``. Returns phy2log [L, N].
    """
    num_layers, num_experts = loads.shape
    n = num_gpus * slots_per_gpu
    rows = np.arange(num_layers)
    # 1. The replica list per layer, heaviest per-replica load first.
    experts = np.repeat(np.tile(np.arange(num_experts), num_layers), counts.ravel()).reshape(num_layers, n)
    per_replica = np.take_along_axis(loads / counts, experts, axis=1)
    order = np.argsort(-per_replica, axis=1, kind="stable")
    experts = np.take_along_axis(experts, order, axis=1)
    per_replica = np.take_along_axis(per_replica, order, axis=1)
    # 2. Greedy placement, one replica per layer per step.
    gpu_load = np.zeros((num_layers, num_gpus))
    used = np.zeros((num_layers, num_gpus), dtype=np.int64)
    holds = np.zeros((num_layers, num_gpus, num_experts), dtype=bool)
    domain_of = np.arange(num_gpus) // gpus_per_domain
    num_domains = int(domain_of[-1]) + 1
    domain_holds = np.zeros((num_layers, num_domains, num_experts), dtype=bool)
    phy2log = np.empty((num_layers, n), dtype=np.int64)
    penalty = DOMAIN_PENALTY * loads.sum(axis=1, keepdims=True) / num_gpus
    for i in range(n):
        e = experts[:, i]
        full = used >= slots_per_gpu
        dup = holds[rows, :, e]
        score = gpu_load + penalty * domain_holds[rows[:, None], domain_of[None, :], e[:, None]]
        score = np.where(dup, score + 1e30, score)
        score = np.where(full, np.inf, score)
        g = score.argmin(axis=1)
        phy2log[rows, g * slots_per_gpu + used[rows, g]] = e
        used[rows, g] += 1
        gpu_load[rows, g] += per_replica[:, i]
        holds[rows, g, e] = True
        domain_holds[rows, domain_of[g], e] = True
    return _repair_duplicates(phy2log, num_gpus, slots_per_gpu)


def _repair_duplicates(phy2log: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Swap away two replicas of one expert on one GPU where a conflict-free swap exists.

    Greedy packing can paint itself into that corner on its last few slots;
    this pass is rare and runs per affected layer.
    """
    out = phy2log.copy()
    grid = out.reshape(out.shape[0], num_gpus, slots_per_gpu)
    ordered = np.sort(grid, axis=2)
    affected = np.flatnonzero((ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=(1, 2)))
    for layer in affected:
        for _ in range(out.shape[1]):
            g_rows = grid[layer]
            dup = next(((g, s) for g in range(num_gpus) for s in range(slots_per_gpu)
                        if g_rows[g, s] in g_rows[g, :s]), None)
            if dup is None:
                break
            g, s = dup
            e = g_rows[g, s]
            swap = next(((h, t) for h in range(num_gpus) if e not in g_rows[h]
                         for t in range(slots_per_gpu) if g_rows[h, t] not in g_rows[g]), None)
            if swap is None:
                break  # unavoidable with these counts
            h, t = swap
            g_rows[g, s], g_rows[h, t] = g_rows[h, t], e
    return out


# --------------------------------------------------------------------------- step 3: shares


@dataclass
class _State:
    """Mutable working state of one balancing run, all layers at once.

    phy2log [L, N] expert per slot; x [L, N] tokens per slot (its share of its
    expert's load); gpu_load [L, G]; holds [L, G, E] replicas of e on GPU g;
    counts [L, E]; moves [L] weight copies spent so far.
    """

    phy2log: np.ndarray
    x: np.ndarray
    gpu_load: np.ndarray
    holds: np.ndarray
    counts: np.ndarray
    moves: np.ndarray
    slots_per_gpu: int

    @classmethod
    def build(cls, loads: np.ndarray, phy2log: np.ndarray, num_gpus: int, slots_per_gpu: int,
              weights: np.ndarray | None = None) -> "_State":
        num_layers, num_experts = loads.shape
        rows = np.arange(num_layers)[:, None]
        counts = np.bincount((rows * num_experts + phy2log).ravel(),
                             minlength=num_layers * num_experts).reshape(num_layers, num_experts)
        if weights is None:
            weights = 1.0 / np.take_along_axis(counts, phy2log, axis=1)
        x = np.take_along_axis(loads, phy2log, axis=1) * weights
        gpu = np.arange(phy2log.shape[1]) // slots_per_gpu
        holds = np.bincount(((rows * num_gpus + gpu[None, :]) * num_experts + phy2log).ravel(),
                            minlength=num_layers * num_gpus * num_experts).reshape(num_layers, num_gpus, num_experts)
        # A GPU holds at most S replicas of one expert: int16 keeps the [L, G, E] table small enough
        # for the swap search's scattered reads to stay in cache (3 MB as int64 for 94 x 32 x 128).
        holds = holds.astype(np.int16 if slots_per_gpu < 2**15 else np.int64)
        gpu_load = x.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2)
        return cls(phy2log.copy(), x, gpu_load, holds, counts, np.zeros(num_layers, dtype=np.int64), slots_per_gpu)


def _replica_table(phy2log: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Slots of every replicated expert, [L, R, C], padded with -1."""
    num_layers, n = phy2log.shape
    replicated = counts >= 2
    num_rep = replicated.sum(axis=1)
    r_max = int(num_rep.max(initial=0))
    if r_max == 0:
        return np.full((num_layers, 0, 1), -1, dtype=np.int64)
    c_max = int(counts.max())
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert
    start = np.cumsum(counts, axis=1) - counts  # [L, E] first position of each expert in `order`
    layer_idx, expert_idx = np.nonzero(replicated)
    rank = (np.cumsum(replicated, axis=1) - 1)[layer_idx, expert_idx]
    table = np.full((num_layers, r_max, c_max), -1, dtype=np.int64)
    for j in range(c_max):
        has = counts[layer_idx, expert_idx] > j
        li, ei, ri = layer_idx[has], expert_idx[has], rank[has]
        table[li, ri, j] = order[li, start[li, ei] + j]
    return table


def _level_shares(state: _State, table: np.ndarray, sweeps: int, spread: float = 0.0) -> None:
    """Level every replicated expert's load over its GPUs, ``sweeps`` Gauss-Seidel passes.

    For one expert with total w and its GPUs' loads without it b_1..b_c this
    minimises sum_i (b_i + x_i)^2 + spread * sum_i x_i^2 over shares x >= 0
    summing to w: x_i = max(0, lam - b_i) / (1 + spread) with
    lam = min_j (w (1 + spread) + b_(1) + ... + b_(j)) / j over the j lightest
    (water-filling). spread = 0 levels the GPUs exactly on this window's load;
    spread > 0 keeps some of the even split, whose smaller per-GPU variance
    pays off on the next window. Two replicas on one GPU (only when
    unavoidable) count once: the second gets share 0. table [L, R, C]: the
    slots of every replicated expert (``_replica_table``).
    """
    _level_table(state, table, np.arange(table.shape[0]), sweeps, spread)


def _color_experts(gpu: np.ndarray, valid: np.ndarray, num_gpus: int) -> np.ndarray:
    """Greedy colouring [n, R] of the experts of tab so that experts of one colour share no GPU.

    Experts of one colour can be levelled at the same time with the exact
    result of levelling them one after another.
    """
    n, r_max, _ = gpu.shape
    occupied = np.zeros((n, r_max, num_gpus), dtype=bool)  # [n, colour, GPU]
    color = np.zeros((n, r_max), dtype=np.int64)
    rows = np.arange(n)[:, None]
    for k in range(r_max):
        g, v = gpu[:, k], valid[:, k]
        busy = (occupied[rows, :, g] & v[:, :, None]).any(axis=1)  # [n, colour]
        color[:, k] = busy.argmin(axis=1)  # first free colour; colour k is always free
        li, ci = np.nonzero(v)  # valid entries only: padding points at GPU 0 and must not mark it
        occupied[li, color[li, k], g[li, ci]] = True
    return color


def _level_table(state: _State, tab: np.ndarray, layers: np.ndarray, sweeps: int, spread: float) -> None:
    """Water-filling of ``_level_shares`` over tab [n, R, C] (slots of R experts) of ``layers`` [n]."""
    n, r_max, c_max = tab.shape
    if r_max == 0 or sweeps == 0 or n == 0:
        return
    s = state.slots_per_gpu
    num_gpus = state.gpu_load.shape[1]
    # 1. Structure of the table, once: valid entries, GPUs, duplicates on one GPU.
    valid = tab >= 0
    safe = np.where(valid, tab, 0)
    gpu = safe // s
    same = (gpu[..., :, None] == gpu[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    first = valid & ~(same & np.tril(np.ones((c_max, c_max), dtype=bool), k=-1)).any(axis=-1)
    has_dup = bool((valid & ~first).any())
    # 2. Colour classes: experts that share no GPU are levelled together.
    color = _color_experts(gpu, valid, num_gpus) if r_max > 1 else np.zeros((n, 1), dtype=np.int64)
    # Per class: its entries [n, Rc, C] as flat indices into x [n, N] and gl [n, G] (gathers are then
    # plain takes), and the valid entries once more as flat positions inside the class.
    n_slots = state.x.shape[1]
    rows = np.arange(n)[:, None, None]
    classes = []
    for c in range(int(color.max()) + 1):
        member = (color == c) & valid.any(axis=2)
        width = int(member.sum(axis=1).max())
        if width == 0:
            continue
        pick = np.argsort(~member, axis=1, kind="stable")[:, :width]  # [n, Rc] members first
        pad = np.take_along_axis(member, pick, 1)[:, :, None]
        v = np.take_along_axis(valid, pick[:, :, None], 1) & pad
        x_at = rows * n_slots + np.take_along_axis(safe, pick[:, :, None], 1)
        g_at = rows * num_gpus + np.take_along_axis(gpu, pick[:, :, None], 1)
        at_v = np.flatnonzero(v)
        classes.append((v, x_at, g_at, np.take_along_axis(first, pick[:, :, None], 1) & pad,
                        np.take_along_axis(same, pick[:, :, None, None], 1) if has_dup else None,
                        at_v, x_at.ravel()[at_v], g_at.ravel()[at_v]))
    gl, x = state.gpu_load[layers], state.x[layers]  # copies: contiguous, so ravel() are views
    gl_flat, x_flat = gl.ravel(), x.ravel()
    j = np.arange(1, c_max + 1)
    # 3. Gauss-Seidel over the colour classes, every layer at once.
    for _ in range(sweeps):
        for v, x_at, g_at, f, sm, at_v, x_v, g_v in classes:
            xs = np.where(v, x_flat[x_at], 0.0)
            own = (sm * xs[:, :, None, :]).sum(axis=3) if has_dup else xs
            base = np.where(f, gl_flat[g_at] - own, np.inf)
            w = xs.sum(axis=2)
            level = ((w[:, :, None] * (1.0 + spread) + np.cumsum(np.sort(base, axis=2), axis=2)) / j).min(axis=2)
            new = np.where(f, np.maximum(0.0, level[:, :, None] - np.where(f, base, 0.0)) / (1.0 + spread), 0.0)
            new_v = new.ravel()[at_v]
            delta = new_v - xs.ravel()[at_v]
            if has_dup:
                np.add.at(gl_flat, g_v, delta)
            else:
                gl_flat[g_v] += delta  # one colour's experts share no GPU: distinct indices
            x_flat[x_v] = new_v
    state.gpu_load[layers], state.x[layers] = gl, x


# --------------------------------------------------------------------------- step 4: incremental changes


def _adjust_counts(state: _State, loads: np.ndarray, margin: float, budget: np.ndarray, domain_of: np.ndarray) -> None:
    """Move replicas from over- to under-replicated experts, one copy per move.

    Receiver r: largest per-replica load. Donor d: a replicated expert with the
    smallest per-replica load after losing one. Applied while load_r / c_r >
    (1 + margin) * load_d / (c_d - 1). The donor replica chosen is the one on
    the lightest GPU that does not hold r (preferring a domain without r).
    """
    num_layers, num_experts = loads.shape
    num_gpus = state.gpu_load.shape[1]
    s = state.slots_per_gpu
    rows = np.arange(num_layers)
    slot_gpu = np.arange(state.phy2log.shape[1]) // s
    penalty = DOMAIN_PENALTY * loads.sum(axis=1) / num_gpus
    active = state.moves + 1 <= budget
    for _ in range(int(budget.max(initial=0))):
        if not active.any():
            break
        per = np.where(state.counts < num_gpus, loads / state.counts, -1.0)
        r = per.argmax(axis=1)
        after = np.where(state.counts >= 2, loads / np.maximum(state.counts - 1, 1), np.inf)
        d = after.argmin(axis=1)
        go = active & (per[rows, r] > (1.0 + margin) * after[rows, d]) & (r != d)
        # The donor slot: one of d's replicas, on a GPU without r, lightest first.
        is_d = state.phy2log == d[:, None]
        r_on_gpu = state.holds[rows, :, r] > 0  # [L, G]
        r_domains = np.zeros((num_layers, int(domain_of[-1]) + 1), dtype=bool)
        np.logical_or.at(r_domains, (np.repeat(rows, num_gpus), np.tile(domain_of, num_layers)), r_on_gpu.ravel())
        score = state.gpu_load[:, slot_gpu] - state.x + penalty[:, None] * r_domains[:, domain_of[slot_gpu]]
        score = np.where(is_d & ~r_on_gpu[:, slot_gpu], score, np.inf)
        slot = score.argmin(axis=1)
        go &= np.isfinite(score[rows, slot])
        if not go.any():
            break
        li, sl, rr, dd = rows[go], slot[go], r[go], d[go]
        g = slot_gpu[sl]
        state.gpu_load[li, g] -= state.x[li, sl]
        state.x[li, sl] = 0.0
        state.holds[li, g, dd] -= 1
        state.holds[li, g, rr] += 1
        state.counts[li, dd] -= 1
        state.counts[li, rr] += 1
        state.phy2log[li, sl] = rr
        state.moves[li] += 1
        # Even split for the two experts whose counts changed; levelling refines it.
        for e in (dd, rr):
            mask = state.phy2log[li] == e[:, None]
            new_x = np.where(mask, (loads[li, e] / state.counts[li, e])[:, None], state.x[li])
            delta = (new_x - state.x[li]).reshape(li.size, num_gpus, s).sum(axis=2)
            state.gpu_load[li] += delta
            state.x[li] = new_x
        active = state.moves + 1 <= budget


def _swap_step(
    state: _State, min_gain: float, sources: int, targets: int | None, layers: np.ndarray, room: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """At most one slot swap per layer, from one of the ``sources`` heaviest GPUs to a lighter one.

    A swap between GPU i and a lighter GPU j is an improvement when the
    heavier of the two afterwards stays below i's load by min_gain of the
    mean: the sorted load vector then decreases, so the search terminates.
    The heaviest source with an improving swap wins (the maximum first; when
    the maximum is pinned by one hot expert, the next GPUs, which are what
    the next window's maximum is made of); its swap minimises that heavier
    load. Targets: the ``targets`` lightest GPUs (all when None). Never puts
    two replicas of one expert on one GPU.

    ``layers``: indices of the layers to search; ``room`` [len(layers)]: swaps
    each may still make. Up to ``sources`` swaps per layer per step, on
    disjoint GPU pairs. Returns rounds of (layers, slots a, slots b), each
    round with distinct layers.
    """
    num_gpus = state.gpu_load.shape[1]
    num_layers = layers.size
    s = state.slots_per_gpu
    if num_gpus < 2 or num_layers == 0:
        return []
    gpu_load, x, phy2log = state.gpu_load[layers], state.x[layers], state.phy2log[layers]
    rows = np.arange(num_layers)
    m = min(sources, num_gpus - 1)
    k = num_gpus if targets is None else min(targets, num_gpus)
    by_load = np.argsort(-gpu_load, axis=1, kind="stable")
    src, dst = by_load[:, :m], by_load[:, num_gpus - k:]
    # 1. Candidates: [L, m, S] source slots against [L, k, S] target slots, laid out as
    #    [L, m, k, S_a, S_b] so that one (source, target) pair's S x S block is contiguous.
    a = src[:, :, None] * s + np.arange(s)
    b = dst[:, :, None] * s + np.arange(s)
    x32 = x.astype(np.float32)  # float32 for the search (a 0.4% gain threshold needs no more); float64 state
    xa, xb = x32[rows[:, None, None], a], x32[rows[:, None, None], b]
    ea, eb = phy2log[rows[:, None, None], a], phy2log[rows[:, None, None], b]
    load32 = gpu_load.astype(np.float32)
    la, lb = np.take_along_axis(load32, src, 1), np.take_along_axis(load32, dst, 1)
    delta = xb[:, None, :, None, :] - xa[:, :, None, :, None]  # load the source GPU gains
    worst = la[:, :, None, None, None] + delta
    np.maximum(worst, lb[:, None, :, None, None] - delta, out=worst)
    # 2. Forbidden: a replica of the expert already on the other GPU (this covers a swap within one
    #    GPU and a swap of two replicas of one expert too: the GPU then holds the expert), read from
    #    the holds only where a candidate needs them, as +inf added to the candidate's load.
    of = layers[:, None, None, None]
    a_on_dst = state.holds[of, dst[:, None, :, None], ea[:, :, None, :]] > 0  # [L, m, k, S_a]
    b_on_src = state.holds[of, src[:, :, None, None], eb[:, None, :, :]] > 0  # [L, m, k, S_b]
    worst += np.where(a_on_dst, np.float32(np.inf), np.float32(0.0))[..., :, None]
    worst += np.where(b_on_src, np.float32(np.inf), np.float32(0.0))[..., None, :]
    # Best swap per (source GPU, target GPU): [L, m, k], and where it is inside the S x S block;
    # it counts only when it lowers the source by min_gain of the mean.
    block = worst.reshape(num_layers, m, k, s * s)
    where = block.argmin(axis=3)
    best = np.take_along_axis(block, where[..., None], 3)[..., 0]
    limit = la - np.float32(min_gain) * load32.mean(axis=1, keepdims=True)  # [L, m]
    best[best >= limit[:, :, None]] = np.inf
    # 3. Heaviest source first, each source takes its best target among the GPUs
    #    no earlier swap of this step touched (so the loads it was scored on hold).
    used = np.zeros((num_layers, num_gpus), dtype=bool)
    left = room.copy()
    rounds = []
    for r in range(m):
        options = np.where(used[rows[:, None], dst], np.inf, best[:, r])  # [L, k]
        j = options.argmin(axis=1)
        ok = np.isfinite(options[rows, j]) & (left >= 1) & ~used[rows, src[:, r]]
        if not ok.any():
            continue
        sub, jj = rows[ok], j[ok]
        w = where[sub, r, jj]
        sa = a[sub, r, w // s]
        sb = b[sub, jj, w % s]
        used[sub, sa // s] = True
        used[sub, sb // s] = True
        left[sub] -= 1
        li = layers[sub]
        _apply_swap(state, li, sa, sb)
        rounds.append((li, sa, sb))
    return rounds


def _apply_swap(state: _State, li: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> None:
    """Swap slots sa and sb (with their replicas and tokens) in layers li (distinct layers)."""
    s = state.slots_per_gpu
    g_a, g_b = sa // s, sb // s
    e_a, e_b = state.phy2log[li, sa], state.phy2log[li, sb]
    x_a, x_b = state.x[li, sa], state.x[li, sb]
    state.phy2log[li, sa], state.phy2log[li, sb] = e_b, e_a
    state.x[li, sa], state.x[li, sb] = x_b, x_a
    state.gpu_load[li, g_a] += x_b - x_a
    state.gpu_load[li, g_b] += x_a - x_b
    state.holds[li, g_a, e_a] -= 1
    state.holds[li, g_a, e_b] += 1
    state.holds[li, g_b, e_b] -= 1
    state.holds[li, g_b, e_a] += 1
    state.moves[li] += 2


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class BalanceResult:
    """A new placement with what it cost. moves [L]: slots whose logical expert changed."""

    placement: Placement
    moves: np.ndarray


def rebalance_placement(
    loads: object,
    num_gpus: int,
    slots_per_gpu: int,
    gpus_per_domain: int | None = None,
    previous: Placement | None = None,
    options: BalancerOptions | None = None,
) -> BalanceResult:
    """A new placement for ``loads[L, E]`` tokens per layer and logical expert.

    With ``previous`` (same L, E, G, S) the plan is incremental: at most
    ``options.max_moves`` slots per layer change expert, and version =
    previous.version + 1. Without it the plan is built from scratch
    (version 1 when there is no previous placement). Raises PlacementError
    naming the bad field.
    """
    opts = options or BalancerOptions()
    arr = check_loads(loads)
    num_layers, num_experts = arr.shape
    domain = check_topology(num_experts, num_gpus, slots_per_gpu, gpus_per_domain)
    n = num_gpus * slots_per_gpu
    domain_of = np.arange(num_gpus) // domain
    if previous is not None:
        _check_previous(previous, arr, num_gpus, slots_per_gpu)
        # 1. Start from the live placement and its shares: zero copies so far.
        state = _State.build(arr, previous.phy2log, num_gpus, slots_per_gpu, previous.weights)
        cap = n // 4 if opts.max_moves is None else opts.max_moves
        budget = np.full(num_layers, cap, dtype=np.int64)
        # 2. Replica counts: only large per-replica gaps are worth a copy.
        _adjust_counts(state, arr, opts.replication_margin, budget, domain_of)
        version = previous.version + 1
    else:
        # 1-2. From scratch: counts by largest per-replica load, greedy packing.
        counts = replicate_counts(arr, n, num_gpus)
        phy2log = pack_replicas(arr, counts, num_gpus, slots_per_gpu, domain)
        state = _State.build(arr, phy2log, num_gpus, slots_per_gpu)
        budget = np.full(num_layers, np.iinfo(np.int64).max // 4, dtype=np.int64)
        version = 1
    # 3. Swap slots off the heaviest GPUs while it pays, on the even split: its
    #    lumpy loads show which swaps matter (levelled shares would hide them
    #    on a plateau that no single swap can lower).
    _reset_even(state, arr)
    active = np.flatnonzero(state.moves + 2 <= budget)
    for _ in range(n):
        rounds = _swap_step(state, opts.min_gain, opts.sources, opts.targets, active,
                            (budget[active] - state.moves[active]) // 2)
        if not rounds:
            break
        swapped = np.unique(np.concatenate([li for li, _, _ in rounds]))
        active = swapped[state.moves[swapped] + 2 <= budget[swapped]]
    # 4. Level the shares over the final slots; the shares as fractions of each expert's load.
    if opts.use_shares:
        _level_shares(state, _replica_table(state.phy2log, state.counts), opts.sweeps, opts.spread)
    weights = round_shares(state.phy2log, _shares(state, arr))
    if previous is not None:
        moves = (state.phy2log != previous.phy2log).sum(axis=1)
    else:
        moves = np.zeros(num_layers, dtype=np.int64)
    placement = placement_from_arrays(version, num_gpus, slots_per_gpu, num_experts, state.phy2log, weights)
    return BalanceResult(placement, moves)


def _reset_even(state: _State, loads: np.ndarray) -> None:
    """Every replica takes an equal share of its expert's load (EPLB's split)."""
    num_layers = loads.shape[0]
    state.x = np.take_along_axis(loads / state.counts, state.phy2log, axis=1)
    state.gpu_load = state.x.reshape(num_layers, -1, state.slots_per_gpu).sum(axis=2)


def _shares(state: _State, loads: np.ndarray) -> np.ndarray:
    """[L, N] share of each slot in its expert's tokens; even split for experts with no load."""
    total = np.take_along_axis(loads, state.phy2log, axis=1)
    even = 1.0 / np.take_along_axis(state.counts, state.phy2log, axis=1)
    shares = np.where(total > 0, state.x / np.where(total > 0, total, 1.0), even)
    # Renormalise per expert so the shares sum to 1 to rounding.
    num_layers, num_experts = loads.shape
    sums = np.zeros((num_layers, num_experts))
    rows = np.broadcast_to(np.arange(num_layers)[:, None], state.phy2log.shape)
    np.add.at(sums, (rows, state.phy2log), shares)
    slot_sums = np.take_along_axis(sums, state.phy2log, axis=1)
    # Loads so small that the shares underflow (subnormal counts): fall back to the even split.
    lost = ~(slot_sums > 0.5)
    return np.where(lost, even, shares / np.where(lost, 1.0, slot_sums))


def _check_previous(previous: Placement, loads: np.ndarray, num_gpus: int, slots_per_gpu: int) -> None:
    if previous.num_experts != loads.shape[1]:
        raise PlacementError(f"loads: {loads.shape[1]} experts per layer, the previous placement has {previous.num_experts}")
    if previous.num_layers != loads.shape[0]:
        raise PlacementError(f"loads: {loads.shape[0]} layers, the previous placement has {previous.num_layers}")
    if previous.num_gpus != num_gpus:
        raise PlacementError(f"numGpus: {num_gpus}, the previous placement has {previous.num_gpus}")
    if previous.slots_per_gpu != slots_per_gpu:
        raise PlacementError(f"slotsPerGpu: {slots_per_gpu}, the previous placement has {previous.slots_per_gpu}")
