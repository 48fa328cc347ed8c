"""End to end with a real Prometheus: skewed expert counts -> query -> new placement -> engine reload -> balance.

One Prometheus per module (started by support.prometheus) scrapes two real
exporters every second: deployment "skewed" (every series, hot experts all
on GPU 0 of the initial placement) and "partial" (some series missing).
Window 10s: the first non-empty increase() comes after ~6-7 s, so every
query is polled with a bounded deadline.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from moeshard.operator.api import LoadBalancingSpec
from moeshard.core.placement import initial_placement, parse_placement, replica_slot
from moeshard.operator.prometheus_source import (
    REASON_NO_DATA, REASON_PARTIAL, REASON_UNREACHABLE, PrometheusSource, expert_load_query,
)
from moeshard.operator.rebalance import CONDITION_METRICS, run_cycle
from support.prometheus import SKIP_REASON, ExpertCountsExporter, PrometheusServer, free_port, prometheus_binary, wait_for

LAYERS, EXPERTS, GPUS, SLOTS, TOP_K = 2, 16, 4, 5, 4
NAMESPACE = "serving"
WINDOW = "10s"
DEADLINE_S = 30.0


def skewed_shares() -> np.ndarray:
    """[L, E] Zipf shares, hottest experts 0, 1, 2, 3 (all on GPU 0 initially), capped at 1/top-K."""
    shares = np.zeros((LAYERS, EXPERTS))
    for layer, exponent in enumerate((1.4, 1.0)):
        p = np.arange(1, EXPERTS + 1, dtype=float) ** -exponent
        p /= p.sum()
        for _ in range(10):
            p = np.minimum(p, 1.0 / TOP_K)
            p /= p.sum()
        shares[layer] = p
    return shares


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    skewed = ExpertCountsExporter("skewed", NAMESPACE, skewed_shares()).start()
    partial = ExpertCountsExporter("partial", NAMESPACE, skewed_shares(), omit={(1, 3), (1, 7)}).start()
    server = PrometheusServer(binary, tmp_path_factory.mktemp("prometheus"), [skewed.target, partial.target])
    try:
        server.start()
        yield server
    finally:
        server.stop()
        skewed.stop()
        partial.stop()


def spec_for(url: str, **overrides) -> LoadBalancingSpec:
    return LoadBalancingSpec(window=WINDOW, prometheus_url=url, **overrides)


def first_answer(source: PrometheusSource, name: str, current, spec):
    """Poll the cycle until Prometheus has two scrapes in the window (NoData before that)."""
    return wait_for(
        lambda: run_cycle(source, name, NAMESPACE, current, spec, 2),
        lambda outcome: outcome.conditions[0]["reason"] != REASON_NO_DATA,
        DEADLINE_S,
    )


def routed_imbalance(placement, shares: np.ndarray, tokens: int = 20000, seed: int = 0) -> float:
    """Route sampled tokens with replica_slot; mean over layers of max/mean tokens per GPU."""
    rng = np.random.default_rng(seed)
    ratios = []
    for layer in range(placement.num_layers):
        # Top-K distinct experts per token, drawn in proportion to the layer's shares (Gumbel top-k).
        keys = np.log(shares[layer]) + rng.gumbel(size=(tokens, EXPERTS))
        experts = np.argsort(-keys, axis=1)[:, :TOP_K]
        token_keys = np.broadcast_to(np.arange(tokens)[:, None], experts.shape)
        slots = replica_slot(placement, layer, token_keys, experts)
        per_gpu = np.bincount((slots // placement.slots_per_gpu).ravel(), minlength=placement.num_gpus)
        ratios.append(per_gpu.max() / per_gpu.mean())
    return float(np.mean(ratios))


def test_skew_query_rebalance_reload_drops_imbalance(prometheus, tmp_path):
    source = PrometheusSource(prometheus.url)
    current = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS)
    spec = spec_for(prometheus.url)
    outcome = first_answer(source, "skewed", current, spec)
    metrics = outcome.conditions[0]
    assert metrics["type"] == CONDITION_METRICS and metrics["status"] == "True", metrics
    # The measured load is the exporter's skew: shares within a few percent.
    loads = source.expert_loads("skewed", NAMESPACE, WINDOW, LAYERS, EXPERTS)
    measured = loads / loads.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(measured, skewed_shares(), rtol=0.05)
    # A new placement, version + 1, written as the ConfigMap's placement.json would be.
    assert outcome.placement is not None
    assert outcome.placement.version == current.version + 1
    assert outcome.status["placementVersion"] == 1
    assert outcome.status["imbalanceAfter"] < outcome.status["imbalanceBefore"]
    assert outcome.event[0] == "Normal"
    path = tmp_path / "placement.json"
    path.write_text(outcome.placement.to_json())
    # The engine's reload path adopts it.
    try:
        from moeshard.engine.reload import PlacementWatcher
    except ImportError:  # engine not built in this checkout: the same parse the watcher does
        reloaded = parse_placement(path.read_bytes())
    else:
        reloaded = PlacementWatcher(str(path), current).poll(force=True)
    assert reloaded is not None and reloaded.version == 1
    # Tokens routed by the reloaded placement are better balanced than by the old one.
    old = routed_imbalance(current, skewed_shares())
    new = routed_imbalance(reloaded, skewed_shares())
    assert old > 1.25, old  # hot experts mostly on GPU 0
    print(f"routed max/mean old {old:.3f} new {new:.3f}")
    assert new < 1.1 and new < old - 0.15, (old, new)
    # Hysteresis: the next cycle on the same traffic keeps the new placement.
    again = run_cycle(source, "skewed", NAMESPACE, reloaded, spec, 2)
    assert again.placement is None
    assert again.conditions[1]["reason"] == "WithinThreshold"


def test_partial_data_keeps_placement(prometheus):
    current = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS)
    outcome = first_answer(PrometheusSource(prometheus.url), "partial", current, spec_for(prometheus.url))
    condition = outcome.conditions[0]
    assert (condition["status"], condition["reason"]) == ("False", REASON_PARTIAL)
    assert "2 of 32" in condition["message"] and "layer 1 expert 3" in condition["message"]
    assert outcome.placement is None and outcome.event[0] == "Warning"


def test_empty_result_keeps_placement(prometheus):
    current = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS)
    outcome = run_cycle(PrometheusSource(prometheus.url), "nobody-here", NAMESPACE, current, spec_for(prometheus.url), 2)
    assert (outcome.conditions[0]["status"], outcome.conditions[0]["reason"]) == ("False", REASON_NO_DATA)
    assert outcome.placement is None and outcome.status == {"placementVersion": 0}


def test_prometheus_down_keeps_placement():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    current = initial_placement(LAYERS, EXPERTS, GPUS, SLOTS)
    outcome = run_cycle(PrometheusSource(url, timeout_s=2), "skewed", NAMESPACE, current, spec_for(url), 2,
                        now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    condition = outcome.conditions[0]
    assert (condition["status"], condition["reason"]) == ("False", REASON_UNREACHABLE)
    assert url in condition["message"]
    assert outcome.placement is None


def test_query_is_scoped_to_the_deployment():
    query = expert_load_query("qwen", "serving", "5m")
    assert query == ('sum by (layer, expert) (increase(moeshard_expert_tokens_total'
                     '{moeshard_deployment="qwen",moeshard_namespace="serving"}[5m]))')
    with pytest.raises(ValueError, match="metadata.name"):
        expert_load_query('a"b', "serving", "5m")


# --------------------------------------------------------------------------- the daemon against the kube emulator


ROOT = Path(__file__).resolve().parents[2]


def moed(url: str, interval: str = "1m", name: str = "skewed") -> dict:
    """A MoEDeployment whose plan is EP 4 x 5 slots over 16 experts and 2 MoE layers (the exporter's shape)."""
    body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": NAMESPACE}
    body["spec"]["model"]["architecture"]["numExperts"] = EXPERTS
    body["spec"]["loadBalancing"] = {"redundantSlots": GPUS * SLOTS - EXPERTS, "interval": interval,
                                     "window": WINDOW, "prometheusURL": url}
    return body


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """kmock's emulator (tests/support/kube_emulator.py) on 127.0.0.1, the CRD installed; yields (thread, Kube)."""
    from kubernetes import client, config

    from moeshard.operator.kube import Kube
    from support.kube_emulator import EmulatorThread, KubeEmulator

    emulator = KubeEmulator()
    emulator.add_crd(yaml.safe_load((ROOT / "crds" / "moedeployments.yaml").read_text()))
    emulator.add_namespace(NAMESPACE)
    thread = EmulatorThread(emulator).start()
    path = thread.write_kubeconfig(str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", path)
    monkeypatch.setattr(config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
    configuration = client.Configuration()
    config.load_kube_config(config_file=path, client_configuration=configuration)
    try:
        yield thread, Kube(client.ApiClient(configuration), timeout=5.0)
    finally:
        thread.stop()


def create_with_config_map(kube, body: dict, placement) -> dict:
    """The MoEDeployment and the ConfigMap the reconciler would create (placement version 0)."""
    from moeshard.core.naming import config_map_name
    from moeshard.core.placement import PLACEMENT_KEY

    live = kube.request("POST", f"/apis/moeshard.io/v1alpha1/namespaces/{NAMESPACE}/moedeployments", body)
    kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": config_map_name(body["metadata"]["name"]), "namespace": NAMESPACE},
        "data": {PLACEMENT_KEY: placement.to_json()},
    })
    return live


def live_placement(kube, name: str):
    from moeshard.core.naming import config_map_name
    from moeshard.core.placement import PLACEMENT_KEY

    cm = kube.get("v1", "configmaps", NAMESPACE, config_map_name(name))
    return parse_placement(cm["data"][PLACEMENT_KEY])


def live_status(kube, name: str) -> dict:
    return kube.get("moeshard.io/v1alpha1", "moedeployments", NAMESPACE, name).get("status") or {}


def test_balance_once_writes_placement_and_status(prometheus, cluster):
    from moeshard.operator.balancer_handlers import balance_once

    _, kube = cluster
    body = create_with_config_map(kube, moed(prometheus.url), initial_placement(LAYERS, EXPERTS, GPUS, SLOTS))
    kube.patch_status("moeshard.io/v1alpha1", "moedeployments", body, lambda s: {"conditions": [
        {"type": "Available", "status": "True", "reason": "Ready", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    body = kube.get("moeshard.io/v1alpha1", "moedeployments", NAMESPACE, "skewed")
    run = wait_for(lambda: balance_once(kube, body), lambda r: r.action != "kept"
                   or r.outcome.conditions[0]["reason"] != REASON_NO_DATA, DEADLINE_S)
    assert run.action == "rebalanced", run
    placement = live_placement(kube, "skewed")
    assert placement.version == 1
    status = live_status(kube, "skewed")
    assert status["placementVersion"] == 1 and status["imbalanceAfter"] < status["imbalanceBefore"]
    assert status["lastRebalanceTime"].endswith("Z") and status["replicatedExperts"] >= 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Available"]["reason"] == "Ready"  # the reconciler's conditions are kept
    assert conditions["Balanced"]["reason"] == "Rebalanced" and conditions["MetricsAvailable"]["status"] == "True"
    assert run.events[0][:2] == ("Normal", "Rebalanced")
    # Prometheus gone: the placement stays, MetricsAvailable=False with the reason.
    down = moed(f"http://127.0.0.1:{free_port()}")
    body["spec"] = down["spec"]
    run = balance_once(kube, body)
    assert run.action == "kept" and run.events[0][0] == "Warning"
    assert live_placement(kube, "skewed").version == 1
    conditions = {c["type"]: c for c in live_status(kube, "skewed")["conditions"]}
    assert (conditions["MetricsAvailable"]["status"], conditions["MetricsAvailable"]["reason"]) == (
        "False", REASON_UNREACHABLE)
    assert conditions["Balanced"]["reason"] == "Rebalanced"  # untouched by a metrics failure


def test_balance_once_drops_its_plan_when_the_config_map_changed(prometheus, cluster):
    from moeshard.operator.balancer_handlers import balance_once
    from moeshard.core.naming import config_map_name

    _, kube = cluster
    body = create_with_config_map(kube, moed(prometheus.url), initial_placement(LAYERS, EXPERTS, GPUS, SLOTS))
    stale = kube.get("v1", "configmaps", NAMESPACE, config_map_name("skewed"))
    kube.patch("v1", "configmaps", NAMESPACE, config_map_name("skewed"), {"metadata": {"labels": {"x": "y"}}})

    class StaleReads:
        """The API as seen by a cycle that read the ConfigMap just before the reconciler wrote it."""

        def __getattr__(self, attr):
            return getattr(kube, attr)

        def get(self, api_version, plural, namespace, name, subresource=None):
            if plural == "configmaps":
                return stale
            return kube.get(api_version, plural, namespace, name, subresource)

    run = wait_for(lambda: balance_once(StaleReads(), body), lambda r: r.action == "conflict", DEADLINE_S)
    assert "retry next interval" in run.why
    assert live_placement(kube, "skewed").version == 0


def test_operator_daemon_rebalances_on_its_interval(prometheus, cluster):
    """The real kopf operator: the reconciler writes version 0, the balancer daemon replaces it."""
    import kopf

    from moeshard.operator import balancer_handlers, handlers  # noqa: F401  (register the handlers)
    from moeshard.operator.handlers import OperatorConfig
    from support.kube_emulator import OperatorThread

    thread, kube = cluster
    settings = kopf.OperatorSettings()
    settings.queueing.exit_timeout = 2.0
    settings.watching.reconnect_backoff = 0.05
    config = OperatorConfig(resync_seconds=1.0, progress_seconds=0.5, watch_server_timeout=10,
                            watch_client_timeout=15, request_timeout=5.0, error_delay_seconds=0.5)
    operator = OperatorThread(namespaces=[NAMESPACE], memo=kopf.Memo(config=config), settings=settings).start()
    try:
        kube.request("POST", f"/apis/moeshard.io/v1alpha1/namespaces/{NAMESPACE}/moedeployments",
                     moed(prometheus.url, interval="2s"))
        wait_for(lambda: live_status(kube, "skewed").get("placementVersion"), lambda v: v == 1, DEADLINE_S)
        placement = live_placement(kube, "skewed")
        assert placement.version == 1
        assert routed_imbalance(placement, skewed_shares()) < routed_imbalance(
            initial_placement(LAYERS, EXPERTS, GPUS, SLOTS), skewed_shares()) - 0.15
    finally:
        operator.stop()


def test_balance_once_disabled_and_missing_config_map(cluster):
    from moeshard.operator.balancer_handlers import balance_once, interval_seconds

    _, kube = cluster
    url = f"http://127.0.0.1:{free_port()}"
    body = moed(url)
    body["spec"]["loadBalancing"]["enabled"] = False
    body = create_with_config_map(kube, body, initial_placement(LAYERS, EXPERTS, GPUS, SLOTS))
    run = balance_once(kube, body)
    assert run.action == "skipped" and "enabled is false" in run.why
    balanced = {c["type"]: c for c in live_status(kube, "skewed")["conditions"]}["Balanced"]
    assert (balanced["status"], balanced["reason"]) == ("False", "Disabled")
    assert live_placement(kube, "skewed").version == 0
    # A deployment whose ConfigMap the reconciler has not written yet: nothing to do, nothing written.
    other = kube.request("POST", f"/apis/moeshard.io/v1alpha1/namespaces/{NAMESPACE}/moedeployments",
                         moed(url, name="fresh"))
    run = balance_once(kube, other)
    assert run.action == "skipped" and "no placement.json yet" in run.why
    assert live_status(kube, "fresh") == {}
    assert interval_seconds(other["spec"]) == 60.0 and interval_seconds({"loadBalancing": {"interval": "x"}}) == 300.0
