"""`mechanize`, the one public entry point, and what builds mechanized classes."""

from __future__ import annotations

import dataclasses
import inspect
import typing
import warnings
import weakref
from typing import Any, Callable, Dict, MutableMapping, Optional, Sequence, Tuple, Type, TypeVar, overload

import torch
from torch import Tensor

from . import _distributed, _named, _torch
from ._config import MechanicConfig
from ._instance import mechanize_instance, unwrap
from ._named import check_base
from .optimizer import Mechanic, MechanicSpec, _default_log_func


def is_mechanized(opt: Any) -> bool:
    """True for a mechanized optimizer, also inside accelerate's or Lightning's optimizer wrappers."""
    return isinstance(unwrap(opt), Mechanic)


def mechanic_scale(opt: Any) -> Tensor:
    """``opt.mechanic_scale`` of a mechanized optimizer, also inside framework wrappers: the factor by
    which Mechanic multiplies every group's lr (effective lr = ``mechanic_scale(opt) * group["lr"]``)."""
    inner = unwrap(opt)
    if not isinstance(inner, Mechanic):
        raise TypeError(f"{type(inner).__name__} is not mechanized")
    return inner.mechanic_scale


def mechanic_log_values(opt: Any) -> Dict[str, Tensor]:
    """What to log of a mechanized optimizer (also inside framework wrappers), as 0-d tensors on its
    device, read without a host sync: ``mechanic/scale`` (S, as `mechanic_scale`) and
    ``mechanic/effective_lr`` (S times group 0's lr), and ``mechanic/effective_lr/group_<i>`` for every
    group where the groups' lrs differ."""
    inner = unwrap(opt)
    scale = mechanic_scale(inner)
    lrs = [group["lr"] for group in inner.param_groups]
    values = {"mechanic/scale": scale, "mechanic/effective_lr": scale * lrs[0]}
    if any(not _same_lr(lr, lrs[0]) for lr in lrs[1:]):
        values.update({f"mechanic/effective_lr/group_{i}": scale * lr for i, lr in enumerate(lrs)})
    return values


def _same_lr(a: Any, b: Any) -> bool:
    return a is b or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b)


# One class per (base, options, log_func, partition group), while something uses it: an optimizer, its
# deepcopy and its unpickled copy share it; a class no longer used lets its log_func and group go.
_CLASSES: MutableMapping[Tuple[type, MechanicConfig, Optional[Callable[..., Any]], Any], type] = (
    weakref.WeakValueDictionary()
)
_NAMED: Dict[type, type] = {}  # mechanic_fast.optim's classes: one per torch.optim class
OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)


@overload
def mechanize(Base: Type[OptimizerT], *args: Any, **options: Any) -> Type[OptimizerT]: ...


@overload
def mechanize(Base: OptimizerT, *args: Any, **options: Any) -> OptimizerT: ...


