"""The chart's monitoring: PodMonitor, PrometheusRule, Grafana dashboard; every query names an exported metric."""

from __future__ import annotations

import json
import re

import helm_python as helm
import yaml

from moeshard.core import naming

from .conftest import ROOT
from .test_chart_and_command import CHART

ENABLED = {"monitoring": {k: {"enabled": True} for k in ("podMonitor", "prometheusRule", "dashboard")}}
HISTOGRAMS = {naming.METRIC_REQUEST_LATENCY, naming.METRIC_TTFT, naming.METRIC_ITL, naming.METRIC_QUEUE_TIME}
PROMETHEUS_BUILTIN = {"up"}
KUBE_STATE_METRICS = {"kube_job_failed"}  # a Job's Failed condition (kube-state-metrics' job metrics)


def _exported() -> set[str]:
    """Metric names the engine exports: moeshard.core.naming's METRIC_* that engine/metrics.py registers."""
    metrics_py = (ROOT / "engine" / "metrics.py").read_text()
    names = {getattr(naming, attr) for attr in dir(naming) if attr.startswith("METRIC_") and attr in metrics_py}
    return names | {f"{h}_{suffix}" for h in HISTOGRAMS & names for suffix in ("bucket", "sum", "count")}


def _metrics_in(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (label matchers, by/without lists and label_values' label dropped)."""
    text = re.sub(r"\{[^{}]*\}", "", expr)
    text = re.sub(r"\b(by|without)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(\s*(\w+)\s*,\s*\w+\s*\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    functions = {"sum", "max", "min", "avg", "rate", "increase", "histogram_quantile", "label_values", "le"}
    return {w for w in words if w not in functions and (w.startswith(("moeshard_", "kube_")) or w in PROMETHEUS_BUILTIN)}


def _render(values: dict) -> dict[str, dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="ms", namespace="moeshard-system", is_install=True)
    docs = [doc for path, text in out.items() if "/monitoring/" in path for doc in yaml.safe_load_all(text) if doc]
    return {doc["kind"]: doc for doc in docs}


def test_monitoring_is_off_by_default():
    assert _render({}) == {}


def test_every_query_names_a_metric_the_engine_exports(check_builtin):
    objs = _render(ENABLED)
    assert set(objs) == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    check_builtin(objs["ConfigMap"])
    dashboard = json.loads(objs["ConfigMap"]["data"]["moeshard.json"])
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = objs["PrometheusRule"]["spec"]["groups"][0]["rules"]
    queries += [r["expr"] for r in rules]
    exported = _exported() | PROMETHEUS_BUILTIN | KUBE_STATE_METRICS
    for query in queries:
        named = _metrics_in(query)
        assert named, query
        assert named <= exported, (query, named - exported)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("expert load", "gpu load", "placement version", "latency", "kv"):
        assert topic in titles
    assert {r["alert"] for r in rules} == {"MoEShardEngineDown", "MoEShardPlacementRejected", "MoEShardExpertImbalance",
                                         "MoEShardWeightsDownloadFailed"}
    imbalance = next(r for r in rules if r["alert"] == "MoEShardExpertImbalance")
    assert imbalance["for"] == "15m" and "> 1.5" in imbalance["expr"]
    monitor = objs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"]["apps.kubernetes.io/pod-index"] == "0"


def test_the_download_alert_matches_the_download_jobs_the_operator_names(check_moed):
    """The alert's job_name regex matches every weights Job the operator renders, and no engine object."""
    from moeshard.operator.commands.render import render_objects

    rules = {r["alert"]: r for r in _render(ENABLED)["PrometheusRule"]["spec"]["groups"][0]["rules"]}
    expr = rules["MoEShardWeightsDownloadFailed"]["expr"]
    pattern = re.search(r'job_name=~"([^"]+)"', expr).group(1)
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        body = check_moed(yaml.safe_load(example.read_text()))
        objs = render_objects(body)
        jobs = [o["metadata"]["name"] for o in objs if o["kind"] == "Job"]
        assert bool(jobs) == body["spec"]["model"]["weights"]["uri"].startswith("hf://"), example.name
        others = [o["metadata"]["name"] for o in objs if o["kind"] != "Job"]
        assert all(re.fullmatch(pattern, name) for name in jobs), (example.name, jobs)
        assert not any(re.fullmatch(pattern, name) for name in others if name not in jobs), example.name
