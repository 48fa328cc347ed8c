"""Per-expert load over a window, read from Prometheus (prometheus-api-client).

The engine exports ``moeshard_expert_tokens_total{layer, expert}`` with the
scope labels of naming.py; the balancer reads the increase over the window,
summed over everything else (ranks, replica groups, restarts):

    sum by (layer, expert) (increase(moeshard_expert_tokens_total{
        moeshard_deployment="NAME", moeshard_namespace="NS"}[WINDOW]))

Every failure becomes ``MetricsUnavailable`` with a CamelCase reason (the
MetricsAvailable condition's reason) and a one-line message, so the caller
keeps its placement and tries again next interval. The parsing is a pure
function of the query result; only ``PrometheusSource.expert_loads`` talks
to the network.

Shape legend: L MoE layers, E logical experts per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeshard.core.naming import (
    METRIC_EXPERT_TOKENS, METRIC_PLACEMENT_REJECTED, METRIC_PLACEMENT_VERSION, SCOPE_DEPLOYMENT, SCOPE_NAMESPACE,
    SCOPE_REPLICA,
)

from .api import parse_duration
from .backends import DEFAULT_BACKEND, get_backend

# Reasons of the MetricsAvailable condition when it is False.
REASON_UNREACHABLE = "PrometheusUnreachable"
REASON_QUERY_FAILED = "QueryFailed"
REASON_NO_DATA = "NoData"
REASON_PARTIAL = "PartialData"
REASON_BAD_DATA = "BadData"


class MetricsUnavailable(Exception):
    """No usable load for this window; ``reason`` is the condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _selector(name: str, namespace: str) -> str:
    """The scope selector of the engine's own series (placement version, rejections)."""
    for field, value in (("metadata.name", name), ("metadata.namespace", namespace)):
        if set(value) & set('"\\\n'):
            raise ValueError(f"{field}: {value!r} cannot be used as a label value")
    return f'{SCOPE_DEPLOYMENT}="{name}",{SCOPE_NAMESPACE}="{namespace}"'


def expert_load_query(name: str, namespace: str, window: str, backend: str = DEFAULT_BACKEND) -> str:
    """The PromQL of one deployment's per-(layer, expert) token increase over ``window`` (the backend's)."""
    return get_backend(backend).expert_load_query(name, namespace, window)


def coverage_query(name: str, namespace: str, window: str) -> str:
    """Samples scraped per replica group over ``window`` (its rank 0 exports the placement version gauge)."""
    selector = _selector(name, namespace)
    parse_duration(window)
    return f"max by ({SCOPE_REPLICA}) (count_over_time({METRIC_PLACEMENT_VERSION}{{{selector}}}[{window}]))"


def group_versions_query(name: str, namespace: str) -> str:
    """The placement version each replica group serves now."""
    return f"max by ({SCOPE_REPLICA}) ({METRIC_PLACEMENT_VERSION}{{{_selector(name, namespace)}}})"


def group_rejections_query(name: str, namespace: str, window: str) -> str:
    """Placement files each replica group refused over ``window``."""
    selector = _selector(name, namespace)
    parse_duration(window)
    return f"max by ({SCOPE_REPLICA}) (increase({METRIC_PLACEMENT_REJECTED}{{{selector}}}[{window}]))"


def parse_by_replica(result: Any) -> dict[str, float]:
    """{replica label: value} from an instant vector grouped by replica; BadData when malformed."""
    if not isinstance(result, list):
        raise MetricsUnavailable(REASON_BAD_DATA, f"expected a vector result, got {type(result).__name__}")
    out: dict[str, float] = {}
    for item in result:
        try:
            replica = str(item["metric"].get(SCOPE_REPLICA, ""))
            value = float(item["value"][1])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise MetricsUnavailable(REASON_BAD_DATA, f"malformed series {str(item)[:120]}") from None
        if not math.isfinite(value):
            raise MetricsUnavailable(REASON_BAD_DATA, f"replica {replica!r} has value {value}")
        out[replica] = value
    return out


def coverage_fraction(samples: dict[str, float]) -> float | None:
    """Worst replica's scraped samples over the best one's, in [0, 1]; None without data.

    A replica whose scrapes failed for part of the window has fewer samples,
    and its counts in the window are partly extrapolated or missing.
    """
    if not samples:
        return None
    best = max(samples.values())
    return 0.0 if best <= 0 else min(samples.values()) / best


