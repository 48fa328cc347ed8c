"""Tiny random checkpoints for engine tests (built offline; see moeshard.engine.verify.make_tiny_model)."""

from __future__ import annotations

from moeshard.engine.verify import TINY_ARCHS, load_reference, make_tiny_model, tiny_config

__all__ = ["TINY_ARCHS", "load_reference", "make_tiny_model", "tiny_config"]
