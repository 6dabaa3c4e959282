"""The one dispatch point between the O(d) implementations: flat-buffer foreach (eager, any device),
per-tensor (what torch.compile traces) and Triton (eager, CUDA)."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import _foreach, _pertensor


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_runnable(device: torch.device) -> bool:
    """Triton compiles for CUDA; on other devices only its interpreter (TRITON_INTERPRET=1) runs it."""
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def select(name: str, device: torch.device) -> ModuleType:
    """Resolve a backend name for tensors on `device`. An explicit "triton" never falls back to foreach
    in eager mode; while torch.compile traces the step, the per-tensor code is what it should see (inductor
    fuses it into its own kernels, and the Triton launcher's host-built pointer tables cannot be traced
    or captured in a CUDA graph)."""
    if torch.compiler.is_compiling():
        return _pertensor
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_importable() else "foreach"
    if name == "foreach":
        return _foreach
    if not triton_importable():
        raise RuntimeError(
            "backend='triton' was requested but triton cannot be imported (pip install triton)"
        )
    if not triton_runnable(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors: Triton compiles for CUDA only; "
            "set TRITON_INTERPRET=1 to run its interpreter on CPU, or use backend='foreach'"
        )
    from . import _triton

    return _triton


def current(impl: ModuleType) -> ModuleType:
    """The implementation to call now: `impl` (chosen by `select` when the step's groups were made), or the
    per-tensor one while torch.compile traces. Groups made eagerly can be called inside a compiled function
    (`compile=True` compiles Mechanic's pre- and post-step work, not the code that makes the groups)."""
    return _pertensor if torch.compiler.is_compiling() else impl
