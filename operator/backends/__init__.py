"""Engine backends: what runs inside a MoEDeployment's pod groups (see base.py for the seam)."""

from __future__ import annotations

from .base import EngineBackend, EnginePod, PodContext
from .moeshard_engine import MoEShardEngine

BACKENDS: dict[str, EngineBackend] = {"moeshard": MoEShardEngine()}
DEFAULT_BACKEND = "moeshard"


def get_backend(name: str) -> EngineBackend:
    """The backend named by ``spec.engine.backend``."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"engine.backend: {name!r} is not one of {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "EngineBackend", "EnginePod", "PodContext", "get_backend"]
