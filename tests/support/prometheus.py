"""A real Prometheus server and a real exporter of expert counts, for balancer tests.

``PrometheusServer`` runs the ``prometheus`` binary (Debian's package, found
on PATH, at /usr/bin/prometheus, or at $MOESHARD_PROMETHEUS) on 127.0.0.1 with
a free port, a temporary TSDB and a 1 s scrape interval. ``ExpertCountsExporter``
is a prometheus_client HTTP server on 127.0.0.1 whose
``moeshard_expert_tokens_total`` counters (with the scope labels) advance by
``rate`` tokens per second split by ``shares``.

Prometheus is ready in a fraction of a second, but ``increase()`` needs two
scrapes inside the window, so the first non-empty answer comes after about
6-7 s: use ``wait_for_query`` with a bounded deadline.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily

from moeshard.core.naming import METRIC_EXPERT_TOKENS, SCOPE_DEPLOYMENT, SCOPE_NAMESPACE, SCOPE_REPLICA


def prometheus_binary() -> str | None:
    """Path of the prometheus binary, or None when it is not installed."""
    candidates = [os.environ.get("MOESHARD_PROMETHEUS"), shutil.which("prometheus"), "/usr/bin/prometheus"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


SKIP_REASON = (
    "the prometheus binary is not installed (apt-get install -y --no-install-recommends prometheus, "
    "or set MOESHARD_PROMETHEUS to its path)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ExpertCountsExporter:
    """Serves ``moeshard_expert_tokens_total{deployment, namespace, replica, layer, expert}`` over HTTP.

    shares [L, E]: fraction of each layer's tokens per expert (rows sum to 1).
    The counters advance by ``rate`` tokens per second split by ``shares``,
    computed at scrape time from the elapsed time, so every scrape sees all
    series at the same instant (no half-applied tick skews a ratio).
    ``omit``: (layer, expert) series never exported (partial data).
    """

    def __init__(self, deployment: str, namespace: str, shares: np.ndarray, rate: float = 10000.0,
                 omit: set[tuple[int, int]] | None = None):
        self.deployment, self.namespace = deployment, namespace
        self.shares = np.asarray(shares, dtype=float)
        self.rate, self.omit = rate, omit or set()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.port = free_port()
        self._start = time.monotonic()
        self._server = None

    def collect(self):
        """The prometheus_client collector protocol: one counter family, every (layer, expert) series."""
        family = CounterMetricFamily(
            METRIC_EXPERT_TOKENS.removesuffix("_total"), "Tokens routed to each logical expert.",
            labels=(SCOPE_DEPLOYMENT, SCOPE_NAMESPACE, SCOPE_REPLICA, "layer", "expert"),
        )
        tokens = self.rate * (time.monotonic() - self._start) * self.shares
        layers, experts = self.shares.shape
        for layer in range(layers):
            for expert in range(experts):
                if (layer, expert) not in self.omit:
                    family.add_metric([self.deployment, self.namespace, "0", str(layer), str(expert)],
                                      float(tokens[layer, expert]))
        yield family

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ExpertCountsExporter":
        self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class PrometheusServer:
    """The real prometheus binary scraping ``targets`` every second."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]):
        self.binary, self.workdir, self.targets = binary, workdir, targets
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 20.0) -> "PrometheusServer":
        config = self.workdir / "prometheus.yml"
        targets = ", ".join(f"'{t}'" for t in self.targets)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: engines\n    static_configs:\n      - targets: [{targets}]\n"
        )
        (self.workdir / "tsdb").mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {ready_timeout_s} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()


def wait_for(probe: Callable[[], Any], accept: Callable[[Any], bool], timeout_s: float, every_s: float = 0.5) -> Any:
    """Call ``probe`` until ``accept(result)``; return the result, or raise TimeoutError with the last one."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
            if accept(last):
                return last
        except Exception as exc:  # noqa: BLE001 - reported if the deadline passes
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not ready after {timeout_s} s; last result: {str(last)[:300]}")
        time.sleep(every_s)
