"""Placement reload: watch the mounted placement file, agree on a version, adopt it.

The operator writes a new placement into the deployment's ConfigMap; the
kubelet swaps the mounted file atomically (``placement.json`` is a symlink to
``..data/placement.json`` and ``..data`` is re-pointed to a new timestamped
directory). So the watcher re-reads the file BY PATH on every poll (never
keeps a handle, never trusts mtime alone) and compares a content hash.

Adoption is collective, at a step boundary of the serving loop:

1. Every rank polls its own copy of the file (``PlacementWatcher.poll``) and
   holds at most one candidate: what the file says now, when it is valid and
   newer than the placement in use.
2. All ranks all-reduce MIN over ``agreement_vector`` = [v, -v, h, -h]
   (candidate version v, 63-bit content hash h; a rank without a candidate
   puts the current version and hash 0).
3. ``agreed_version`` reads the result: when min v == max v > current and
   min h == max h, every rank holds the same parsed placement and calls
   ``runtime.apply_placement`` with it at this same step boundary. Otherwise
   nothing happens this step (a rank that has not seen the new file yet will
   see it at a later poll; the others wait for it).

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
from typing import Callable

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
