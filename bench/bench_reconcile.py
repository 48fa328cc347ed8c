"""Reconcile many MoEDeployments against the kube emulator: wall time, API requests per reconcile, no-op writes.

    .venv/bin/python bench/bench_reconcile.py [--count 100] [--quick] [--no-kopf] [--out PATH]

Everything talks HTTP to tests/support/kube_emulator.py (kmock's emulator in
its own thread), so the request counts are those a real API server would see;
the wall times are this machine's Python HTTP round trips, not a cluster's.

Phases, each over ``count`` MoEDeployments (tiny-cpu example, 2 replica groups):
  1. first reconcile (creates 9 objects each) and a second one once the groups
     report ready (status only);
  2. no-op reconcile, subject vs baseline alternated: the subject is
     ``handlers.reconcile`` (the apply layer compares the desired-hash
     annotation and writes nothing when equal); the baseline is the same
     reconcile with an apply that always patches (what a controller that
     re-sends every child each resync does);
  3. (unless --no-kopf) the real kopf operator: time until every new
     MoEDeployment has status written, and the requests it took.
"""

from __future__ import annotations

import collections
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kopf  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client, config  # noqa: E402

from harness import alternate, standard_parser, write_result  # noqa: E402
from moeshard.operator.handlers import OperatorConfig, reconcile  # noqa: E402
from moeshard.operator.kube import ApplyResult, Kube  # noqa: E402
from support.kube_emulator import EmulatorThread, KubeEmulator, OperatorThread  # noqa: E402

NS = "bench"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"


class AlwaysPatchKube(Kube):
    """Baseline apply: patch every existing child on every reconcile (no desired-hash check)."""

    def apply(self, desired: dict[str, Any], live: dict[str, Any] | None, force: bool = False) -> ApplyResult:
        return super().apply(desired, live, force=True)


def served(emulator: EmulatorThread) -> collections.Counter:
    """Requests the emulator has served so far, by (method, "events" | "other")."""
    return emulator.call(lambda em: collections.Counter(em.served))


def counts(before: collections.Counter, after: collections.Counter, n: int,
           with_events: bool = True) -> dict[str, Any]:
    delta = after - before
    if not with_events:
        delta = collections.Counter({k: v for k, v in delta.items() if k[1] != "events"})
    total = sum(delta.values())
    writes = sum(v for (method, _), v in delta.items() if method != "GET")
    by_method: dict[str, int] = collections.Counter()
    for (method, _), v in delta.items():
        by_method[method] += v
    return {"requests_per_reconcile": total / n, "writes_per_reconcile": writes / n, "by_method": dict(by_method)}


def bodies_of(custom: client.CustomObjectsApi) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"]}


def reconcile_all(kube: Kube, bodies: dict[str, dict[str, Any]], names: list[str]) -> list[float]:
    """One reconcile per deployment; seconds of each."""
    times = []
    for name in names:
        body = bodies[name]
        start = time.perf_counter()
        reconcile(kube, body)
        times.append(time.perf_counter() - start)
    return times


def mark_ready(kube: Kube, emulator: EmulatorThread) -> None:
    for name, sts in emulator.objects("apps/v1/statefulsets", NS).items():
        n = sts["spec"]["replicas"]
        kube.patch("apps/v1", "statefulsets", NS, name, {"status": {"replicas": n, "readyReplicas": n}},
                   subresource="status")


def main() -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="MoEDeployments (default 100; 20 with --quick)")
    parser.add_argument("--no-kopf", action="store_true", help="skip the end-to-end kopf phase")
    args = parser.parse_args()
    count = 20 if args.quick and args.count == 100 else args.count

    emulator_obj = KubeEmulator(history_limit=20)
    emulator_obj.add_crd(yaml.safe_load((ROOT / "crds" / "moedeployments.yaml").read_text()))
    emulator_obj.add_namespace(NS)
    emulator = EmulatorThread(emulator_obj).start()
    kubeconfig = emulator.write_kubeconfig()
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    api = client.ApiClient(configuration)
    custom = client.CustomObjectsApi(api)
    kube, baseline_kube = Kube(api), AlwaysPatchKube(api)

    template = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    template["metadata"]["namespace"] = NS
    template["spec"]["parallelism"]["replicas"] = 2
    names = [f"d{i:03d}" for i in range(count)]
    for name in names:
        body = copy.deepcopy(template)
        body["metadata"]["name"] = name
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    result: dict[str, Any] = {"count": count, "groups_per_deployment": 2}

    # 1. first reconcile, then the status-only one after the groups are ready
    bodies = bodies_of(custom)
    before = served(emulator)
    times = reconcile_all(kube, bodies, names)
    result["first_reconcile"] = {"wall_s": sum(times), "median_s": statistics.median(times),
                                 **counts(before, served(emulator), count)}
    mark_ready(kube, emulator)
    bodies = bodies_of(custom)
    before = served(emulator)
    times = reconcile_all(kube, bodies, names)
    result["ready_reconcile"] = {"wall_s": sum(times), "median_s": statistics.median(times),
                                 **counts(before, served(emulator), count)}

    # 2. no-op reconcile: subject (hash-guarded) vs baseline (always patch), alternated
    bodies = bodies_of(custom)

    def one_pass(k: Kube) -> dict[str, Any]:
        start = served(emulator)
        t = reconcile_all(k, bodies, names)
        return {"wall_s": sum(t), "median_s": statistics.median(t), **counts(start, served(emulator), count)}

    result["noop_subject"] = one_pass(kube)
    result["noop_baseline_always_patch"] = one_pass(baseline_kube)
    result["noop_subject_after_baseline"] = one_pass(kube)  # the baseline's patches left nothing to do
    result["noop_timing"] = alternate(lambda: reconcile_all(kube, bodies, names),
                                      lambda: reconcile_all(baseline_kube, bodies, names),
                                      repeats=3 if args.quick else 7, warmup=1)
    result["noop_timing"]["per_reconcile_subject_ms"] = result["noop_timing"]["subject_median_s"] / count * 1e3
    result["noop_timing"]["per_reconcile_baseline_ms"] = result["noop_timing"]["baseline_median_s"] / count * 1e3

    # 3. the real kopf operator, end to end
    if not args.no_kopf:
        import os

        os.environ["KUBECONFIG"] = kubeconfig
        config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubeconfig
        import moeshard.operator.handlers  # noqa: F401  (registers the handlers)

        fast = OperatorConfig(resync_seconds=600, progress_seconds=600, request_timeout=10)
        operator = OperatorThread(namespaces=[NS], memo=kopf.Memo(config=fast))
        operator.start()
        time.sleep(1.0)  # let it resume the existing deployments and settle
        before = served(emulator)
        start = time.perf_counter()
        new = [f"k{i:03d}" for i in range(count)]
        for name in new:
            body = copy.deepcopy(template)
            body["metadata"]["name"] = name
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

        def done() -> bool:
            objs = emulator.objects("moeshard.io/v1alpha1/moedeployments", NS)
            return all((objs[n].get("status") or {}).get("observedGeneration") == 1 for n in new)

        while not done() and time.perf_counter() - start < 300:
            time.sleep(0.05)
        wall = time.perf_counter() - start
        after = served(emulator)
        operator.stop()
        result["kopf_create"] = {"wall_s": wall, "per_deployment_ms": wall / count * 1e3,
                                 "all_settled": done(), **counts(before, after, count),
                                 "without_events": counts(before, after, count, with_events=False)}

    emulator.stop()
    path = write_result("reconcile", result, args.out)
    print(json.dumps({k: v for k, v in result.items()}, indent=1, default=float))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