def mechanize(
    Base: Any,
    s_decay: Optional[float] = None,
    betas: Optional[Sequence[float]] = None,
    s_init: Optional[float] = None,
    eps: float = 1e-8,
    store_delta: Optional[bool] = None,
    log_func: Optional[Callable[[Dict[str, Any]], Any]] = None,
    log_every: int = 0,
    *,
    variant: str = "paper",
    backend: str = "auto",
    compile: bool = False,
    ref_dtype: Optional[str] = None,
    skip_nonfinite: bool = False,
    lr_invariant: Optional[bool] = None,
    keep_workspace: Optional[bool] = None,
    partition_group: Any = None,
) -> Any:
    """Wrap a torch optimizer in the Mechanic learning-rate tuner.

    ``mechanize(torch.optim.AdamW)`` returns a subclass of AdamW (and of `Mechanic`) used exactly like
    AdamW: ``opt = mechanize(torch.optim.AdamW)(model.parameters(), lr=1e-3)``. Every step runs the base
    optimizer, then rescales its update by a learned scale S: the parameters become
    ``x_ref + S * Delta``, where ``x_ref`` are the parameters at the first step and ``Delta`` the sum of
    the base's updates. The effective learning rate of a group is ``S * group["lr"]``
    (`mechanic_scale`). Given an optimizer instance instead of a class (also inside accelerate's,
    Lightning's or ZeroRedundancyOptimizer's wrapper), it is mechanized in place, keeps its state, and
    is returned.

    Args:
        Base: a ``torch.optim.Optimizer`` subclass, or an optimizer instance.
        s_decay: lambda in the paper, the weight of the ``lambda * S * ||g|| / ||x|| * x`` term that
            Mechanic adds to the gradient in its inner product; 0 turns it off. None: 0.01, the paper's.
            In the lr-invariant mode S there is measured against the tuner's own choice (S = 1), so that
            lambda is dimensionless, the same for every base and lr.
        betas: Mechanic's own betas: one tuner per value, each with its own discount, and S is the sum of
            their scales. None: the paper's 6 values ``1 - 10**-i`` (i = 1..6) with
            ``lr_invariant=False`` and for mechanic_pytorch, the 4 slow ones (0.999..0.999999) in the
            lr-invariant mode; a checkpoint's betas are kept when it is loaded. These are
            not the base optimizer's betas: Adam's ``(beta1, beta2)`` go to the base,
            ``mechanize(AdamW)(params, betas=(0.9, 0.999))``.
        s_init: S of the first update (None: 1e-6 for the paper variant, 1e-8 for mechanic_pytorch). In
            the lr-invariant mode, the first effective lr at the reference lr (None: 1e-2 of the base's
            usual lr: 1e-5 for Adam-like bases, 1e-3 for SGD).
        eps: floor of the tuner's divisions.
        store_delta: keep Delta as state (True, the default; float32/float64 parameters then keep no
            x_ref: one copy of the weights in all) or keep x_ref and recompute Delta as (x - x_ref) / S
            (False: also one copy, but in float32 Delta can be lost to rounding while S is small, and
            then S never grows; bfloat16/float16 parameters are refused). bfloat16/float16 parameters
            keep x_ref and Delta.
        log_func, log_every: call ``log_func({"iter_count": int, "s": float, "effective_lr": float})``
            every ``log_every`` steps (default: the ``mechanic_fast`` logger): "s" is S as
            ``mechanic_scale`` reads it, "effective_lr" S times group 0's lr. Only logging steps sync
            with the host.
        variant: ``"paper"`` (the math of optax.contrib.mechanize) or ``"mechanic_pytorch"`` (that of
            the mechanic-pytorch package, to float rounding).
        backend: ``"foreach"`` (torch multi-tensor ops), ``"triton"`` (Triton kernels; raises where they
            cannot run) or ``"auto"`` (Triton on CUDA when it imports, else foreach).
        compile: compile the whole mechanized step, base step included, with ``torch.compile`` (what
            ``torch.compile(opt.step)`` does, for a loop that is not compiled itself).
        ref_dtype: ``"float32"`` keeps x_ref and Delta in float32 for bfloat16/float16 parameters.
        skip_nonfinite: skip (and count in ``opt.mechanic_skipped_steps``) a step whose gradients hold
            NaN/Inf, at the cost of one host sync per step.
        lr_invariant: measure the scale in units of a reference lr (group 0's lr when the tuner is
            made), so that multiplying every lr by a constant changes nothing for a base whose update is
            proportional to lr: the same effective lr and parameters at every step. None (the default):
            on for the paper variant, with the base's usual lr as the reference where group 0's is 0
            (a warmup's first lr), and a checkpoint's mode is kept when it is loaded; True refuses an lr
            of 0; False is the paper's math as optax has it (S in units of whatever lr is given). In
            this mode a base whose update is proportional to its lr (torch's SGD and Adam families,
            RMSprop, Adadelta, Muon) takes its step at its lrs times a power of two, put back after the
            step, so that a small base lr does not leave its update to the rounding of the weights.
        keep_workspace: keep the step's weight-sized flat buffer (the x_t copy) from step to step
            (None: on CPU, where a fresh one is page-faulted in at every step; not on accelerators,
            whose caching allocator lends the freed buffer to activations between steps).
        partition_group: a process group over which this optimizer's parameters are disjoint parts of one
            model (pipeline stages, a hand-made partition): the sums are added over it. DDP, FSDP1/2,
            tensor/sequence parallel and ZeroRedundancyOptimizer are recognised without it.

    Returns:
        The mechanized class, or the given instance, mechanized.

    Raises:
        TypeError: ``Base`` is not an optimizer, is mechanized already, or cannot be (LBFGS, SparseAdam).
        ValueError: an option is out of range.
    """
    options = {k: v for k, v in locals().items() if k not in ("Base", "log_func", "partition_group")}
    cfg = _checked_options(options, log_func)
    if partition_group is not None:
        _distributed.check_process_group(partition_group)
    if isinstance(Base, torch.optim.Optimizer) or isinstance(unwrap(Base), torch.optim.Optimizer):
        return mechanize_instance(Base, cfg, log_func, partition_group, mechanized_class)
    check_base(Base)
    return mechanized_class(Base, cfg, log_func, partition_group)


def _checked_options(options: Dict[str, Any], log_func: Any) -> MechanicConfig:
    """The options of `mechanize` as a validated config; warns about Adam-like betas."""
    cfg = MechanicConfig(**options)
    if log_func is not None and not callable(log_func):
        raise TypeError(f"log_func must be callable, got {log_func!r}")
    if cfg.betas is not None and len(cfg.betas) == 2 and cfg.betas[0] < cfg.betas[1]:
        warnings.warn(
            f"mechanize(betas={cfg.betas}) looks like an Adam (beta1, beta2) pair, but these are "
            "Mechanic's betas: one tuner per value, whose scales are summed (the paper has 6, 1 - 10^-i). "
            "Adam's betas go to the base optimizer: mechanize(torch.optim.AdamW)(params, betas=(0.9, "
            "0.999)). Keep these if two tuners are what you meant.",
            UserWarning,
            stacklevel=3,
        )
    return cfg


