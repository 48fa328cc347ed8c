"""kopf peering with the chart's peering CRD: of two peered operators only the higher priority acts."""

from __future__ import annotations

import logging
import pathlib

import kmock
import yaml

from moeshard.operator.handlers import OperatorConfig
from support.kube_emulator import wait_for

GROUP, VERSION, PLURAL, NS = "moeshard.io", "v1alpha1", "moedeployments", "test"
CHART_CRDS = pathlib.Path(__file__).resolve().parents[2] / "charts" / "moeshard" / "crds" / "kopf-peering.yaml"
PEERINGS = "kopf.dev/v1/kopfpeerings"
CONFIG = OperatorConfig(resync_seconds=1.0, progress_seconds=0.2, request_timeout=5.0, error_delay_seconds=0.5,
                        peering_mandatory=True)


def test_two_peered_operators_one_acts(start_operator, custom, emulator, example, check_moed, caplog):
    caplog.set_level(logging.INFO)

    def resumed() -> int:  # kopf logs this when an operator starts acting
        return sum("Resuming operations after the pause" in r.getMessage() for r in caplog.records)

    for crd in yaml.safe_load_all(CHART_CRDS.read_text()):
        emulator.call(lambda em, crd=crd: em.add_crd(crd))
    emulator.call(lambda em: em.objects.__setitem__((kmock.resource(PEERINGS), NS, "moeshard"), {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "moeshard", "namespace": NS}}))
    high = start_operator(config=CONFIG, standalone=False, peering_name="moeshard", priority=10)
    wait_for(lambda: resumed() == 1, what="the first operator acts")
    low = start_operator(config=CONFIG, standalone=False, peering_name="moeshard", priority=0)
    wait_for(lambda: len((emulator.objects(PEERINGS, NS)["moeshard"].get("status") or {})) == 2,
             what="both operators in the peering object")
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, check_moed(example("tiny-cpu")))
    wait_for(lambda: "tiny-r0" in emulator.objects("apps/v1/statefulsets", NS), what="the active one reconciles")
    assert resumed() == 1  # both start paused; only the high-priority one resumes
    high.stop()  # it leaves the peering object on exit; the standby takes over
    wait_for(lambda: resumed() == 2, timeout=20, what="the low-priority operator resumes")
    assert list((emulator.objects(PEERINGS, NS)["moeshard"].get("status") or {}).values())[0]["priority"] == 0
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                           check_moed(example("tiny-cpu", **{"metadata.name": "second"})))
    wait_for(lambda: "second-r0" in emulator.objects("apps/v1/statefulsets", NS), what="the standby took over")
    low.stop()
