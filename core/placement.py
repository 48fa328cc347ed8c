"""Expert placement: which logical expert each physical slot holds, and its share.

The placement file is JSON, stored in the deployment's ConfigMap under the key
``placement.json`` and mounted into every engine pod. The operator writes it,
the engine reads it; both validate it with ``parse_placement`` (one schema).
This module is torch-free: the engine, the balancer and the CLI all import it.

Format (camelCase keys)::

    {
      "version": 7,              # increases by one with every change
      "numGpus": 16,             # G, EP ranks
      "slotsPerGpu": 9,          # S; slot s lives on GPU s // S
      "numExperts": 128,         # E, logical experts per layer
      "layers": [                # one entry per MoE layer
        {"phy2log": [...],       # G*S ints: logical expert of each slot
         "weights": [...]}       # G*S floats: share of that expert's tokens
      ]
    }

Invariants (checked): every logical expert has at least one slot; the shares
of one expert's slots sum to 1; shares are >= 0.

Replica choice: a (token, expert) pair goes to one replica of the expert,
chosen by a deterministic hash of (token key, expert) against the cumulative
shares. ``replica_slot`` here is the reference; the engine's torch version
must give the same slots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from moeshard.core.errors import UserError
from moeshard.core.layout import max_over_mean

SHARE_TOLERANCE = 1e-6
PLACEMENT_KEY = "placement.json"  # ConfigMap key and mounted file name
PLAN_KEY = "plan.json"


class PlacementError(UserError):
    """An invalid placement; the message names the offending field."""


class _LayerModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phy2log: list[int]
    weights: list[float]


class _PlacementModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)
    version: int = Field(ge=0)
    num_gpus: int = Field(ge=1)
    slots_per_gpu: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    layers: list[_LayerModel] = Field(min_length=1)



@dataclass(frozen=True)
class Placement:
    """A validated placement. Arrays: phy2log [L, G*S] int64, weights [L, G*S] float64."""

    version: int
    num_gpus: int
    slots_per_gpu: int
    num_experts: int
    phy2log: np.ndarray
    weights: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    def slot_gpu(self) -> np.ndarray:
        """[G*S] GPU of each slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def replica_counts(self) -> np.ndarray:
        """[L, E] number of slots holding each logical expert."""
        counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            np.add.at(counts[layer], self.phy2log[layer], 1)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "numGpus": self.num_gpus,
            "slotsPerGpu": self.slots_per_gpu,
            "numExperts": self.num_experts,
            "layers": [
                {"phy2log": [int(e) for e in self.phy2log[i]], "weights": [float(w) for w in self.weights[i]]}
                for i in range(self.num_layers)
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def with_version(self, version: int) -> "Placement":
        return Placement(version, self.num_gpus, self.slots_per_gpu, self.num_experts, self.phy2log, self.weights)


def placement_from_arrays(
    version: int, num_gpus: int, slots_per_gpu: int, num_experts: int, phy2log: Any, weights: Any
) -> Placement:
    """Build and validate a Placement from arrays [L, G*S]."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    placement = Placement(version, num_gpus, slots_per_gpu, num_experts, phy2log, weights)
    _check_invariants(placement)
    return placement


def _check_invariants(p: Placement) -> None:
    if p.phy2log.ndim != 2 or p.phy2log.shape != p.weights.shape:
        raise PlacementError(f"layers: phy2log {p.phy2log.shape} and weights {p.weights.shape} must be [layers, slots]")
    if p.phy2log.shape[1] != p.num_slots:
        raise PlacementError(
            f"layers[*].phy2log: has {p.phy2log.shape[1]} slots, numGpus x slotsPerGpu = {p.num_slots}"
        )
    if _rows_hold(p):
        return
    # Something is wrong: find the first offending layer and field, one layer at a time.
    for layer in range(p.num_layers):
        row, w = p.phy2log[layer], p.weights[layer]
        bad = np.flatnonzero((row < 0) | (row >= p.num_experts))
        if bad.size:
            raise PlacementError(
                f"layers[{layer}].phy2log[{bad[0]}]: expert {row[bad[0]]} outside 0..{p.num_experts - 1}"
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            idx = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
            raise PlacementError(f"layers[{layer}].weights[{idx}]: must be a finite share >= 0, got {w[idx]}")
        counts = np.bincount(row, minlength=p.num_experts)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            raise PlacementError(f"layers[{layer}].phy2log: expert {missing[0]} has no slot")
        sums = np.bincount(row, weights=w, minlength=p.num_experts)
        off = np.flatnonzero(np.abs(sums - 1.0) > SHARE_TOLERANCE)
        if off.size:
            raise PlacementError(
                f"layers[{layer}].weights: shares of expert {off[0]} sum to {sums[off[0]]:.6f}, not 1"
            )


def _rows_hold(p: Placement) -> bool:
    """Every layer's experts in range, shares finite and >= 0, every expert placed, its shares summing to 1.

    All layers at once (a 94-layer placement is checked on every balancer plan); the per-layer
    loop of ``_check_invariants`` runs only to name the first failure.
    """
    row, w = p.phy2log, p.weights
    if ((row < 0) | (row >= p.num_experts)).any() or not np.isfinite(w).all() or (w < 0).any():
        return False
    flat = (row + p.num_experts * np.arange(p.num_layers)[:, None]).ravel()
    size = p.num_layers * p.num_experts
    if (np.bincount(flat, minlength=size) == 0).any():
        return False
    sums = np.bincount(flat, weights=w.ravel(), minlength=size)
    return bool((np.abs(sums - 1.0) <= SHARE_TOLERANCE).all())


@dataclass(frozen=True)
class PlacementShape:
    """What a placement must match to be usable by a group: ranks, slots per rank, experts, MoE layers."""

    num_gpus: int
    slots_per_gpu: int
    num_experts: int
    num_layers: int

    @classmethod
    def of(cls, placement: "Placement") -> "PlacementShape":
        return cls(placement.num_gpus, placement.slots_per_gpu, placement.num_experts, placement.num_layers)


def check_fits(placement: "Placement", shape: "PlacementShape | Placement") -> None:
    """Raise PlacementError naming the first field of ``placement`` that does not match ``shape``."""
    if isinstance(shape, Placement):
        shape = PlacementShape.of(shape)
    for field, got, want in (
        ("numGpus", placement.num_gpus, shape.num_gpus),
        ("slotsPerGpu", placement.slots_per_gpu, shape.slots_per_gpu),
        ("numExperts", placement.num_experts, shape.num_experts),
        ("layers", placement.num_layers, shape.num_layers),
    ):
        if got != want:
            what = "MoE layers" if field == "layers" else "this group's value"
            raise PlacementError(f"{field}: {got} does not match {what} ({want})")


def parse_placement(data: str | bytes | dict[str, Any]) -> Placement:
    """Validate placement JSON (text or parsed); raise PlacementError naming the field."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlacementError(f"not valid JSON: {exc}") from None
    try:
        model = _PlacementModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or "(document)"
        raise PlacementError(f"{path}: {err['msg']}") from None
    return placement_from_arrays(
        model.version, model.num_gpus, model.slots_per_gpu, model.num_experts,
        [layer.phy2log for layer in model.layers], [layer.weights for layer in model.layers],
    )


def initial_placement(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> Placement:
    """Version-0 placement before any load is known.

    Experts 0..E-1 fill slots in order (GPU g holds a contiguous block, the
    layout EP engines use by default); redundant slots replicate experts
    0, 1, 2, ... with the extra copy on another GPU where possible, and each
    expert's shares split evenly over its replicas.
    """
    slots = num_gpus * slots_per_gpu
    if slots < num_experts:
        raise PlacementError(
            f"numGpus x slotsPerGpu ({num_gpus} x {slots_per_gpu} = {slots}) is less than numExperts ({num_experts})"
        )
    # 1. Lay the logical experts out contiguously over the first E slots when
    #    E divides evenly; otherwise spread them over GPUs round-robin.
    per_gpu_primary = num_experts // num_gpus
    row = np.full(slots, -1, dtype=np.int64)
    if num_experts % num_gpus == 0:
        for g in range(num_gpus):
            base = g * slots_per_gpu
            row[base: base + per_gpu_primary] = np.arange(g * per_gpu_primary, (g + 1) * per_gpu_primary)
    else:
        for e in range(num_experts):
            g, k = e % num_gpus, e // num_gpus
            row[g * slots_per_gpu + k] = e
    # 2. Fill the free slots with replicas of experts 0, 1, ..., preferring a GPU
    #    that does not already hold that expert.
    free = list(np.flatnonzero(row < 0))
    expert = 0
    while free:
        home = set((np.flatnonzero(row == expert) // slots_per_gpu).tolist())
        pick = next((s for s in free if s // slots_per_gpu not in home), free[0])
        row[pick] = expert
        free.remove(pick)
        expert = (expert + 1) % num_experts
    counts = np.bincount(row, minlength=num_experts)
    weights = 1.0 / counts[row]
    return placement_from_arrays(
        0, num_gpus, slots_per_gpu, num_experts, np.tile(row, (num_layers, 1)), np.tile(weights, (num_layers, 1))
    )


# --------------------------------------------------------------------------- replica choice

_M32 = 0xFFFFFFFF


def mix_hash(token_keys: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Deterministic uniform value in [0, 1) per (token key, expert) pair.

    A 32-bit integer mix (multiply-xorshift), written so that int64 torch code
    can reproduce it bit for bit: every product is masked to 32 bits.
    """
    h = (token_keys.astype(np.int64) * 0x9E3779B1 + experts.astype(np.int64) * 0x85EBCA77) & _M32
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & _M32
    h ^= h >> 12
    h = (h * 0x297A2D39) & _M32
    h ^= h >> 15
    return h.astype(np.float64) / 2.0**32


def replica_table(placement: Placement, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lookup table of replica choice for one layer: (order, sorted_experts, key), each [G*S].

    order: slots grouped by expert, in slot order within a group;
    sorted_experts: the expert of each entry; key: expert id + cumulative share
    inside its group, so one sorted key covers all groups (expert e's replicas
    span (e, e + 1]). The engine's torch lookup is built from this same table.
    """
    row, w = placement.phy2log[layer], placement.weights[layer]
    order = np.lexsort((np.arange(row.size), row))
    sorted_experts = row[order]
    cum = np.cumsum(w[order])
    group_start = np.searchsorted(sorted_experts, sorted_experts, side="left")
    cum = cum - np.where(group_start > 0, cum[group_start - 1], 0.0)
    return order, sorted_experts, sorted_experts + cum


def replica_slot(placement: Placement, layer: int, token_keys: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Physical slot serving each (token, expert) pair, honouring the shares.

    token_keys, experts: int arrays of the same shape (e.g. [T, K]: the token's
    key repeated along K, and its top-K logical experts). Returns slots of the
    same shape. For each expert its replicas are taken in slot order, and the
    pair goes to the first replica whose cumulative share exceeds the hash.
    """
    # 1-2. Slots grouped by expert; cumulative shares offset by the expert id.
    order, sorted_experts, key = replica_table(placement, layer)
    # 3. The chosen replica is the first whose cumulative share exceeds the hash,
    #    clipped into the expert's own group (guards rounding at the top end).
    experts = np.asarray(experts, dtype=np.int64)
    u = mix_hash(np.asarray(token_keys), experts)
    idx = np.searchsorted(key, experts + u, side="right")
    first = np.searchsorted(sorted_experts, experts, side="left")
    last = np.searchsorted(sorted_experts, experts, side="right") - 1
    return order[np.clip(idx, first, last)]


def gpu_loads(placement: Placement, expert_loads: np.ndarray) -> np.ndarray:
    """Expected tokens per GPU [L, G] when expert e receives expert_loads[l, e] tokens.

    Each slot gets its share of its expert's tokens (what dispatch does in
    expectation).
    """
    loads = np.asarray(expert_loads, dtype=np.float64)
    if loads.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"expert_loads has shape {loads.shape}, expected [layers, experts] = "
            f"{(placement.num_layers, placement.num_experts)}"
        )
    slot_load = np.take_along_axis(loads, placement.phy2log, axis=1) * placement.weights
    return slot_load.reshape(placement.num_layers, placement.num_gpus, placement.slots_per_gpu).sum(axis=2)


def layer_imbalance(placement: Placement, expert_loads: np.ndarray) -> np.ndarray:
    """[L] max/mean GPU load of each layer (1.0 for an idle layer): the one balance measure."""
    return np.asarray(max_over_mean(gpu_loads(placement, expert_loads)))


def imbalance(placement: Placement, expert_loads: np.ndarray) -> float:
    """Mean over layers of max/mean GPU load (1.0 = perfect balance)."""
    return float(layer_imbalance(placement, expert_loads).mean())


# --------------------------------------------------------------------------- size

CONFIG_MAP_LIMIT_BYTES = 1024 * 1024  # Kubernetes: all data of one ConfigMap together
SHARE_DECIMALS = 6  # shares are written with this many decimals (1e-6 of an expert's tokens is noise)


def round_shares(phy2log: np.ndarray, weights: np.ndarray, decimals: int = SHARE_DECIMALS) -> np.ndarray:
    """[L, N] shares rounded to ``decimals``, each expert's largest share absorbing the rounding residue.

    Keeps the sum-to-one invariant exact to rounding, so the JSON stays
    short (``0.123457`` instead of 17 digits) and still validates.
    """
    phy2log = np.asarray(phy2log, dtype=np.int64)
    out = np.round(np.asarray(weights, dtype=np.float64), decimals)
    num_layers, n = phy2log.shape
    num_experts = int(phy2log.max(initial=0)) + 1
    rows = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    sums = np.zeros((num_layers, num_experts))
    np.add.at(sums, (rows, phy2log), out)
    # The largest share of each expert (first slot on ties) takes the residue.
    key = out + np.arange(n)[None, :] * -1e-12
    best = np.full((num_layers, num_experts), -np.inf)
    np.maximum.at(best, (rows, phy2log), key)
    is_best = key == np.take_along_axis(best, phy2log, axis=1)
    residue = 1.0 - np.take_along_axis(sums, phy2log, axis=1)
    return np.round(np.where(is_best, out + residue, out), decimals)


def check_config_map_size(placement: Placement, other_bytes: int = 0,
                          limit: int = CONFIG_MAP_LIMIT_BYTES) -> int:
    """Bytes of the placement JSON; PlacementError when it and ``other_bytes`` exceed the ConfigMap limit."""
    size = len(placement.to_json().encode())
    if size + other_bytes > limit:
        raise PlacementError(
            f"placement.json: {size} bytes ({placement.num_layers} layers x {placement.num_slots} slots) plus "
            f"{other_bytes} bytes of other ConfigMap data exceed the {limit}-byte ConfigMap limit"
        )
    return size