def mechanized_class(
    Base: type, cfg: MechanicConfig, log_func: Optional[Callable[..., Any]], partition_group: Any = None
) -> type:
    """The mechanized subclass of `Base`, one per (base, options, log_func, partition group): an optimizer,
    its deepcopy and its unpickled copy share it. With the default options, a torch.optim base's is
    the named class `mechanic_fast.optim.<Name>`."""
    cfg = cfg.for_base(Base)
    if log_func is None and partition_group is None and _named.nameable(Base) and cfg == _default(Base):
        return named_class(Base)
    key = (Base, cfg, log_func, partition_group)
    cls = _CLASSES.get(key)
    if cls is None:
        cls = _CLASSES[key] = type(
            f"Mechanized{Base.__name__}",
            (Mechanic, Base),
            {
                "_mechanic_spec": _spec(Base, cfg, log_func, partition_group),
                "__qualname__": f"Mechanized{Base.__name__}",
                "__module__": Mechanic.__module__,
            },
        )
    return cls


def _spec(
    Base: type,
    cfg: MechanicConfig,
    log_func: Optional[Callable[..., Any]],
    partition_group: Any,
    named: bool = False,
) -> MechanicSpec:
    """What a mechanized class is made from: its options and the base's own step."""
    # the base's own step, resolved once per class: without torch's step-hook wrapper (ours fires around
    # the mechanized step), and without `_use_grad_for_differentiable`, whose graph breaks would split a
    # compiled mechanized step in three (we apply its grad mode ourselves)
    base_step, sets_grad_mode = _torch.unwrapped_step(Base.step)
    return MechanicSpec(
        base=Base,
        config=cfg,
        log_func=log_func or _default_log_func,
        base_step=base_step,
        base_sets_grad_mode=sets_grad_mode,
        rebuild=rebuild,
        partition_group=None if partition_group is None else _distributed.GroupRef(partition_group),
        named=named,
    )


def _default_options() -> Dict[str, Any]:
    """`mechanize`'s defaults for the options a MechanicConfig holds."""
    return {
        name: p.default
        for name, p in _OPTION_PARAMETERS.items()
        if name not in ("log_func", "partition_group")
    }


def _default(Base: type) -> MechanicConfig:
    """The options `mechanize(Base)` settles with nothing given."""
    return MechanicConfig(**_default_options()).for_base(Base)


def named_class(Base: type) -> type:
    """`mechanic_fast.optim.<Name>`: what `mechanize(Base)` gives with the default options, whose
    options can also be given to its constructor (`_named`)."""
    cls = _NAMED.get(Base)
    if cls is None:
        spec = _spec(Base, _default(Base), None, None, named=True)
        hints = _option_hints()
        cls = _NAMED[Base] = _named.build(Base, spec, _OPTION_PARAMETERS, hints, _instance_options)
    return cls


def _option_hints() -> Dict[str, Any]:
    """The annotations of `mechanize`'s options (what LightningCLI's parser reads off a named class)."""
    try:
        return typing.get_type_hints(mechanize)
    except Exception:  # an annotation this Python cannot evaluate: left as written
        return {}


def _instance_options(Base: type, options: Dict[str, Any]) -> Dict[str, Any]:
    """A named class's spec fields for the Mechanic options given to its constructor, checked as
    `mechanize` checks them."""
    log_func = options.pop("log_func", None)
    partition_group = options.pop("partition_group", None)
    cfg = _checked_options({**_default_options(), **options}, log_func)
    if partition_group is not None:
        _distributed.check_process_group(partition_group)
    return {
        "config": cfg.for_base(Base),
        "log_func": log_func or _default_log_func,
        "partition_group": None if partition_group is None else _distributed.GroupRef(partition_group),
    }


def rebuild(
    base: type, cfg: MechanicConfig, log_func: Optional[Callable[..., Any]], named: Optional[type] = None
) -> Mechanic:
    """An empty instance of the mechanized class (pickle and deepcopy then set its state); a named class
    keeps its name, with the options its instance was made with."""
    if named is None:
        cls = mechanized_class(base, cfg, log_func)
        return cls.__new__(cls)
    instance = named.__new__(named)
    spec = dataclasses.replace(named._mechanic_spec, config=cfg, log_func=log_func or _default_log_func)
    instance._mechanic_spec = spec
    return instance


_OPTION_PARAMETERS = {
    name: param
    for name, param in inspect.signature(mechanize).parameters.items()
    if name not in ("Base", "args", "options")
}
