"""Placement reload: watch the mounted placement file, agree on a version, adopt it.

The operator writes a new placement into the deployment's ConfigMap; the
kubelet swaps the mounted file atomically (``placement.json`` is a symlink to
``..data/placement.json`` and ``..data`` is re-pointed to a new timestamped
directory). So the watcher re-reads the file BY PATH on every poll (never
keeps a handle, never trusts mtime alone) and compares a content hash.

Adoption is collective, at a step boundary of the serving loop, and lives in
``PlacementSync`` (the step loop only calls ``agree_before_serving`` once and
``at_step_boundary`` every step):

1. Every rank polls its own copy of the file (``PlacementWatcher.poll``) and
   holds at most one candidate: what the file says now, when it is valid and
   newer than the placement in use.
2. All ranks all-reduce MIN over ``agreement_vector`` = [v, -v, h, -h]
   (candidate version v, 63-bit content hash h; a rank without a candidate
   puts the current version and hash 0), followed by the same four numbers
   for the placement each rank SERVES: a mismatch there is repaired at once
   (or the group fails loudly), never carried on silently.
3. ``agreed_version`` reads the result: when min v == max v > current and
   min h == max h, every rank holds the same parsed placement and a staged
   move starts (``runtime.move_layers``, a few layers per step boundary,
   abortable). Otherwise nothing happens this step (a rank that has not seen
   the new file yet will see it at a later poll; the others wait for it).

A file that does not parse, does not fit this group (numGpus, slotsPerGpu,
numExperts, number of MoE layers) or is not newer than the current placement
is refused with ONE log line naming the problem (per distinct content) and
``on_reject`` is called (rank 0 counts ``moeshard_placement_rejected_total``);
the old placement stays.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from moeshard.core.placement import Placement, PlacementError, PlacementShape, check_fits, parse_placement

log = logging.getLogger("moeshard.engine.reload")


def placement_digest(placement: Placement) -> int:
    """63-bit content hash of a placement (non-negative, fits an int64 tensor).

    Computed from the canonical JSON, so two ranks that parsed byte-different
    but equivalent files agree.
    """
    raw = hashlib.sha256(placement.to_json().encode()).digest()
    return int.from_bytes(raw[:8], "big") >> 1


def agreement_vector(candidate: Placement | None, current_version: int) -> np.ndarray:
    """[4] int64 this rank contributes to the MIN all-reduce: [v, -v, h, -h]."""
    if candidate is None:
        version, digest = current_version, 0
    else:
        version, digest = candidate.version, placement_digest(candidate)
    return np.array([version, -version, digest, -digest], dtype=np.int64)


def agreed_version(reduced_min: np.ndarray, current_version: int) -> int | None:
    """The version all ranks adopt now, or None. ``reduced_min``: MIN all-reduce of agreement vectors."""
    v_min, v_max, h_min, h_max = int(reduced_min[0]), -int(reduced_min[1]), int(reduced_min[2]), -int(reduced_min[3])
    if v_min == v_max and v_min > current_version and h_min == h_max:
        return v_min
    return None


class PlacementWatcher:
    """Polls one placement file by path and keeps the newest valid candidate.

    ``current`` is the placement in use; call ``adopted`` after applying a
    candidate. ``poll`` is rate-limited to one read per ``poll_interval``
    seconds (``clock`` is injectable for tests).
    """

    def __init__(
        self,
        path: str,
        current: Placement,
        *,
        shape: PlacementShape | None = None,
        on_reject: Callable[[str], None] | None = None,
        poll_interval: float = 1.0,
        log_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = path
        self.current = current
        self.shape = shape or PlacementShape.of(current)
        self.on_reject = on_reject
        self.poll_interval = poll_interval
        self.log_level = log_level
        self.clock = clock
        self.candidate: Placement | None = None
        self._next_poll = float("-inf")
        self._last_raw_digest: bytes | None = None

    def poll(self, *, force: bool = False) -> Placement | None:
        """Re-read the file when due; return the candidate newer than ``current`` (or None)."""
        now = self.clock()
        if force or now >= self._next_poll:
            self._next_poll = now + self.poll_interval
            self._read()
        return self.candidate

    def adopted(self, placement: Placement) -> None:
        """Record that ``placement`` is now in use by the whole group."""
        self.current = placement
        if self.candidate is not None and self.candidate.version <= placement.version:
            self.candidate = None

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as handle:  # by path every time: the kubelet swaps a symlink
                raw = handle.read()
        except FileNotFoundError:
            return  # no file (yet): keep what we have; the initial placement needs none
        except OSError as exc:
            self._refuse(f"cannot read {self.path}: {exc}")
            return
        raw_digest = hashlib.sha256(raw).digest()
        if raw_digest == self._last_raw_digest:
            return  # unchanged since the last read (valid or refused: refused only once)
        self._last_raw_digest = raw_digest
        # The candidate mirrors what the file says NOW: a refused or stale file
        # withdraws an earlier candidate, so ranks never adopt a version the
        # file no longer holds.
        self.candidate = None
        try:
            placement = parse_placement(raw)
            check_fits(placement, self.shape)
        except PlacementError as exc:
            self._refuse(str(exc))
            return
        if placement.version <= self.current.version:
            if placement_digest(placement) != placement_digest(self.current):
                self._refuse(
                    f"version: {placement.version} is not newer than the placement in use "
                    f"(version {self.current.version})"
                )
            return
        self.candidate = placement

    def _refuse(self, problem: str) -> None:
        log.log(self.log_level, "placement file %s refused, keeping version %d: %s",
                self.path, self.current.version, problem)
        if self.on_reject is not None:
            self.on_reject(problem)


# --------------------------------------------------------------------------- weight transfers


class PlacementMoveAborted(RuntimeError):
    """A placement move was aborted by the group; the old slots stay in use."""


class PlacementDivergence(RuntimeError):
    """The ranks of a group serve different placements and could not be brought onto one."""


def layer_transfers(old_row: np.ndarray, new_row: np.ndarray, slots_old: int, slots_new: int,
                    num_gpus: int) -> list[tuple[int, int, int, int]]:
    """Weight moves of one layer: (src_rank, src_slot, dst_rank, dst_slot), slots local.

    old_row [G*S_old]: what each slot holds now (-1: unknown); new_row
    [G*S_new]. A slot keeping its expert needs nothing; otherwise the source
    is the destination rank itself when it holds the expert (a local copy),
    else the expert's lowest old slot, else (-1, -1): no rank holds it, the
    destination reads the checkpoint. Every rank computes the same list.
    """
    moves = []
    for g in range(num_gpus):
        for s in range(slots_new):
            expert = int(new_row[g * slots_new + s])
            if s < slots_old and int(old_row[g * slots_old + s]) == expert:
                continue
            holders = np.flatnonzero(old_row == expert)
            local = holders[holders // slots_old == g]
            if holders.size == 0:
                moves.append((-1, -1, g, s))
                continue
            src = int(local[0]) if local.size else int(holders[0])
            moves.append((src // slots_old, src % slots_old, g, s))
    return moves


# --------------------------------------------------------------------------- group agreement


class SyncRuntime(Protocol):
    """What PlacementSync needs of the runtime (EngineRuntime implements it)."""

    rank: int
    placement: Placement
    placement_version: int

    def move_layers(self, target: Placement, layers: Sequence[int], *, old_rows: np.ndarray | None = None,
                    timeout_s: float = ...) -> bool: ...


class SyncChannel(Protocol):
    """Group collectives over int64 vectors (serving.TorchChannel implements it)."""

    rank: int
    world_size: int

    def reduce_min(self, values: np.ndarray) -> np.ndarray: ...

    def reduce_sum(self, values: np.ndarray) -> np.ndarray: ...


@dataclass
class _Move:
    target: Placement
    pending: list[int]


class PlacementSync:
    """Keeps every rank of a group serving one placement: start-up agreement, adoption, staged moves, repair.

    Contract (both methods are COLLECTIVE: every rank calls them at the same
    point of the step loop, and every branch taken depends only on reduced
    values, so all ranks issue the same collectives in the same order):

    * ``agree_before_serving()`` -- once, after the model is loaded and
      before the first step. Each rank offers what it serves or the newer
      valid file it sees; the group takes the highest version (lowest rank
      holding it on ties), whose JSON is sent to every rank, and every rank
      that serves something else moves to it through the normal transfer
      path (``runtime.move_layers`` with the slots each rank really holds;
      experts no rank holds are read from the checkpoint). Returns the
      agreed placement; raises PlacementDivergence when the move fails.
    * ``at_step_boundary()`` -- at every step boundary, before the step's
      work. One MIN all-reduce of [candidate version, digest] and [serving
      version, digest] (8 int64). Serving digests that differ are repaired
      at once by the start-up protocol (or PlacementDivergence is raised:
      the group fails loudly instead of dispatching with different tables).
      When every rank holds the same newer candidate, a staged move starts:
      ``layers_per_step`` layers switch per step boundary while serving goes
      on; a stage that fails or times out aborts the move (the layers not
      yet switched keep their old slots), and the version is retried after
      ``retry_after_s``. Returns the placement when a move completes (the
      caller publishes it), else None.

    ``on_adopted(placement)`` runs on every rank when a placement is fully
    adopted (the leader sets the placement-version metric there).
    """

    def __init__(self, runtime: SyncRuntime, channel: SyncChannel, watcher: PlacementWatcher | None = None, *,
                 layers_per_step: int = 4, move_timeout_s: float = 120.0, retry_after_s: float = 30.0,
                 on_adopted: Callable[[Placement], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if layers_per_step < 1:
            raise ValueError(f"layers_per_step: must be >= 1, got {layers_per_step}")
        self.runtime, self.channel, self.watcher = runtime, channel, watcher
        self.layers_per_step, self.move_timeout_s, self.retry_after_s = layers_per_step, move_timeout_s, retry_after_s
        self.on_adopted, self.clock = on_adopted, clock
        self.move: _Move | None = None
        self._retry_at: dict[tuple[int, int], float] = {}
        self._digest_of: tuple[Placement, int] | None = None  # (the placement served, its digest)

    # -- helpers -------------------------------------------------------------------
    def serving_digest(self) -> int:
        """Digest of what this rank serves now (cached per placement object: hashing is not free)."""
        placement = self.runtime.placement
        if self._digest_of is None or self._digest_of[0] is not placement:
            self._digest_of = (placement, placement_digest(placement))
        return self._digest_of[1]

    def _candidate(self, force: bool = False) -> Placement | None:
        if self.watcher is None or self.move is not None:
            return None
        candidate = self.watcher.poll(force=force)
        if candidate is None or not self._retry_at:
            return candidate
        retry = self._retry_at.get((candidate.version, placement_digest(candidate)))
        return None if retry is not None and self.clock() < retry else candidate

    def _finish(self, placement: Placement) -> Placement:
        if self.watcher is not None:
            self.watcher.adopted(placement)
        if self.on_adopted is not None:
            self.on_adopted(placement)
        return placement

    # -- start-up and repair --------------------------------------------------------
    def agree_before_serving(self) -> Placement:
        """COLLECTIVE. Bring every rank onto one placement before the first step (see the class docstring)."""
        self.move = None
        serving = self.runtime.placement
        candidate = self._candidate(force=True)
        offer = candidate if candidate is not None else serving
        world, rank = self.channel.world_size, self.channel.rank
        # 1. The highest version offered, and the lowest rank offering it.
        top = -int(self.channel.reduce_min(np.array([-offer.version], dtype=np.int64))[0])
        src = int(self.channel.reduce_min(np.array([rank if offer.version == top else world], dtype=np.int64))[0])
        # 2. Its JSON, to every rank (a SUM all-reduce where only the source contributes).
        raw = offer.to_json().encode() if rank == src else b""
        size = -int(self.channel.reduce_min(np.array([-len(raw)], dtype=np.int64))[0])
        buf = np.zeros(size, dtype=np.int64)
        buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        agreed = parse_placement(self.channel.reduce_sum(buf).astype(np.uint8).tobytes())
        # 3. Ranks already serving it are done; the others move (all ranks take part in the transfers).
        same = 1 if placement_digest(serving) == placement_digest(agreed) else 0
        s = serving.slots_per_gpu
        flags = self.channel.reduce_min(np.array([same, s, -s], dtype=np.int64))
        if int(flags[0]) == 1:
            log.info("rank %d: the group serves placement version %d", rank, agreed.version)
            return self._finish(agreed)
        if int(flags[1]) == -int(flags[2]):
            # What every rank's slots hold: each rank fills in its own block.
            mine = np.zeros_like(serving.phy2log)
            mine[:, rank * s:(rank + 1) * s] = serving.phy2log[:, rank * s:(rank + 1) * s]
            old_rows = self.channel.reduce_sum(mine.ravel()).reshape(serving.phy2log.shape)
        else:  # ranks differ even in slot count: every slot is read from the checkpoint
            old_rows = np.full((agreed.num_layers, world * agreed.slots_per_gpu), -1, dtype=np.int64)
        log.warning("rank %d: serving placement version %d, the group agreed on version %d; moving",
                    rank, serving.version, agreed.version)
        if not self.runtime.move_layers(agreed, range(agreed.num_layers), old_rows=old_rows,
                                        timeout_s=self.move_timeout_s):
            raise PlacementDivergence(f"ranks serve different placements and the move to version {agreed.version} "
                                      f"failed; restart the group")
        return self._finish(agreed)

    # -- every step -----------------------------------------------------------------
    def at_step_boundary(self) -> Placement | None:
        """COLLECTIVE. Check agreement, start or continue a staged move; the placement when one completes."""
        current = self.runtime.placement_version
        candidate = self._candidate()
        if self.channel.world_size == 1 and candidate is None and self.move is None:
            return None
        cand = agreement_vector(candidate, current)
        digest = self.serving_digest()
        serving = np.array([current, -current, digest, -digest], dtype=np.int64)
        reduced = self.channel.reduce_min(np.concatenate([cand, serving]))
        if int(reduced[4]) != -int(reduced[5]) or int(reduced[6]) != -int(reduced[7]):
            log.error("rank %d: ranks serve different placements (versions %d..%d); repairing",
                      self.channel.rank, int(reduced[4]), -int(reduced[5]))
            return self.agree_before_serving()
        if self.move is None:
            version = agreed_version(reduced[:4], current)
            if version is None:
                return None
            assert candidate is not None  # every rank holds version > current, so this one does too
            self.move = _Move(candidate, list(range(candidate.num_layers)))
        return self._continue_move()

    def _continue_move(self) -> Placement | None:
        move = self.move
        assert move is not None
        slot_change = move.target.slots_per_gpu != self.runtime.placement.slots_per_gpu
        layers = move.pending if slot_change else move.pending[:self.layers_per_step]
        if not self.runtime.move_layers(move.target, layers, timeout_s=self.move_timeout_s):
            self.move = None
            self._retry_at[(move.target.version, placement_digest(move.target))] = self.clock() + self.retry_after_s
            log.error("rank %d: move to placement version %d aborted at layers %s; retrying in %.0f s",
                      self.channel.rank, move.target.version, layers, self.retry_after_s)
            return None
        move.pending = move.pending[len(layers):]
        if move.pending:
            return None
        self.move = None
        return self._finish(self.runtime.placement)
