"""Build and run the repository's container images with Debian's buildah, no daemon (DESIGN.md "Real components").

As root, ``buildah --storage-driver vfs`` with ``--isolation chroot`` builds
and runs OCI images on a machine with no container engine. The base is a
Debian bookworm made by ``mmdebstrap`` (Python 3.11, as the images need) and
imported as a local ``FROM scratch`` image, passed to the Containerfiles as
``BASE``: the images are built from the same Containerfiles users build.

Build-only settings, never baked into the images:

* the host's CA bundle: ``/etc/ssl/certs`` mounted, ``PIP_CERT`` set;
* the host's local wheel folders and file:// indexes (``pip config``), mounted
  read-only at the same paths and passed as ``PIP_FIND_LINKS`` /
  ``PIP_EXTRA_INDEX_URL``, so that torch's CPU wheel (not on PyPI: PyPI's torch
  is the CUDA build) comes from the machine's wheel folder and is not
  downloaded again.

Containers under chroot isolation share the host's network, so a process in
one reaches the kube emulator served on 127.0.0.1.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

BASE_PACKAGES = "python3,python3-venv,ca-certificates"
CA_CERTS = "/etc/ssl/certs"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def missing_tools() -> str | None:
    """Why images cannot be built here (None when they can)."""
    if os.geteuid() != 0:
        return "buildah's vfs/chroot mode needs root"
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install buildah mmdebstrap; .ci/run does)"
    return None


def _pip_config() -> dict[str, list[str]]:
    """``pip config list`` of this interpreter: key (e.g. 'find-links') -> whitespace-split values."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    values: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values.setdefault(key.rpartition(".")[2], []).extend(value.strip().strip("'\"").split())
    for key, env in (("find-links", "PIP_FIND_LINKS"), ("extra-index-url", "PIP_EXTRA_INDEX_URL")):
        values.setdefault(key, []).extend(os.environ.get(env, "").split())
    return values


@dataclass
class LocalPackages:
    """The host's local wheel folders and file:// indexes, and the folders to mount for them."""

    find_links: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    @classmethod
    def from_pip_config(cls) -> "LocalPackages":
        config = _pip_config()
        found = cls()
        for link in dict.fromkeys(config.get("find-links", [])):
            path = link.removeprefix("file://")
            if os.path.isdir(path):
                found.find_links.append(path)
                found.mounts.append(path)
        for url in dict.fromkeys(config.get("extra-index-url", [])):
            path = pathlib.Path(url.removeprefix("file://"))
            if url.startswith("file://") and path.is_dir():
                found.indexes.append(url)
                found.mounts.append(str(path.parent if path.name == "simple" else path))  # files lie beside
        return found

    def wheel(self, pattern: str) -> str | None:
        """The first wheel in a find-links folder matching ``pattern`` (e.g. 'torch-2.13.0+cpu-*.whl')."""
        for folder in self.find_links:
            hits = sorted(glob.glob(os.path.join(folder, pattern)))
            if hits:
                return hits[0]
        return None

    def build_flags(self) -> list[str]:
        """buildah build flags: mounts and build arguments for pip (build time only)."""
        flags = ["--volume", f"{CA_CERTS}:{CA_CERTS}:ro", "--build-arg", f"PIP_CERT={CA_BUNDLE}"]
        for mount in self.mounts:
            flags += ["--volume", f"{mount}:{mount}:ro"]
        if self.find_links:
            flags += ["--build-arg", f"PIP_FIND_LINKS={' '.join(self.find_links)}"]
        if self.indexes:
            flags += ["--build-arg", f"PIP_EXTRA_INDEX_URL={' '.join(self.indexes)}"]
        return flags


class Buildah:
    """buildah with its own storage under ``root`` (vfs driver, chroot isolation); ``cleanup()`` removes it all."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.base_flags = ["--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "vfs"]

    def __call__(self, *args: str, timeout: float = 1200, log: pathlib.Path | None = None) -> str:
        """Run ``buildah ARGS``; its stdout. On failure, raises with the output's tail."""
        result = subprocess.run(["buildah", *self.base_flags, *args], capture_output=True, text=True,
                                timeout=timeout)
        if log is not None:
            log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-4000:]
            raise RuntimeError(f"buildah {args[0]} failed ({result.returncode}):\n{tail}")
        return result.stdout

    def base_image(self, tag: str, suite: str = "bookworm") -> str:
        """A Debian ``suite`` minbase with Python, made by mmdebstrap and imported as ``tag``."""
        context = self.root / "base"
        context.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}", suite,
                        str(context / "base.tar")], check=True, capture_output=True, timeout=900)
        (context / "Containerfile").write_text("FROM scratch\nADD base.tar /\nCMD [\"/bin/bash\"]\n")
        self("build", "--isolation", "chroot", "--pull=never", "-t", tag, str(context))
        (context / "base.tar").unlink()
        return tag

    def build(self, containerfile: str, tag: str, context: pathlib.Path, flags: list[str],
              log: pathlib.Path | None = None) -> str:
        """``buildah build`` of a Containerfile of the repository (context: the repository root)."""
        self("build", "--isolation", "chroot", "--pull=never", *flags, "-f", str(context / containerfile),
             "-t", tag, str(context), log=log)
        return tag

    def container(self, image: str, volumes: list[str] = ()) -> str:
        """A working container of ``image`` (``buildah from``), with ``SRC:DST[:ro]`` volumes; its name."""
        flags = [arg for volume in volumes for arg in ("--volume", volume)]
        return self("from", "--pull-never", *flags, image).strip().splitlines()[-1]

    def run_argv(self, container: str, *command: str, env: dict[str, str] | None = None) -> list[str]:
        """The argv that runs ``command`` in ``container`` (as the image's user, host network)."""
        flags = [arg for key, value in (env or {}).items() for arg in ("--env", f"{key}={value}")]
        return ["buildah", *self.base_flags, "run", "--isolation", "chroot", *flags, container, "--", *command]

    def cleanup(self) -> None:
        """Remove the storage folder (vfs mounts nothing, so no buildah call is needed; rmi is slower)."""
        shutil.rmtree(self.root, ignore_errors=True)
