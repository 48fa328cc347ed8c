"""The autoscaling loop end to end: load -> engine metric -> Prometheus recording rule -> HPA formula -> /scale
-> the real kopf operator adds a group -> load drops -> the group is drained and removed, no request lost.

Stand-ins, said plainly:
* each replica group's rank 0 is a ``StandInRank0``: a request queue served
  one request at a time (``SERVICE_SECONDS`` each) by a thread, exporting
  ``moeshard_requests_waiting`` with the scope labels over HTTP, as the engine
  does (a real CPU engine group per replica is too heavy for the test budget);
* the test plays the StatefulSet controller and kubelet (groups ready, rank-0
  pods created; a stand-in stops when its group's StatefulSet is deleted) and
  the front Service (requests go round robin to rank-0 pods labelled
  ``moeshard.io/serving=true``);
* the HPA controller is the documented formula, applied by the test every
  second to the recorded series read from the real Prometheus:
  ``desired = ceil(current * metric / target)``, unchanged within a 10 %
  tolerance, clamped to [minReplicas, maxReplicas] (no controller manager
  runs here).
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from moeshard.core.naming import SCOPE_DEPLOYMENT, SCOPE_NAMESPACE, SCOPE_REPLICA
from moeshard.operator.autoscaling import METRIC_REQUESTS_WAITING, SIGNALS, build_recording_rules
from moeshard.operator.manifests import SERVING_LABEL
from support.kube_emulator import wait_for
from support.prometheus import SKIP_REASON, PrometheusServer, free_port, prometheus_binary

GROUP, VERSION, PLURAL, NS = "moeshard.io", "v1alpha1", "moedeployments", "test"
STS, PODS = "apps/v1/statefulsets", "v1/pods"
SERVICE_SECONDS = 0.1  # one group serves 10 requests/s
TARGET_WAITING = 4
MAX_GROUPS = 2
HPA_TOLERANCE = 0.1


class StandInRank0:
    """Rank 0 of replica group ``replica``: a FIFO served by one thread, exporting the waiting count."""

    def __init__(self, deployment: str, replica: int):
        self.labels = [deployment, NS, str(replica)]
        self.queue: collections.deque[int] = collections.deque()
        self.done: list[int] = []
        self.running = False  # the group's pods exist
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.port = free_port()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self.worker = threading.Thread(target=self._serve, daemon=True)
        self.worker.start()

    def collect(self):
        family = GaugeMetricFamily(METRIC_REQUESTS_WAITING, "Requests queued, not yet running.",
                                   labels=(SCOPE_DEPLOYMENT, SCOPE_NAMESPACE, SCOPE_REPLICA))
        with self.lock:
            if self.running:
                family.add_metric(self.labels, float(len(self.queue)))
        yield family

    def submit(self, request: int) -> None:
        with self.lock:
            if not self.running:
                raise RuntimeError(f"request {request} sent to a stopped group {self.labels[2]}")
            self.queue.append(request)

    def kill(self) -> list[int]:
        """The kubelet stops the pod: the requests still queued are lost (returned)."""
        with self.lock:
            self.running = False
            lost = list(self.queue)
            self.queue.clear()
        return lost

    def _serve(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                request = self.queue[0] if self.queue else None
            if request is None:
                time.sleep(0.01)
                continue
            time.sleep(SERVICE_SECONDS)
            with self.lock:
                if self.queue and self.queue[0] == request:
                    self.queue.popleft()
                    self.done.append(request)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


class Cluster:
    """Plays the StatefulSet controller, the kubelet and the front Service for the stand-ins."""

    def __init__(self, kube, emulator, ranks: list[StandInRank0]):
        self.kube, self.emulator, self.ranks = kube, emulator, ranks
        self.serving: list[int] = []  # replicas whose rank-0 pod the front Service selects
        self.lost: list[int] = []
        self.killed: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            groups = self.emulator.objects(STS, NS)
            pods = self.emulator.objects(PODS, NS)
            for name, sts in groups.items():
                replica = int(sts["metadata"]["labels"]["moeshard.io/replica"])
                if (sts.get("status") or {}).get("readyReplicas") != sts["spec"]["replicas"]:
                    self.ranks[replica].running = True  # pods started, engine loaded
                    self.kube.patch("apps/v1", "statefulsets", NS, name, {"status": {
                        "replicas": sts["spec"]["replicas"], "readyReplicas": sts["spec"]["replicas"]}},
                        subresource="status")
                if f"{name}-0" not in pods:
                    labels = dict(sts["spec"]["template"]["metadata"]["labels"]) | {"apps.kubernetes.io/pod-index": "0"}
                    self.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                        "name": f"{name}-0", "namespace": NS, "labels": labels},
                        "spec": {"containers": [{"name": "engine", "image": "x"}]}})
            live = {int(s["metadata"]["labels"]["moeshard.io/replica"]) for s in groups.values()}
            for replica, rank in enumerate(self.ranks):
                if rank.running and replica not in live:  # group deleted: its pods stop
                    self.lost.extend(rank.kill())
                    self.killed.append(replica)
            self.serving = sorted(int(p["metadata"]["labels"]["moeshard.io/replica"]) for p in pods.values()
                                  if p["metadata"]["labels"].get(SERVING_LABEL) == "true"
                                  and int(p["metadata"]["labels"]["moeshard.io/replica"]) in live)

    def __enter__(self) -> "Cluster":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


class LoadGenerator:
    """Sends ``rate`` requests per second round robin over the serving groups."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.rate = 0.0
        self.sent: list[int] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            if self.rate <= 0 or not self.cluster.serving:
                time.sleep(0.02)
                continue
            serving = self.cluster.serving
            self.send_to(serving[turn % len(serving)])
            turn += 1
            time.sleep(1.0 / self.rate)

    def send_to(self, replica: int) -> int:
        """One request to the group ``replica`` (what the front Service chose); returns its id."""
        with self.lock:
            request = len(self.sent)
            self.cluster.ranks[replica].submit(request)
            self.sent.append(request)
        return request

    def __enter__(self) -> "LoadGenerator":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


