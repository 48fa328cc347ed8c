"""Fixtures: the kube emulator over HTTP, a kubeconfig pointing at it, the official client, kopf.

kopf runs in a thread with its own event loop (``OperatorThread``), not in the
test's loop, so looptime does not apply; the fast settings below (0.2 s
between re-reconciles while progressing) keep its timers cheap instead.

The emulator admits like an API server (support/kube_admission.py): the
CRD's schema with defaults and CEL rules, built-in kinds through
kubernetes-validate. ``create_unadmitted`` plays an object that got past a
looser CRD, for the operator's own refusal.
"""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any, Callable, Iterator

import jsonschema
import kopf
import kubernetes_validate
import pytest
import yaml
from kubernetes import client, config

from moeshard.operator.handlers import OperatorConfig, register
from moeshard.operator.kube import Kube
from moeshard.operator.manifests import CUSTOM_KINDS
from support.kube_emulator import RECORDED_RBAC_CALLS, EmulatorThread, KubeEmulator, OperatorThread

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "test"
GROUP, VERSION, PLURAL = "moeshard.io", "v1alpha1", "moedeployments"
# Fast settings: the operator re-reconciles every 0.2 s while progressing.
FAST = OperatorConfig(resync_seconds=1.0, progress_seconds=0.2, watch_server_timeout=10, watch_client_timeout=15,
                      request_timeout=5.0, error_delay_seconds=0.5)


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "crds" / "moedeployments.yaml").read_text())


@pytest.fixture(scope="session")
def check_moed(crd: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Validate a MoEDeployment against the CRD's openAPIV3Schema; returns it."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft202012Validator(schema)

    def check(body: dict[str, Any]) -> dict[str, Any]:
        validator.validate(body)
        return body

    return check


def _check_builtin(obj: dict[str, Any]) -> None:
    """kubernetes-validate (1.33, strict) for every kind it has a schema for."""
    if obj["kind"] in CUSTOM_KINDS:
        return
    clean = copy.deepcopy(obj)
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp"):
        clean.get("metadata", {}).pop(key, None)
    clean.pop("status", None)
    clean.setdefault("apiVersion", {"StatefulSet": "apps/v1", "PodDisruptionBudget": "policy/v1",
                                    "NetworkPolicy": "networking.k8s.io/v1"}.get(obj["kind"], "v1"))
    kubernetes_validate.validate(clean, "1.33", strict=True)


def _example(name: str, **changes: Any) -> dict[str, Any]:
    """An example MoEDeployment from examples/, in the test namespace."""
    body = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    body["metadata"]["namespace"] = NAMESPACE
    for path, value in changes.items():
        node = body
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return body


@pytest.fixture(scope="session")
def check_builtin() -> Callable[[dict[str, Any]], None]:
    """kubernetes-validate (1.33, strict) of a built-in object; custom kinds are skipped explicitly."""
    return _check_builtin


@pytest.fixture(scope="session")
def example() -> Callable[..., dict[str, Any]]:
    """example(name, **{"spec.parallelism.replicas": 2}): an examples/ MoEDeployment in the test namespace."""
    return _example


@pytest.fixture
def emulator(crd: dict[str, Any]) -> Iterator[EmulatorThread]:
    em = KubeEmulator()
    em.add_crd(crd)
    em.add_namespace(NAMESPACE)
    thread = EmulatorThread(em).start()
    yield thread
    thread.stop()
    RECORDED_RBAC_CALLS.update(em.rbac_calls)  # compared with the chart's ClusterRole (test_zz_rbac_*)


@pytest.fixture
def create_unadmitted(emulator: EmulatorThread) -> Callable[[Any, dict[str, Any]], tuple[str | None, dict[str, Any]]]:
    """create_unadmitted(custom, body) -> (the emulator's 422 message or None, the created object).

    First offers ``body`` to the emulator with admission on (what a real API
    server would say), then creates it with admission off: the object an older
    or looser CRD let in, for the operator to refuse.
    """
    from kubernetes.client.exceptions import ApiException

    def create(custom: Any, body: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        refusal = None
        try:
            created = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
            return None, created
        except ApiException as exc:
            if exc.status != 422:
                raise
            refusal = json.loads(exc.body)["message"]
        emulator.set_admission(False)
        try:
            return refusal, custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
        finally:
            emulator.set_admission(True)

    return create


@pytest.fixture
def kubeconfig(emulator: EmulatorThread, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = emulator.write_kubeconfig(str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", path)
    monkeypatch.setattr(config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
    return path


@pytest.fixture
def api(kubeconfig: str) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture
def kube(api: client.ApiClient) -> Kube:
    return Kube(api, timeout=30.0)  # generous: a loaded machine must not fail a test on time


@pytest.fixture
def start_operator(kubeconfig: str) -> Iterator[Callable[..., OperatorThread]]:
    """Start the real kopf operator (standalone, namespace 'test' unless overridden); stopped at teardown."""
    started: list[OperatorThread] = []

    def start(**overrides: Any) -> OperatorThread:
        settings = kopf.OperatorSettings()
        settings.queueing.exit_timeout = 2.0
        settings.watching.reconnect_backoff = 0.05
        memo = kopf.Memo(config=overrides.pop("config", FAST))
        registry = kopf.OperatorRegistry()  # only this module's handlers, whatever else was imported
        register(registry)
        kopf.on.login(registry=registry)(kopf.login_via_client)  # the default registry has it built in
        overrides.setdefault("namespaces", [NAMESPACE])
        op = OperatorThread(memo=memo, settings=settings, registry=registry, **overrides)
        started.append(op)
        return op.start()

    yield start
    for op in started:
        if not op.stop_flag.is_set():
            op.stop()
