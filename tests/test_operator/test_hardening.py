"""Hardened engine pods: restricted security, Guaranteed QoS, bounded /dev/shm, heartbeat probes on every rank.

Every example is rendered (the same builders the operator applies) and each
engine pod template (and the hf:// download Job's pod) is checked; checkov, a third-party policy scanner, runs
once over all rendered examples (it is slow to start) with the checks the
chart must pass (see CHECKS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml

from moeshard.core.engine_env import HEARTBEAT_FILE
from moeshard.engine.heartbeat import Heartbeat
from moeshard.operator.commands.render import render_objects

from .conftest import ROOT

EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))
# Probes (8, 9), resources (10-13), security context (20, 22, 23, 28, 29, 30, 31, 37), token (38).
CHECKS = ["CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13", "CKV_K8S_20",
          "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_29", "CKV_K8S_30", "CKV_K8S_31", "CKV_K8S_37",
          "CKV_K8S_38"]


def _rendered(name: str) -> list[dict]:
    body = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    return render_objects(body)


def _job_templates(objs: list[dict]) -> list[dict]:
    return [obj["spec"]["template"] for obj in objs if obj["kind"] == "Job"]


def _check_restricted(spec: dict) -> None:
    """Pod and container security of any pod the operator starts: restricted, read-only root, Guaranteed QoS."""
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"}
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert container["resources"]["requests"] == {
            k: v for k, v in container["resources"]["limits"].items()}, container["name"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # the writable path


def _pod_templates(objs: list[dict]) -> list[dict]:
    out = []
    for obj in objs:
        if obj["kind"] == "StatefulSet":
            out.append(obj["spec"]["template"])
        elif obj["kind"] == "LeaderWorkerSet":
            out.append(obj["spec"]["leaderWorkerTemplate"]["workerTemplate"])
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_engine_pods_are_hardened(name, check_builtin):
    objs = _rendered(name)
    templates = _pod_templates(objs)
    assert templates
    for template in _job_templates(objs):  # the hf:// download (a Job: no probes, it runs to completion)
        _check_restricted(template["spec"])
    for template in templates:
        spec = template["spec"]
        _check_restricted(spec)
        engine = spec["containers"][0]
        assert engine["startupProbe"]["exec"]["command"] == ["test", "-f", HEARTBEAT_FILE]
        assert HEARTBEAT_FILE in engine["livenessProbe"]["exec"]["command"][-1]  # every rank, every group
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]


def test_capabilities_are_added_back_only_when_asked(check_moed):
    body = yaml.safe_load((ROOT / "examples" / "qwen3-235b-h100.yaml").read_text())
    body["spec"]["engine"]["capabilities"] = ["IPC_LOCK"]
    check_moed(body)
    engine = _pod_templates(render_objects(body))[0]["spec"]["containers"][0]
    assert engine["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}


def test_startup_probe_budget_follows_the_spec():
    body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    body["spec"].setdefault("engine", {})["startupTimeout"] = "1h"
    engine = _pod_templates(render_objects(body))[0]["spec"]["containers"][0]
    probe = engine["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 3600


def test_heartbeat_touches_its_file_at_most_once_per_interval(tmp_path):
    path = tmp_path / "heartbeat"
    beat = Heartbeat(path=str(path), min_interval=1.0)
    assert beat.beat(now=100.0) and path.exists()
    assert not beat.beat(now=100.5)  # rate-limited: one utime per second at most
    old = path.stat().st_mtime
    time_before = time.time()
    assert beat.beat(now=101.5)
    assert path.stat().st_mtime >= min(old, time_before - 1)
    assert not Heartbeat(path="").beat()  # disabled
    assert Heartbeat.from_env({"MOESHARD_HEARTBEAT_FILE": str(path)}).path == str(path)
    with pytest.raises(ValueError, match="min_interval"):
        Heartbeat(path=str(path), min_interval=-1)


def test_liveness_probe_command_fails_on_a_stale_heartbeat(tmp_path):
    """The probe's shell command, run here against a fresh and a stale file."""
    body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    engine = _pod_templates(render_objects(body))[0]["spec"]["containers"][0]
    command = engine["livenessProbe"]["exec"]["command"]
    path = tmp_path / "heartbeat"
    probe = [*command[:-1], command[-1].replace(HEARTBEAT_FILE, str(path))]
    Heartbeat(path=str(path)).beat()
    assert subprocess.run(probe).returncode == 0
    stale = time.time() - 3600
    os.utime(path, (stale, stale))
    assert subprocess.run(probe).returncode != 0


def _checkov() -> str | None:
    local = ROOT / ".venv" / "checkov" / "bin" / "checkov"  # `make setup` installs it apart (its pins clash)
    return str(local) if local.exists() else shutil.which("checkov")


@pytest.mark.slow
@pytest.mark.skipif(_checkov() is None, reason="checkov is not installed (make setup puts it in .venv/checkov)")
def test_checkov_passes_every_example(tmp_path):
    for name in EXAMPLES:
        objs = [o for o in _rendered(name) if o["kind"] in ("StatefulSet", "LeaderWorkerSet", "Job")]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(objs))
    result = subprocess.run([_checkov(), "--skip-download", "-o", "json", "--framework", "kubernetes",
                             "--check", ",".join(CHECKS), "-d", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"].get("failed_checks", [])]
    passed = [c["check_id"] for r in reports for c in r["results"].get("passed_checks", [])]
    assert failed == []
    assert set(CHECKS) <= set(passed)  # each check really ran on something