def _query(url: str, expr: str) -> float | None:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as r:
        result = json.load(r)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def hpa_desired(current: int, metric: float, target: float, low: int, high: int) -> int:
    """The HPA controller's formula for a Value target, with its default 10 % tolerance."""
    ratio = metric / target
    desired = current if abs(ratio - 1.0) <= HPA_TOLERANCE else math.ceil(current * ratio)
    return max(low, min(high, desired))


@pytest.mark.slow
def test_load_scales_out_then_in_with_a_drain_and_nothing_lost(start_operator, custom, kube, emulator, example,
                                                               check_moed, tmp_path):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    auto = {"minReplicas": 1, "maxReplicas": MAX_GROUPS, "target": {"waitingRequestsPerReplica": TARGET_WAITING},
            "scaleDownStabilization": "0s", "drainTimeout": "3s"}
    ranks = [StandInRank0("tiny", r) for r in range(MAX_GROUPS)]
    prometheus = PrometheusServer(binary, tmp_path, [f"127.0.0.1:{r.port}" for r in ranks],
                                  rules=build_recording_rules(interval="1s"))
    record = SIGNALS["waitingRequestsPerReplica"].record
    series = f'{record}{{moeshard_namespace="{NS}",moeshard_deployment="tiny"}}'
    scale_calls: list[int] = []

    def hpa_step() -> int:
        current = custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny")["spec"]["replicas"]
        metric = _query(prometheus.url, series)
        if metric is None:
            return current
        desired = hpa_desired(current, metric, TARGET_WAITING, auto["minReplicas"], auto["maxReplicas"])
        if desired != current:
            custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "tiny",
                                                        {"spec": {"replicas": desired}})
            scale_calls.append(desired)
        return desired

    try:
        prometheus.start()
        start_operator()
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                               check_moed(example("tiny-cpu", **{"spec.autoscaling": auto})))
        with Cluster(kube, emulator, ranks) as cluster, LoadGenerator(cluster) as load:
            wait_for(lambda: cluster.serving == [0], timeout=30, what="group 0 serving")
            assert sorted(emulator.objects("autoscaling/v2/horizontalpodautoscalers", NS)) == ["tiny"]
            load.rate = 15.0  # 1.5x what one group serves: its queue grows
            wait_for(lambda: hpa_step() == 2, timeout=40, interval=1.0, what="the HPA formula asking for 2 groups")
            wait_for(lambda: cluster.serving == [0, 1], timeout=30, what="group 1 added and serving")
            assert sorted(emulator.objects(STS, NS)) == ["tiny-r0", "tiny-r1"]
            load.rate = 3.0  # load drops: the queues empty, the recorded mean falls under the target
            wait_for(lambda: hpa_step() == 1, timeout=40, interval=1.0, what="the HPA formula asking for 1 group")
            # requests group 1 took just before it left the front Service: 1 s of work the drain must finish
            in_flight = [load.send_to(1) for _ in range(10)]
            wait_for(lambda: cluster.serving == [0], timeout=10, what="group 1 out of the front Service")
            drained_at = time.monotonic()
            assert "tiny-r1" in emulator.objects(STS, NS)  # still finishing its requests
            wait_for(lambda: sorted(emulator.objects(STS, NS)) == ["tiny-r0"], timeout=30, what="group 1 deleted")
            assert time.monotonic() - drained_at > 1.0  # it was drained, not deleted at once
            load.rate = 0.0
            wait_for(lambda: not ranks[0].queue, timeout=30, what="group 0 idle")
        assert scale_calls[:2] == [2, 1]
        assert cluster.killed == [1] and cluster.lost == []  # group 1 had finished every request it took
        assert sorted(ranks[0].done + ranks[1].done) == load.sent  # nothing lost, nothing twice
        assert set(in_flight) <= set(ranks[1].done), "group 1 finished what it had taken before the scale-in"
        status = wait_for(lambda: (s := custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny")[
            "status"]).get("drainingReplicas") == 0 and s, what="status after the drain")
        assert status["replicas"] == 1 and status["readyReplicas"] == 1 and status["phase"] == "Ready"
    finally:
        prometheus.stop()
        for rank in ranks:
            rank.close()
