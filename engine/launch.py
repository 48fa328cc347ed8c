"""Start the ranks of one engine group as local processes and supervise them.

``moeshard engine launch --nproc N --model DIR`` is the one-machine form of
what the operator does on Kubernetes: it builds the MOESHARD_* environment
contract (moeshard.core.engine_env) for a group of one "pod" holding N
ranks, starts ``moeshard engine serve --local-rank i`` for each rank, and
supervises them:

* SIGINT / SIGTERM to the launcher go to rank 0 first, which stops accepting
  requests, finishes the queued ones and tells every rank to stop; ranks
  still running ``grace`` seconds later get SIGTERM, then SIGKILL.
* When one rank fails the group cannot go on: the others are stopped and the
  launcher exits with the failed rank's code.
* When all ranks have exited the launcher exits (0 when all did).

``moeshard engine serve`` on a pod with several GPUs uses the same
supervisor to start its local ranks. Torch-free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from moeshard.core.engine_env import PREFIX, EngineEnvironment

CHILD_MODULE = "moeshard.engine.serving_cli"  # `python -m` entry that runs `serve` for one rank


@dataclass(frozen=True)
class LaunchSpec:
    """One local group: ``nproc`` ranks (EP = nproc) with attention TP ``tp``."""

    nproc: int
    model: str
    tp: int = 1
    port: int = 8000
    placement: str | None = None
    plan: str | None = None
    gpus_per_domain: int | None = None  # None: one domain holding every rank
    device: str = "cpu"
    deployment: str = "local"
    namespace: str = "default"
    replica_index: int = 0

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if self.tp < 1 or self.nproc % self.tp:
            raise ValueError(f"--tp ({self.tp}) must be >= 1 and divide --nproc ({self.nproc})")
        if self.gpus_per_domain is not None and (self.gpus_per_domain < 1 or self.nproc % self.gpus_per_domain):
            raise ValueError(f"--gpus-per-domain ({self.gpus_per_domain}) must be >= 1 and divide --nproc ({self.nproc})")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


def group_environment(spec: LaunchSpec, rendezvous: str) -> EngineEnvironment:
    """The engine environment every rank of the local group shares (one pod of ``nproc`` ranks)."""
    missing = os.path.join(os.path.abspath(spec.model), ".moeshard-no-{}")
    return EngineEnvironment(
        deployment=spec.deployment,
        namespace=spec.namespace,
        replica_index=spec.replica_index,
        pod_index=0,
        pods_per_group=1,
        gpus_per_pod=spec.nproc,
        gpus_per_domain=spec.gpus_per_domain or spec.nproc,
        attention_tp=spec.tp,
        expert_ep=spec.nproc,
        rendezvous=rendezvous,
        # Without --placement the path names no file: the runtime starts from the
        # initial placement and the watcher finds nothing to reload.
        plan_file=os.path.abspath(spec.plan) if spec.plan else missing.format("plan.json"),
        placement_file=os.path.abspath(spec.placement) if spec.placement else missing.format("placement.json"),
        model_path=os.path.abspath(spec.model),
        port=spec.port or 8000,  # the contract needs a real port; port 0 goes to rank 0 as --port 0
        device=spec.device,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for the rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rank_commands(nproc: int, serve_args: Sequence[str]) -> list[list[str]]:
    """``python -m moeshard.engine.serving_cli serve --local-rank i ...`` for every local rank."""
    return [[sys.executable, "-m", CHILD_MODULE, "serve", "--local-rank", str(i), *serve_args] for i in range(nproc)]


def child_environ(env: EngineEnvironment, threads: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment with the MOESHARD_* contract (and thread caps) on top."""
    environ = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(PREFIX)}
    environ.update(env.to_environ())
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            environ[name] = str(threads)
    environ.setdefault("PYTHONUNBUFFERED", "1")
    return environ


class GroupSupervisor:
    """Runs the rank processes, forwards stop signals, and reports how they ended."""

    def __init__(self, commands: Sequence[Sequence[str]], environ: dict[str, str], *, grace: float = 30.0,
                 kill_after: float = 10.0, poll: float = 0.2):
        self.commands, self.environ = [list(c) for c in commands], environ
        self.grace, self.kill_after, self.poll = grace, kill_after, poll
        self.procs: list[subprocess.Popen] = []
        self._stop_requested_at: float | None = None
        self._terminated_at: float | None = None

    def start(self) -> None:
        for command in self.commands:
            # A session of their own: a terminal's Ctrl-C reaches the launcher only,
            # which then stops the group in order (rank 0 first).
            self.procs.append(subprocess.Popen(command, env=self.environ, start_new_session=True))

    def request_stop(self, *_: object) -> None:
        """Signal handler: ask rank 0 to drain and stop the group."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
            self._signal([self.procs[0]] if self.procs else [], signal.SIGTERM)

    def _signal(self, procs: Sequence[subprocess.Popen], sig: int) -> None:
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _terminate_all(self) -> None:
        if self._terminated_at is None:
            self._terminated_at = time.monotonic()
            self._signal(self.procs, signal.SIGTERM)

    def wait(self) -> int:
        """Block until every rank has exited; the first failure's exit code, else 0."""
        failure: int | None = None
        while True:
            codes = [proc.poll() for proc in self.procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0) and failure is None:
                    failure = code if code > 0 else 128 - code  # killed by signal -N: report 128+N
                    print(f"moeshard engine launch: rank {rank} exited with code {code}; stopping the group",
                          file=sys.stderr, flush=True)
                    self._terminate_all()
            if all(code is not None for code in codes):
                return failure or 0
            now = time.monotonic()
            if self._stop_requested_at is not None and now - self._stop_requested_at > self.grace:
                self._terminate_all()
            if self._terminated_at is not None and now - self._terminated_at > self.kill_after:
                self._signal(self.procs, signal.SIGKILL)
            time.sleep(self.poll)

    def run(self) -> int:
        """start + wait with SIGINT/SIGTERM forwarded (main thread only)."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            return self.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._signal(self.procs, signal.SIGKILL)  # nothing outlives the launcher
