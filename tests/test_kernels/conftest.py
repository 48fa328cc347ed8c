"""Kernel tests: Triton kernels against their torch twins.

Without CUDA the Triton kernels run in Triton's interpreter, which must be
chosen before triton is first imported: set it here, before any kernel module
loads (moeshard.kernels.triton_launch makes the same choice for any other
import order). With CUDA the same tests run the compiled kernels on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeshard.kernels.launch_config import LaunchConfig  # noqa: E402


@pytest.fixture
def tiny_config() -> LaunchConfig:
    """Tiny tiles keep the interpreter fast (a 128^3 tl.dot costs ~0.15 s there)."""
    return LaunchConfig(block_m=16, block_n=16, block_k=16, group_m=2, split_k=1)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def force_triton(monkeypatch):
    """Make the public entry points take the Triton path on CPU tensors too."""
    monkeypatch.setenv("MOESHARD_FORCE_TRITON", "1")


@pytest.fixture
def twin_only(monkeypatch):
    monkeypatch.delenv("MOESHARD_FORCE_TRITON", raising=False)
