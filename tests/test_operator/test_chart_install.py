"""The chart's default install reconciles exactly once: every operator pod it starts, run with its own arguments.

For each operator pod the chart's StatefulSet would start (1 and 2 replicas),
the container's arguments (with the pod's ordinal for ``$(POD_INDEX)``) are
parsed by ``moeshard operator``'s own parser and run as a real kopf operator
against the emulator, with the chart's peering object. kopf pauses every
peer whose priority ties with another's, so this fails with equal priorities.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib

import helm_python as helm
import kmock
import pytest
import yaml

from moeshard.operator.commands import run_operator
from support.kube_emulator import wait_for

from .conftest import FAST, GROUP, NAMESPACE, PLURAL, VERSION

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "moeshard"
PEERING_CRDS = CHART / "crds" / "kopf-peering.yaml"
RESUMED = "Resuming operations after the pause"


def _render(values: dict) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="ms", namespace="moeshard-system", is_install=True)
    return [doc for path, text in out.items() if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def _pod_args(objs: list[dict]) -> list[list[str]]:
    """The operator container's arguments of every pod the chart's StatefulSet starts, env expanded."""
    sts = next(o for o in objs if o["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["moeshard", "operator"]
    index_env = [e for e in container.get("env", []) if e["name"] == "POD_INDEX"]
    assert index_env[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    return [[arg.replace("$(POD_INDEX)", str(ordinal)) for arg in container["args"]]
            for ordinal in range(sts["spec"]["replicas"])]


@pytest.mark.parametrize("values", [{}, {"operator": {"replicas": 1}}], ids=["default", "one-replica"])
def test_every_chart_pod_runs_and_exactly_one_reconciles(values, start_operator, emulator, custom, example,
                                                         check_moed, caplog):
    caplog.set_level(logging.INFO)
    objs = _render(values)
    for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
        emulator.call(lambda em, crd=crd: em.add_crd(crd))
    peering = next(o for o in objs if o["kind"] == "ClusterKopfPeering")
    key = (kmock.resource("kopf.dev/v1/clusterkopfpeerings"), None, peering["metadata"]["name"])
    emulator.call(lambda em: em.objects.__setitem__(key, peering))
    pods = _pod_args(objs)
    assert len(pods) == (values.get("operator", {}).get("replicas") or 2)
    parser = argparse.ArgumentParser()
    run_operator.configure(parser)
    peers_path = "kopf.dev/v1/clusterkopfpeerings"
    for ordinal, args in enumerate(pods):
        kwargs = run_operator.operator_kwargs(parser.parse_args(args))
        assert kwargs["clusterwide"] and kwargs["memo"].config.peering_mandatory
        start_operator(config=dataclasses.replace(FAST, peering_mandatory=True), name=f"operator-{ordinal}",
                       namespaces=[], clusterwide=True, standalone=kwargs["standalone"],
                       peering_name=kwargs["peering_name"], priority=kwargs["priority"])
        # Pods start in parallel on a cluster; here one after the other, each once its peer entry is
        # written, so that a later pod never briefly acts before it sees an earlier one.
        wait_for(lambda: len(emulator.objects(peers_path)[peering["metadata"]["name"]].get("status") or {})
                 == ordinal + 1, what=f"operator-{ordinal} in the peering object")
    priorities = sorted(p["priority"] for p in emulator.objects(peers_path)["moeshard"]["status"].values())
    assert len(set(priorities)) == len(pods)  # distinct: kopf pauses every peer of a tie

    def resumed() -> list[str]:  # the operators that ever left kopf's peering pause (all start paused)
        return sorted({r.threadName for r in caplog.records if RESUMED in r.getMessage()})

    wait_for(lambda: resumed(), timeout=20, what="an operator acts")
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, check_moed(example("tiny-cpu")))
    wait_for(lambda: "tiny-r0" in emulator.objects("apps/v1/statefulsets", NAMESPACE), timeout=20,
             what="the MoEDeployment is reconciled")
    assert resumed() == ["operator-0"]  # pod 0 reconciles; every other pod stayed paused throughout
