"""The balancer's decision: which layers get a new placement this cycle (one function, CLI and operator).

``decide_placement`` is the only place where a cycle's placement is chosen;
``moeshard balance --previous`` and the operator's cycle (rebalance.py) both
call it, so the CLI shows exactly what the operator would do.

Per layer, out of sample:

1. The window's counts are split into two halves by binomial thinning
   (each (token, expert) pair goes to half A or B with probability 1/2,
   seeded): for Poisson counts the halves are independent samples of the
   same traffic. Candidates are fitted on A and scored on B, so a plan that
   only fits A's noise shows no gain on B.
2. Two candidates: incremental from the live placement (few copies, may be
   stuck in a local optimum) and, for the layers the incremental plan leaves
   more than the threshold above max/mean 1, from scratch, relabelled onto the live
   slots with the fewest copies (relabel.py). The scratch plan is taken
   when its gain per copied expert beats the incremental plan's.
3. A layer moves when its predicted gain on B, (before - after) / before of
   max/mean GPU load, reaches max(floor, noise_k / sqrt(mean tokens per GPU
   of B)): the relative Poisson noise of one GPU's count, so gains the next
   window cannot tell from noise are never paid for with copies.
4. A layer whose window holds fewer than ``min_tokens_per_gpu`` pairs per GPU
   is skipped (its max/mean is noise); a window with too little scrape
   coverage is skipped whole. Both say why.
5. The layers taken are planned again on the whole window (the same
   candidate kind; twice the tokens, less noise in the shares and swaps).
6. Weight copies are budgeted per cycle over all layers: accepted layers are
   taken largest token gain first until ``move_budget`` is spent; the rest
   are deferred to the next cycle.

Layers that do not move keep the live ``phy2log`` and shares verbatim.

Shape legend: L layers, E experts, G GPUs, S slots per GPU, N = G*S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .balancer import BalancerOptions, check_loads, check_topology, rebalance_placement
from moeshard.core.placement import Placement, layer_imbalance, placement_from_arrays
from .grouped import grouped_plan
from .relabel import relabel_onto

KEEP, MOVE, SKIP, DEFER = "keep", "move", "skip", "defer"


@dataclass(frozen=True)
class AcceptanceOptions:
    """Knobs of ``decide_placement``; the operator's defaults (spec fields override some).

    floor: least relative max/mean gain per layer worth a change.
    noise_k: the gain must also beat noise_k / sqrt(mean tokens per GPU) (Poisson noise).
    min_tokens_per_gpu: a layer with fewer (token, expert) pairs per GPU in the window is skipped.
    min_coverage: a window whose worst replica was scraped less than this fraction of the best one is skipped.
    max_moves: most copies per layer (None: incremental N // 4, scratch unlimited).
    move_budget: most copies per cycle over all layers (None: unlimited).
    scratch: also consider the relabelled from-scratch plan.
    refit: write the chosen plans refitted on the whole window (the decision is made on the split).
    expert_groups: the router's expert groups (DeepSeek-V3: 8); every group's replicas then stay in one
        NVLink domain (grouped.py), and only that from-scratch plan is considered.
    seed: of the binomial split (deterministic decisions).
    """

    floor: float = 0.015
    noise_k: float = 1.0
    min_tokens_per_gpu: float = 256.0
    min_coverage: float = 0.9
    max_moves: int | None = None
    move_budget: int | None = None
    scratch: bool = True
    refit: bool = True
    expert_groups: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("floor", "noise_k", "min_tokens_per_gpu", "min_coverage"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("max_moves", "move_budget", "expert_groups"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")


@dataclass(frozen=True)
class LayerDecision:
    """One layer's verdict. before/after: max/mean on the held-out half; gain relative; plan incremental/scratch."""

    layer: int
    decision: str
    reason: str
    before: float = 1.0
    after: float = 1.0
    gain: float = 0.0
    threshold: float = 0.0
    moves: int = 0
    plan: str = ""


@dataclass(frozen=True)
class Decision:
    """A cycle's result: ``placement`` None when no layer changes; ``skipped`` the window-level reason, if any."""

    placement: Placement | None
    layers: list[LayerDecision]
    skipped: str | None = None
    moves: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def moved_layers(self) -> list[int]:
        return [d.layer for d in self.layers if d.decision == MOVE]


def split_window(loads: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binomial thinning of counts [L, E] into two independent halves (A, B) with A + B = round(loads)."""
    counts = np.round(loads).astype(np.int64)
    half = np.random.default_rng(seed).binomial(counts, 0.5)
    return half.astype(np.float64), (counts - half).astype(np.float64)


def _candidate(current: Placement, loads: np.ndarray, gpus_per_domain: int | None, opts: AcceptanceOptions,
               scratch: bool, layers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log, weights) [L, N] of one candidate fitted on ``loads``; scratch plans relabelled onto the live slots.

    ``layers``: plan only these; the other rows stay the live ones (scratch: None plans none).
    """
    g, s = current.num_gpus, current.slots_per_gpu
    rows, shares = current.phy2log.copy(), current.weights.copy()
    if not scratch:
        options = BalancerOptions(max_moves=opts.max_moves)
        if layers is None:
            plan = rebalance_placement(loads, g, s, gpus_per_domain, current, options).placement
            return plan.phy2log, plan.weights
        live = Placement(current.version, g, s, current.num_experts, rows[layers], shares[layers])
        plan = rebalance_placement(loads[layers], g, s, gpus_per_domain, live, options).placement
        rows[layers], shares[layers] = plan.phy2log, plan.weights
        return rows, shares
    if layers is None or layers.size == 0:
        return rows, shares
    if opts.expert_groups is not None:
        domain = gpus_per_domain or g
        plan_rows, plan_shares = grouped_plan(loads[layers], g, s, domain, opts.expert_groups)
        perm = relabel_onto(current.phy2log[layers], plan_rows, g, s, current.num_experts, domain)
    else:
        plan = rebalance_placement(loads[layers], g, s, gpus_per_domain).placement
        plan_rows, plan_shares = plan.phy2log, plan.weights
        perm = relabel_onto(current.phy2log[layers], plan_rows, g, s, current.num_experts)
    rows[layers] = np.take_along_axis(plan_rows, perm, 1)
    shares[layers] = np.take_along_axis(plan_shares, perm, 1)
    return rows, shares


def _score(current: Placement, phy2log: np.ndarray, weights: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """[L] max/mean on ``held_out`` of a candidate's rows (no validation: rows come from valid plans)."""
    plan = Placement(current.version, current.num_gpus, current.slots_per_gpu, current.num_experts, phy2log, weights)
    return layer_imbalance(plan, held_out)


def choose_candidate(gain: dict[str, float], moves: dict[str, int], threshold: float,
                     max_moves: int | None = None, marginal: float = 0.0) -> str | None:
    """The candidate a layer takes, or None when none qualifies.

    Qualify: gain >= ``threshold`` and copies within ``max_moves``. Among
    those the best gain per copied expert wins (a copy-free gain counts as
    one copy; ties: fewer copies); a dearer candidate replaces it when its
    extra gain per extra copy reaches ``marginal`` (so a stuck cheap plan
    does not hold a layer far from balance when a full fix is affordable).
    """
    ok = [k for k in gain if gain[k] >= threshold and (max_moves is None or moves[k] <= max_moves)]
    if not ok:
        return None
    best = max(ok, key=lambda k: (gain[k] / max(moves[k], 1), -moves[k]))
    for k in sorted(ok, key=lambda k: moves[k]):
        extra = moves[k] - moves[best]
        if extra > 0 and gain[k] - gain[best] >= threshold and (gain[k] - gain[best]) / extra >= marginal:
            best = k
    return best


def decide_placement(current: Placement, loads: object, gpus_per_domain: int | None = None,
                     options: AcceptanceOptions | None = None, coverage: float | None = None) -> Decision:
    """Which layers of ``current`` change for the window ``loads`` [L, E], and the placement to write.

    ``coverage``: scrape coverage of the window in [0, 1] (None: not measured).
    Pure and deterministic. Raises PlacementError naming a bad field.
    """
    opts = options or AcceptanceOptions()
    arr = check_loads(loads, current.num_experts)
    num_layers = arr.shape[0]
    check_topology(current.num_experts, current.num_gpus, current.slots_per_gpu, gpus_per_domain)
    if arr.shape[0] != current.num_layers:
        raise ValueError(f"loads: {arr.shape[0]} layers, the live placement has {current.num_layers}")
    per_gpu = arr.sum(axis=1) / current.num_gpus  # [L] pairs per GPU in the window

    def skip_all(reason: str) -> Decision:
        return Decision(None, [LayerDecision(layer, SKIP, reason) for layer in range(num_layers)], reason,
                        np.zeros(num_layers, dtype=np.int64))

    # 1. Window-level refusals.
    if coverage is not None and coverage < opts.min_coverage:
        return skip_all(f"scrape coverage {coverage:.0%} < {opts.min_coverage:.0%}: counts were lost")
    if per_gpu.max(initial=0.0) < opts.min_tokens_per_gpu:
        return skip_all(f"{per_gpu.max(initial=0.0):.0f} tokens per GPU in the busiest layer "
                        f"< {opts.min_tokens_per_gpu:.0f}: too few to tell load from noise")
    # 2. Candidates fitted on half A, scored on half B.
    fit, held_out = split_window(arr, opts.seed)
    before = layer_imbalance(current, held_out)
    held_per_gpu = held_out.sum(axis=1) / current.num_gpus
    threshold = np.maximum(opts.floor, opts.noise_k / np.sqrt(np.maximum(held_per_gpu, 1.0)))
    if opts.expert_groups is not None:
        # Grouped routers: only the group-aware scratch plan keeps groups inside domains.
        kinds = ["scratch"]
        busy = np.flatnonzero(per_gpu >= opts.min_tokens_per_gpu)
        cands = {"scratch": _candidate(current, fit, gpus_per_domain, opts, True, busy)}
        after = {"scratch": _score(current, *cands["scratch"], held_out)}
    else:
        kinds = ["incremental"] + (["scratch"] if opts.scratch else [])
        cands = {"incremental": _candidate(current, fit, gpus_per_domain, opts, False)}
        after = {"incremental": _score(current, *cands["incremental"], held_out)}
    if opts.scratch and opts.expert_groups is None:
        # The scratch plan only where the incremental one leaves the layer visibly off balance.
        stuck = np.flatnonzero((after["incremental"] > 1.0 + threshold) & (per_gpu >= opts.min_tokens_per_gpu))
        cands["scratch"] = _candidate(current, fit, gpus_per_domain, opts, True, stuck)
        after["scratch"] = _score(current, *cands["scratch"], held_out)
    moves = {k: (cands[k][0] != current.phy2log).sum(axis=1) for k in kinds}
    gain = {k: (before - after[k]) / before for k in kinds}
    # 3. Per layer: the plan to take, if any.
    verdicts: list[LayerDecision | None] = [None] * num_layers
    chosen: dict[int, str] = {}
    for layer in range(num_layers):
        if per_gpu[layer] < opts.min_tokens_per_gpu:
            verdicts[layer] = LayerDecision(layer, SKIP, f"{per_gpu[layer]:.0f} tokens per GPU "
                                            f"< {opts.min_tokens_per_gpu:.0f}", float(before[layer]),
                                            float(before[layer]))
            continue
        pick = choose_candidate({k: float(gain[k][layer]) for k in kinds}, {k: int(moves[k][layer]) for k in kinds},
                                float(threshold[layer]), opts.max_moves,
                                float(threshold[layer]) / max(current.num_slots // 4, 1))
        if pick is None:
            best = max(kinds, key=lambda k: gain[k][layer])
            verdicts[layer] = LayerDecision(
                layer, KEEP, f"gain {gain[best][layer]:+.1%} < threshold {threshold[layer]:.1%}",
                float(before[layer]), float(after[best][layer]), float(gain[best][layer]), float(threshold[layer]),
                int(moves[best][layer]), best)
            continue
        chosen[layer] = pick
    # 4. The chosen candidates refitted on the whole window (twice the tokens of half A: less noise).
    if opts.refit and chosen:
        for k in set(chosen.values()):
            picked = np.array(sorted(li for li, kk in chosen.items() if kk == k))
            rows, shares = _candidate(current, arr, gpus_per_domain, opts, k == "scratch", picked)
            cands[k][0][picked], cands[k][1][picked] = rows[picked], shares[picked]
            moves[k][picked] = (rows[picked] != current.phy2log[picked]).sum(axis=1)
    # 5. The copy budget, largest token gain first.
    left = np.inf if opts.move_budget is None else float(opts.move_budget)
    order = sorted(chosen, key=lambda li: -(gain[chosen[li]][li] * before[li] * per_gpu[li]))
    phy2log, weights = current.phy2log.copy(), current.weights.copy()
    taken = np.zeros(num_layers, dtype=np.int64)
    for layer in order:
        k = chosen[layer]
        m = int(moves[k][layer])
        common = (float(before[layer]), float(after[k][layer]), float(gain[k][layer]), float(threshold[layer]), m, k)
        if m > left:
            verdicts[layer] = LayerDecision(layer, DEFER, f"{m} copies exceed the {left:.0f} left of the "
                                            f"cycle's move budget", *common)
            continue
        left -= m
        phy2log[layer], weights[layer] = cands[k][0][layer], cands[k][1][layer]
        taken[layer] = m
        verdicts[layer] = LayerDecision(layer, MOVE, f"gain {gain[k][layer]:+.1%} >= threshold "
                                        f"{threshold[layer]:.1%} ({k}, {m} copies)", *common)
    layers = [v for v in verdicts if v is not None]
    if not any(v.decision == MOVE for v in layers):
        return Decision(None, layers, None, taken)
    placement = placement_from_arrays(current.version + 1, current.num_gpus, current.slots_per_gpu,
                                      current.num_experts, phy2log, weights)
    return Decision(placement, layers, None, taken)
