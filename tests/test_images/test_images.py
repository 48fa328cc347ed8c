"""The container images, built from images/*/Containerfile with buildah and run (marked ``image``).

One module-scoped build of each image (the operator image, and the engine
image with ``TORCH=cpu``) from a Debian bookworm base made by mmdebstrap
(see support/buildah.py); then:

* ``moeshard --help`` runs in the operator image (no torch there);
* the operator runs inside its image against the kube emulator on 127.0.0.1:
  a MoEDeployment created through the API gets its StatefulSet;
* ``moeshard engine verify`` passes inside the CPU engine image on a tiny
  checkpoint mounted read-only.

Everything buildah stores lives under a per-run folder, removed afterwards.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
from typing import Iterator

import pytest
import yaml
from kubernetes import client, config

from moeshard.operator.images import VERSION
from support.buildah import Buildah, LocalPackages, missing_tools
from support.kube_emulator import EmulatorThread, KubeEmulator, wait_for
from support.tiny_models import make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "test"
TORCH_CPU_WHEEL = "torch-2.13.0+cpu-*.whl"

pytestmark = [pytest.mark.image, pytest.mark.slow,
              pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
              pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    tool = Buildah(tmp_path_factory.mktemp("buildah"))
    yield tool
    tool.cleanup()


@pytest.fixture(scope="module")
def base(buildah: Buildah) -> str:
    return buildah.base_image("localhost/moeshard-base:bookworm")


@pytest.fixture(scope="module")
def packages() -> LocalPackages:
    return LocalPackages.from_pip_config()


@pytest.fixture(scope="module")
def operator_image(buildah: Buildah, base: str, packages: LocalPackages) -> str:
    flags = ["--build-arg", f"BASE={base}", *packages.build_flags()]
    return buildah.build("images/operator/Containerfile", f"localhost/moeshard-operator:{VERSION}", ROOT, flags,
                         log=buildah.root / "operator-build.log")


@pytest.fixture(scope="module")
def engine_image(buildah: Buildah, base: str, packages: LocalPackages) -> str:
    if packages.wheel(TORCH_CPU_WHEEL) is None:
        pytest.skip(f"no {TORCH_CPU_WHEEL} in a local wheel folder (pip find-links): PyPI's torch is the "
                    "CUDA build, and PyTorch's CPU index is not reachable from here")
    flags = ["--build-arg", f"BASE={base}", "--build-arg", "TORCH=cpu", "--build-arg", "TORCH_CPU_INDEX=",
             *packages.build_flags()]
    return buildah.build("images/engine/Containerfile", f"localhost/moeshard-engine:{VERSION}-cpu", ROOT, flags,
                         log=buildah.root / "engine-build.log")


def _run(buildah: Buildah, container: str, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(buildah.run_argv(container, *command), capture_output=True, text=True, timeout=timeout)


def test_operator_image_help_without_torch(buildah: Buildah, operator_image: str):
    container = buildah.container(operator_image)
    result = _run(buildah, container, "moeshard", "--help")
    assert result.returncode == 0, result.stderr
    assert "operator" in result.stdout and "engine" in result.stdout
    probe = _run(buildah, container, "python3", "-c",
                 "import importlib.util as u, os; print(u.find_spec('torch') is None, os.getuid())")
    assert probe.stdout.split() == ["True", "65532"], probe.stderr  # no torch; not root


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    em = KubeEmulator()
    em.add_crd(yaml.safe_load((ROOT / "crds" / "moedeployments.yaml").read_text()))
    em.add_namespace(NAMESPACE)
    thread = EmulatorThread(em).start()
    yield thread
    thread.stop()


def test_operator_in_its_image_reconciles(buildah: Buildah, operator_image: str, emulator: EmulatorThread,
                                          tmp_path: pathlib.Path):
    kubeconfig = pathlib.Path(emulator.write_kubeconfig(str(tmp_path)))
    kubeconfig.chmod(0o644)  # read by the image's non-root user
    tmp_path.chmod(0o755)
    container = buildah.container(operator_image, volumes=[f"{tmp_path}:/kube:ro"])
    argv = buildah.run_argv(container, "moeshard", "operator", "--namespace", NAMESPACE, "--standalone",
                            "--liveness=", "--resync", "1", "--progress-interval", "0.5",
                            env={"KUBECONFIG": f"/kube/{kubeconfig.name}"})
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
        body["metadata"]["namespace"] = NAMESPACE
        client.CustomObjectsApi(client.ApiClient(configuration)).create_namespaced_custom_object(
            "moeshard.io", "v1alpha1", NAMESPACE, "moedeployments", body)

        def reconciled() -> bool:
            assert proc.poll() is None, f"the operator exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            return "tiny-r0" in emulator.objects("apps/v1/statefulsets", NAMESPACE)

        wait_for(reconciled, timeout=180, what=f"the StatefulSet (operator log: {log})")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_engine_verify_in_the_cpu_image(buildah: Buildah, engine_image: str, tmp_path: pathlib.Path):
    model = make_tiny_model("qwen3_moe", tmp_path / "model", seed=0)
    for path in (tmp_path, *tmp_path.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    container = buildah.container(engine_image, volumes=[f"{model}:/model:ro"])
    result = _run(buildah, container, "moeshard", "engine", "verify", "--model", "/model", "--ep", "2",
                  "--prompts", "1,2,3,4;5,6", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"], report
