"""A per-rank heartbeat file for the liveness probe of every engine pod.

Every rank's step loop calls :meth:`Heartbeat.beat` once per step boundary
(serving.py). Idle ranks still pass a boundary every idle interval (rank 0
broadcasts an "idle" command), so a fresh file means the rank is stepping; a
rank stuck in a collective (a peer died or hung mid-step) stops beating and
its file grows stale. The operator's probes (operator/backends/moeshard_engine.py)
read only the file's mtime with coreutils, so no Python starts in a probe:

* startupProbe: the file exists (the first step after loading);
* livenessProbe: the file is younger than the stall budget.

``beat()`` touches the file at most once per ``min_interval`` seconds (one
``utime`` call; the step loop's cost is a monotonic clock read otherwise).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from moeshard.core.engine_env import HEARTBEAT_FILE, PREFIX

HEARTBEAT_ENV = PREFIX + "HEARTBEAT_FILE"


@dataclass
class Heartbeat:
    """Touches ``path`` on :meth:`beat`, at most once per ``min_interval`` seconds; ``path`` '' disables it."""

    path: str = HEARTBEAT_FILE
    min_interval: float = 1.0
    _last: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        if self.min_interval < 0:
            raise ValueError(f"min_interval: must be >= 0, got {self.min_interval}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Heartbeat":
        """From ``MOESHARD_HEARTBEAT_FILE`` (default :data:`HEARTBEAT_FILE`; empty disables)."""
        environ = os.environ if environ is None else environ
        return cls(path=environ.get(HEARTBEAT_ENV, HEARTBEAT_FILE))

    def beat(self, now: float | None = None) -> bool:
        """Mark this rank alive at a step boundary; True when the file was touched."""
        now = time.monotonic() if now is None else now
        if not self.path or now - self._last < self.min_interval:
            return False
        self._last = now
        try:
            os.utime(self.path)
        except FileNotFoundError:
            with open(self.path, "a"):
                pass
        return True


# The process's heartbeat (one engine rank per process), beaten by the serving step loop.
HEARTBEAT = Heartbeat.from_env()
