"""Every torch internal mechanic-fast relies on, in one place: a torch upgrade has one module to look at.

The lowest torch tested is pyproject.toml's floor (.ci/torch-versions runs it and the newest release).
Multi-tensor ops (`torch._foreach_*`) are used where they are called: they are torch's multi-tensor API,
listed in torch's own docs, not a detail of one version.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable
from torch.utils._python_dispatch import TorchDispatchMode  # tools/sweep.py's allocation counter

# run a function eagerly inside a compiled region (a graph break around it)
eager = torch._dynamo.disable


def chunk_cat(parts: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """The elements of `parts` (each at least 1-D) in order, as a (1, n) tensor, new or written into `out`
    ((1, n)): one op, where torch.cat of flattened views would be one copy per tensor."""
    if out is None:
        return torch._chunk_cat(parts, 0, 1)
    return torch._chunk_cat(parts, 0, 1, out=out)


# torch.optim's `_use_grad_for_differentiable` step wrapper, recognised by its code object
_USE_GRAD_CODE = _use_grad_for_differentiable(lambda self: None).__code__


def unwrapped_step(step: Callable[..., Any]) -> Tuple[Callable[..., Any], bool]:
    """A torch optimizer class's own step: without torch's step-hook wrapper and without
    `_use_grad_for_differentiable`, and whether the latter was removed (its grad mode is then the
    caller's to apply)."""
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    if getattr(step, "__code__", None) is _USE_GRAD_CODE:
        return step.__wrapped__, True
    return step, False


def patch_step_function(opt: torch.optim.Optimizer) -> None:
    """Make torch's step hooks wrap the step of `opt`'s (new) class."""
    opt._patch_step_function()  # type: ignore[attr-defined]


def no_fused_amp_unscaling(opt: torch.optim.Optimizer) -> None:
    """GradScaler must unscale the gradients before `opt.step` reads them: no fused unscaling."""
    opt._step_supports_amp_scaling = False  # type: ignore[attr-defined]


# What torch's LR schedulers wrap an optimizer's step in (they only record that the step ran).
LR_SCHEDULER_WRAPPED = "_wrapped_by_lr_sched"


def record_step_called(opt: torch.optim.Optimizer) -> None:
    """What an LR scheduler's step wrapper records."""
    opt._opt_called = True  # type: ignore[attr-defined]


def load_state_dict_hooks(
    opt: torch.optim.Optimizer,
) -> Tuple[List[Callable[..., Any]], List[Callable[..., Any]]]:
    """The load-state-dict pre and post hooks registered on `opt`, in order."""
    return (
        list(opt._optimizer_load_state_dict_pre_hooks.values()),  # type: ignore[attr-defined]
        list(opt._optimizer_load_state_dict_post_hooks.values()),  # type: ignore[attr-defined]
    )


@contextlib.contextmanager
def without_load_state_dict_hooks(opt: torch.optim.Optimizer) -> Iterator[None]:
    """`opt`'s load-state-dict hooks set aside (the caller runs them around the whole load)."""
    hooks = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
    saved = [getattr(opt, name) for name in hooks]
    for name in hooks:
        setattr(opt, name, OrderedDict())
    try:
        yield
    finally:
        for name, value in zip(hooks, saved):
            setattr(opt, name, value)


def is_fsdp1_flat(p: Tensor) -> bool:
    """A parameter FSDP1 (FullyShardedDataParallel) flattened, or a `use_orig_params` view of one."""
    return bool(getattr(p, "_fsdp_flattened", False))


def fsdp1_handles() -> List[Any]:
    """FSDP1's live flat-parameter handles (each knows its flat parameter, its views and its process
    group; a flat parameter does not point back to its handle)."""
    flat_param = sys.modules.get("torch.distributed.fsdp._flat_param")
    if flat_param is None:
        return []
    return [obj for obj in gc.get_objects() if isinstance(obj, flat_param.FlatParamHandle)]


def fsdp1_views(handle: Any) -> Sequence[Tensor]:
    """The `use_orig_params=True` parameters that view a handle's flat parameter (none otherwise)."""
    return getattr(handle.flat_param, "_params", None) or ()


def is_compiled(fn: Any) -> bool:
    """Whether `fn` is a torch.compile'd module or function (its allocations happen below the
    dispatcher)."""
    return isinstance(fn, torch._dynamo.eval_frame.OptimizedModule) or hasattr(
        fn, "_torchdynamo_orig_callable"
    )


__all__ = ["TorchDispatchMode", "chunk_cat", "eager", "is_compiled", "unwrapped_step"]
