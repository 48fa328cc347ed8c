"""How the Triton kernels of this package get launched on a given device.

On CUDA a ``@triton.jit`` kernel compiles as usual. Without CUDA the only way
to run one is Triton's interpreter, and ``triton.jit`` (including the
``tl.sum``/``tl.cumsum`` helpers defined when ``triton.language`` is first
imported) picks the interpreter only if ``TRITON_INTERPRET=1`` is set before
triton is imported. So this module, which every kernel module imports before
triton, selects the interpreter on a machine with no CUDA device: there is no
other mode that could run there, and it keeps the result independent of which
test module happens to import triton first. The interpreter is for
correctness only: never time it (see PERF.md).
"""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after the interpreter choice above)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

FORCE_TRITON_ENV = "MOESHARD_FORCE_TRITON"


def triton_requested(x: torch.Tensor) -> bool:
    """True when the Triton path should run for a tensor living on ``x.device``.

    CUDA tensors always take it; CPU tensors only when ``MOESHARD_FORCE_TRITON=1``
    (read at call time, never at import), so interpreter tests can exercise
    the Triton kernels against their torch twins.
    """
    return x.is_cuda or os.environ.get(FORCE_TRITON_ENV, "") == "1"


def launchable(kernel, device: torch.device):
    """Return ``kernel`` if it can be launched for tensors on ``device``, else raise."""
    if device.type != "cuda" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"Triton kernel {kernel.__name__} cannot run on {device}: triton was imported without "
            "TRITON_INTERPRET=1 (set it before anything imports triton to run kernels on CPU)"
        )
    return kernel


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
