"""The Helm chart (lint, render, validity, RBAC covers what the operator writes) and `moeshard operator`."""

from __future__ import annotations

import argparse
import json
import pathlib

import helm_python as helm
import jsonschema
import pytest
import yaml

from moeshard.operator.commands import run_operator
from moeshard.operator.manifests import CREATE_ONLY_KINDS, KINDS

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "moeshard"


def _render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name="ms", namespace="moeshard-system", is_install=True)
    return [doc for path, text in out.items() if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def _rules(objs, kind):
    return [rule for o in objs if o["kind"] == kind for rule in o["rules"]]


def _allowed(rules, api_version: str, plural: str, verb: str) -> bool:
    group = api_version.rpartition("/")[0] if "/" in api_version else ""
    return any(group in r["apiGroups"] and plural in r["resources"] and verb in r["verbs"] for r in rules)


def test_chart_lints_clean():
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []


def _leaves(node: dict, prefix: str = "") -> set[str]:
    """Dotted paths of the values' leaves (maps with content are descended; lists and empty maps are leaves)."""
    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out |= _leaves(value, f"{path}.") if isinstance(value, dict) and value else {path}
    return out


def _schema_has(schema: dict, path: str) -> bool:
    """Whether the schema names ``path`` (a free-form map such as a securityContext covers what is under it)."""
    node = schema
    for part in path.split("."):
        if "properties" not in node:
            return node.get("type") == "object" or "$ref" in node
        if part not in node["properties"]:
            return False
        node = node["properties"][part]
    return True


def test_values_schema_covers_every_value_and_refuses_typos():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    missing = [path for path in sorted(_leaves(values)) if not _schema_has(schema, path)]
    assert missing == []
    with pytest.raises(Exception, match="replicas"):
        _render({"operator": {"replicas": "two"}})  # Helm checks the schema on render
    with pytest.raises(Exception, match="replica"):
        _render({"operator": {"replica": 2}})  # a misspelt value is refused, not ignored


def test_notes_tell_the_next_command():
    out = helm.Chart.load(str(CHART)).render({}, name="ms", namespace="moeshard-system", is_install=True)
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    assert "rollout status statefulset/ms-moeshard-operator" in notes and "kubectl apply -f" in notes


@pytest.mark.parametrize("values", [
    {},
    {"operator": {"watch": {"allNamespaces": False, "namespaces": ["team-a", "team-b"]}}},
    {"operator": {"replicas": 1, "peering": {"enabled": False}, "verbose": True}},
])
def test_chart_renders_valid_objects(values, check_builtin):
    objs = _render(values)
    kinds = sorted({o["kind"] for o in objs})
    assert {"StatefulSet", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= set(kinds)
    for obj in objs:
        if obj["kind"] not in ("ClusterKopfPeering", "KopfPeering"):
            check_builtin(obj)


def test_rbac_covers_every_kind_the_operator_writes():
    objs = _render({})
    rules = _rules(objs, "ClusterRole")
    for kind, (api_version, plural) in KINDS.items():
        if kind == "MoEDeployment":
            assert _allowed(rules, api_version, "moedeployments/status", "patch")
            continue
        verbs = ("create",) if kind == "Event" else ("list", "patch", "delete") if kind == "Pod" else (
            ("list", "create", "delete") if kind in CREATE_ONLY_KINDS else ("list", "create", "patch", "delete"))
        for verb in verbs:
            assert _allowed(rules, api_version, plural, verb), (kind, verb)
    assert _allowed(rules, "v1", "namespaces", "watch")  # kopf never starts without it
    assert _allowed(rules, "kopf.dev/v1", "clusterkopfpeerings", "patch")
    namespaced = _render({"operator": {"watch": {"allNamespaces": False, "namespaces": ["team-a"]}}})
    roles = [o for o in namespaced if o["kind"] == "Role"]
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a"]
    assert _allowed(roles[0]["rules"], "apps/v1", "statefulsets", "create")
    assert not _allowed(_rules(namespaced, "ClusterRole"), "apps/v1", "statefulsets", "create")


def test_chart_args_match_the_command_line():
    deployment = next(o for o in _render({"operator": {"watch": {"allNamespaces": False, "namespaces": ["a", "b"]}}})
                      if o["kind"] == "StatefulSet")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    run_operator.configure(parser)
    args = parser.parse_args([a.replace("$(POD_INDEX)", "1") for a in container["args"]])
    kwargs = run_operator.operator_kwargs(args)
    assert kwargs["namespaces"] == ["a", "b"] and not kwargs["clusterwide"]
    assert kwargs["peering_name"] == "moeshard" and not kwargs["standalone"]
    assert kwargs["memo"].config.peering_mandatory and kwargs["priority"] == -1  # pod 1: below pod 0


def test_command_scope_and_peering_options():
    parser = argparse.ArgumentParser()
    run_operator.configure(parser)
    kwargs = run_operator.operator_kwargs(parser.parse_args(["-A", "--standalone", "--resync", "30"]))
    assert kwargs["clusterwide"] and kwargs["standalone"] and kwargs["peering_name"] is None
    assert kwargs["memo"].config.resync_seconds == 30 and not kwargs["memo"].config.peering_mandatory
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a scope is required
    assert run_operator.load_handlers()[0] == "moeshard.operator.handlers"


def test_chart_without_peering_refuses_several_replicas():
    with pytest.raises(Exception, match="peering"):
        _render({"operator": {"replicas": 2, "peering": {"enabled": False}}})


def test_operator_without_a_cluster_fails_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing"), "KUBERNETES_SERVICE_HOST": ""}
    result = subprocess.run(
        [sys.executable, "-m", "moeshard.cli.main", "operator", "-n", "default", "--standalone"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Kubernetes credentials" in lines[0] and "Traceback" not in result.stderr