def parse_expert_loads(result: Any, num_layers: int, num_experts: int) -> np.ndarray:
    """Loads [L, E] from an instant-vector result (``[{"metric": {...}, "value": [t, "v"]}, ...]``).

    Raises MetricsUnavailable: NoData for an empty result, BadData for a
    series outside the placement's layers/experts or a value that is not a
    finite count >= 0, PartialData when some (layer, expert) series are
    missing (an absent series is not a zero: the engine creates every series
    at start, so a gap means a scrape or a rank is missing).
    """
    if not isinstance(result, list):
        raise MetricsUnavailable(REASON_BAD_DATA, f"expected a vector result, got {type(result).__name__}")
    if not result:
        raise MetricsUnavailable(REASON_NO_DATA, f"no {METRIC_EXPERT_TOKENS} series in the window")
    loads = np.zeros((num_layers, num_experts))
    seen = np.zeros((num_layers, num_experts), dtype=bool)
    for item in result:
        try:
            labels = item["metric"]
            layer, expert = int(labels["layer"]), int(labels["expert"])
            value = float(item["value"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise MetricsUnavailable(REASON_BAD_DATA, f"malformed series {str(item)[:120]}") from None
        if not (0 <= layer < num_layers and 0 <= expert < num_experts):
            raise MetricsUnavailable(
                REASON_BAD_DATA,
                f"series layer={layer} expert={expert} is outside the placement's {num_layers} layers x {num_experts} experts",
            )
        if not math.isfinite(value) or value < 0:
            raise MetricsUnavailable(REASON_BAD_DATA, f"layer={layer} expert={expert} has value {value}")
        loads[layer, expert] += value
        seen[layer, expert] = True
    if not seen.all():
        missing = np.argwhere(~seen)
        layers = np.unique(missing[:, 0])
        shown = ", ".join(str(int(x)) for x in layers[:8]) + (", ..." if layers.size > 8 else "")
        raise MetricsUnavailable(
            REASON_PARTIAL,
            f"{len(missing)} of {seen.size} (layer, expert) series missing, in layers {shown} "
            f"(first: layer {missing[0][0]} expert {missing[0][1]})",
        )
    return loads


@dataclass(frozen=True)
class PrometheusSource:
    """Reads expert load from the Prometheus HTTP API at ``url``; ``timeout_s`` bounds one query."""

    url: str
    timeout_s: float = 10.0
    backend: str = DEFAULT_BACKEND  # spec.engine.backend: whose metric the load query reads

    def query(self, promql: str) -> Any:
        """Run an instant query; raise MetricsUnavailable on any transport or API failure."""
        import requests
        from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
        from urllib3.util.retry import Retry

        try:
            client = PrometheusConnect(url=self.url, disable_ssl=True, retry=Retry(total=0), timeout=self.timeout_s)
            return client.custom_query(promql)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise MetricsUnavailable(REASON_UNREACHABLE, f"{self.url}: {type(exc).__name__}: {_first_line(exc)}") from None
        except PrometheusApiClientException as exc:
            raise MetricsUnavailable(REASON_QUERY_FAILED, f"{self.url}: {_first_line(exc)}") from None
        except requests.RequestException as exc:
            raise MetricsUnavailable(REASON_UNREACHABLE, f"{self.url}: {_first_line(exc)}") from None
        except ValueError as exc:  # a body that is not JSON (not a Prometheus at that URL)
            raise MetricsUnavailable(REASON_QUERY_FAILED, f"{self.url}: {_first_line(exc)}") from None

    def expert_loads(self, name: str, namespace: str, window: str, num_layers: int, num_experts: int) -> np.ndarray:
        """Tokens per (layer, logical expert) over ``window``, [L, E]."""
        return parse_expert_loads(self.query(expert_load_query(name, namespace, window, self.backend)),
                                  num_layers, num_experts)

    def coverage(self, name: str, namespace: str, window: str) -> float | None:
        """Scrape coverage of the window (``coverage_fraction``); None when no replica exports yet."""
        return coverage_fraction(parse_by_replica(self.query(coverage_query(name, namespace, window))))

    def group_versions(self, name: str, namespace: str, window: str) -> dict[str, tuple[int, bool]]:
        """{replica group: (placement version it serves, whether it refused a placement in the window)}."""
        versions = parse_by_replica(self.query(group_versions_query(name, namespace)))
        rejected = parse_by_replica(self.query(group_rejections_query(name, namespace, window)))
        return {r: (int(v), rejected.get(r, 0.0) > 0) for r, v in sorted(versions.items())}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
