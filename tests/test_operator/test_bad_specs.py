"""Every MoEDeployment in tests/bad_specs/ is refused where a real cluster would refuse it.

Each file says in its header what is wrong (``# What is wrong:``), which field
must be named (``# field:``), whether the CRD can tell (``# crd: refuses`` or
``# crd: accepts (why)``) and, rarely, why the operator cannot see it
(``# operator: skip (why)``). For each:

* ``moeshard render`` and ``moeshard plan`` print one line naming the field and exit 2 (in-process);
* the emulator, admitting like an API server, answers 422 naming the field where the CRD can tell,
  and stores it where it cannot;
* the operator, given the object with admission off (what a looser CRD let through), writes a
  condition naming the field and creates no child object.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from moeshard.cli.main import main
from moeshard.operator.handlers import reconcile

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = sorted((ROOT / "tests" / "bad_specs").glob("*.yaml"))
NS = "test"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"
CHILDREN = ("apps/v1/statefulsets", "v1/services", "policy/v1/poddisruptionbudgets", "v1/configmaps")


def _header(path: pathlib.Path) -> dict[str, str]:
    header = {}
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        header[key] = value
    return header


def test_the_folder_holds_at_least_25_documented_cases():
    assert len(CASES) >= 25
    for path in CASES:
        header = _header(path)
        assert header.get("What is wrong") and header.get("field"), path.name
        assert header.get("crd", "").split(" ")[0] in ("refuses", "accepts"), path.name


@pytest.mark.parametrize("command", ["render", "plan"])
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_cli_prints_one_line_naming_the_field_and_exits_2(path, command, capsys):
    field = _header(path)["field"]
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"moeshard {command}: error: {field}"), captured.err


def test_emulator_refuses_where_the_crd_can_tell(custom):
    wrong = []
    for path in CASES:
        header, body = _header(path), yaml.safe_load(path.read_text())
        body["metadata"].pop("namespace", None)  # the namespace is the URL's; a bad one is the server's to refuse
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
            refused = None
        except ApiException as exc:
            assert exc.status == 422, (path.name, exc.status)
            refused = json.loads(exc.body)
        if header["crd"].startswith("refuses"):
            fields = [c["field"] for c in refused["details"]["causes"]] if refused else []
            if not any(f.startswith(header["field"]) for f in fields):
                wrong.append(f"{path.name}: expected a 422 naming {header['field']}, got {fields or 'created'}")
        elif refused is not None:
            wrong.append(f"{path.name}: the CRD was expected to accept it, got {refused['message']}")
    assert not wrong, "\n".join(wrong)


def test_operator_names_the_field_and_creates_no_child(kube, custom, emulator):
    emulator.set_admission(False)  # what a looser CRD let through
    wrong = []
    for path in CASES:
        header, body = _header(path), yaml.safe_load(path.read_text())
        if "operator" in header:
            continue
        body["metadata"].pop("namespace", None)
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
        live = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body["metadata"]["name"])
        outcome = reconcile(kube, live)
        status = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body["metadata"]["name"])["status"]
        planned = next(c for c in status["conditions"] if c["type"] == "Planned")
        if not (outcome.invalid is not None and status["phase"] == "Failed" and planned["status"] == "False"
                and planned["message"].startswith(header["field"])):
            wrong.append(f"{path.name}: expected a condition naming {header['field']}, got {planned['message']!r}")
    for resource in CHILDREN:
        assert emulator.objects(resource, NS) == {}, resource
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("argv", [
    ["render", "{dir}"], ["plan", "{dir}"], ["render", "{dir}/missing.yaml"], ["plan", "{binary}"],
    ["plan", "--config", "{dir}", "--hardware", "h100-hgx"], ["balance", "--loads", "{dir}", "--gpus", "2",
                                                               "--slots-per-gpu", "2"],
    ["render", "-n", "Inference", str(ROOT / "examples" / "tiny-cpu.yaml")],
])
def test_file_and_argument_errors_are_one_line_and_exit_2(argv, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 8)
    argv = [a.format(dir=tmp_path, binary=binary) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moeshard {argv[0]}: error: "), err
