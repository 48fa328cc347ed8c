"""Container images of MoEShard, tagged with the package version (one place: pyproject.toml).

``make images`` builds ``OPERATOR_REPOSITORY:VERSION`` and ``ENGINE_REPOSITORY:VERSION``
(plus ``ENGINE_REPOSITORY:VERSION-cpu``); the MoEDeployment API defaults
``spec.engine.image`` to :data:`ENGINE_IMAGE`, and the Helm chart's ``appVersion``
(the operator image's default tag) is kept equal to :data:`VERSION` by ``moeshard crd``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

OPERATOR_REPOSITORY = "ghcr.io/moeshard/operator"
ENGINE_REPOSITORY = "ghcr.io/moeshard/engine"


def package_version() -> str:
    """The installed ``moeshard`` distribution's version (from pyproject.toml)."""
    try:
        return version("moeshard")
    except PackageNotFoundError:
        raise RuntimeError("the moeshard package is not installed (pip install -e .): its version tags the images") from None


VERSION = package_version()
OPERATOR_IMAGE = f"{OPERATOR_REPOSITORY}:{VERSION}"
ENGINE_IMAGE = f"{ENGINE_REPOSITORY}:{VERSION}"
