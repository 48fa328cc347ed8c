"""The chart's ClusterRole grants exactly the API calls the operator makes.

Every operator request the emulators of this test session served is recorded
(support/kube_emulator.py, item 8: kopf's and the operator's User-Agents). This
module's name sorts it after the other operator tests, which make those calls.

* Every recorded call is allowed by the ClusterRole (default values).
* Every grant is either recorded, or a verb the operator's code paths need for
  a kind it writes (``KINDS``: LIST to find, create/patch/delete to apply; pods
  are only listed and deleted, events created and listed, ``CREATE_ONLY_KINDS`` never
  patched) that these tests do not
  happen to reach, or the one admission-only grant (owner finalizers).
"""

from __future__ import annotations

import pathlib

import pytest

from moeshard.operator.manifests import CREATE_ONLY_KINDS, KINDS
from support.kube_emulator import RECORDED_RBAC_CALLS

from .test_chart_and_command import _render, _rules

# Needed by the API server, not by a request: blockOwnerDeletion on the children's ownerReferences.
ADMISSION_ONLY = {("moeshard.io", "moedeployments/finalizers", "update")}


def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for r in rules for group in r["apiGroups"] for resource in r["resources"]
            for verb in r["verbs"]}


def _code_paths() -> set[tuple[str, str, str]]:
    """Verbs the operator's apply/cleanup code uses per kind (operator/kube.py, operator/handlers.py)."""
    needed = set()
    for kind, (api_version, plural) in KINDS.items():
        group = api_version.rpartition("/")[0]
        verbs = {"Event": ("create", "list"), "Pod": ("list", "delete")}.get(
            kind, ("list", "create", "delete") if kind in CREATE_ONLY_KINDS else ("list", "create", "patch", "delete"))
        needed |= {(group, plural, verb) for verb in verbs if kind != "MoEDeployment"}
    return needed


def test_cluster_role_is_the_calls_the_operator_makes(request: pytest.FixtureRequest):
    here = pathlib.Path(__file__).parent
    collected = {pathlib.Path(item.path) for item in request.session.items}
    if not set(here.glob("test_*.py")) <= collected or request.session.testsfailed:
        pytest.skip("compares the calls of all of tests/test_operator: run the whole folder, with no failure")
    calls = {c for c in RECORDED_RBAC_CALLS if c[1]}  # resource-less requests are API discovery
    grants = _grants(_rules(_render({}), "ClusterRole"))
    namespaced_only = {c for c in calls if c[1] == "kopfpeerings"}  # KopfPeering: the namespaced mode's Role
    assert calls - grants - namespaced_only == set(), "the operator makes calls the chart does not allow"
    unused = grants - calls - _code_paths() - ADMISSION_ONLY
    assert unused == set(), "the chart grants verbs the operator never uses"
    assert ("kopf.dev", "kopfpeerings", "patch") in _grants(
        _rules(_render({"operator": {"watch": {"allNamespaces": False, "namespaces": ["a"]}}}), "Role"))
