"""Shared engine fixtures: tiny random checkpoints (built once per session, offline) and transformers' outputs."""

from __future__ import annotations

import pytest

from moeshard.engine.verify import make_tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: arch -> folder of a tiny random checkpoint of that architecture (cached for the session)."""
    made: dict[str, object] = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_{arch}"))
        return made[arch]

    return get
