"""`mechanize`: wrap any torch optimizer in the Mechanic learning-rate tuner.

The class here only orchestrates and keeps state: the scalar math is `tuner`, the O(d) work is a backend
(`_foreach` or `_triton`, chosen in `_backend`). One step, with x_t the parameters before it:

1. `_mechanic_pre`: inner products over all parameters with a gradient (before the base step, so
   gradients need no copy), plus a copy of x_t; with DTensor parameters, one all-reduce of the sums;
2. the base optimizer's own step gives x_base;
3. `_mechanic_post`: (mechanic_pytorch only: the sums of its weight-decay term, which uses x_base) the tuner
   step, then x = x_ref + S * (Delta + x_base - x_t).

Nothing in a step reads a tensor's value on the host, except on logging steps and with skip_nonfinite.
"""

from __future__ import annotations

import logging
import warnings
from types import ModuleType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable

from . import _backend, _distributed, _foreach, tuner
from ._config import MechanicConfig

logger = logging.getLogger("mechanic_fast")

_STATE_KEY = "mechanic"
# per-parameter state of torch.optim optimizers that always has the parameter's shape
_PARAM_SHAPED_STATE = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "square_avg",
        "grad_avg",
        "sum",
        "acc_delta",
        "exp_inf",
        "ax",
        "prev",
        "step_size",
    }
)


class _Group(NamedTuple):
    """Aligned lists of local tensors on one device with one dtype, and the process groups (if any)
    over which their sums are partial."""

    params: List[Tensor]
    grads: List[Tensor]
    refs: List[Tensor]
    deltas: Optional[List[Tensor]]
    impl: ModuleType
    reduce_over: Tuple[Any, ...]


def _default_log_func(data: Dict[str, Any]) -> None:
    logger.info(f"(iter={data['iter_count']}), s_sum (global scaling): {data['s']}")


class Mechanic(torch.optim.Optimizer):
    """Mixin that turns a torch optimizer into its Mechanic-tuned version; built by `mechanize`."""

    _mechanic_config: MechanicConfig
    _mechanic_log_func: Callable[[Dict[str, Any]], Any]
    _mechanic_base_step_fn: Callable[..., Any]
    _mechanic_base_sets_grad_mode: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mechanic_reset()

    def _mechanic_reset(self) -> None:
        self._mechanic_reset_state()
        # GradScaler must unscale gradients before our inner products read them, so it may not hand the
        # scale to a fused base kernel that would unscale them only inside the base step.
        self._step_supports_amp_scaling = False

    # ----------------------------------------------------------------------------------------- state
    def _mechanic_reset_state(self) -> None:
        """Start Mechanic afresh: x_ref is taken from the parameters at the next step."""
        self._mechanic: Dict[str, Any] = {
            "tuner": None,  # TunerState, created at the first step on the parameters' device
            "const": None,  # betas on the device
            "count": None,  # steps taken, as a device tensor (no host int that compiled code would guard on)
            "x_ref": {},  # param -> reference point x_ref (x_0 in the paper)
            "delta": {},  # param -> Delta (only with store_delta=True)
        }
        self._mechanic_log_count = 0
        self._mechanic_compiled: Optional[Tuple[Callable[..., Any], Callable[..., Any]]] = None
        self._mechanic_acc_dtype = torch.float32
        self.mechanic_skipped_steps = 0  # steps skipped for non-finite gradients (skip_nonfinite=True)

    def _mechanic_params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _mechanic_device(self) -> torch.device:
        params = self._mechanic_params()
        return params[0].device if params else torch.device("cpu")

    def _mechanic_ref_dtype(self, p: Tensor) -> torch.dtype:
        low = p.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if self._mechanic_config.ref_dtype == "float32" and low else p.dtype

    def _mechanic_init_tuner(self, dtypes: set[torch.dtype]) -> None:
        cfg = self._mechanic_config
        device = self._mechanic_device()
        dtype = tuner.state_dtype(cfg, dtypes)
        self._mechanic["tuner"] = tuner.initial_state(cfg, device, dtype)
        self._mechanic["const"] = tuner.constants(cfg, device, dtype)
        self._mechanic["count"] = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def mechanic_scale(self) -> Tensor:
        """The current total scale S = sum(s), a 0-d float32 tensor on the parameters' device (no sync).

        The effective learning rate of a group is ``mechanic_scale * group["lr"]``.
        """
        state = self._mechanic["tuner"]
        if state is None:
            cfg = self._mechanic_config
            init = cfg.s_init * len(cfg.betas) if cfg.variant == "paper" else 0.0
            return torch.tensor(init, dtype=torch.float32, device=self._mechanic_device())
        return tuner.effective_scale(state, self._mechanic_config).to(torch.float32)

    # ------------------------------------------------------------------------------------------ step
    def _mechanic_gather(self) -> Tuple[List[Tensor], List[Tensor]]:
        """Parameters that have a gradient, and their gradients; refuses what Mechanic cannot handle
        before anything has changed."""
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        "Mechanic does not support sparse gradients (inner products over them are not "
                        "implemented); nothing was changed"
                    )
                if p.dtype.is_complex:
                    raise RuntimeError("Mechanic does not support complex parameters; nothing was changed")
                params.append(p)
                grads.append(g)
        return params, grads

    def _mechanic_base_step(self, closure: Optional[Callable[[], Any]], loss: Any) -> Any:
        """Run the base optimizer's own step, bypassing its step hooks (ours already fire around this)."""
        func = self._mechanic_base_step_fn
        if self._mechanic_base_sets_grad_mode:  # what torch's _use_grad_for_differentiable would do
            with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
                return self._mechanic_call_base(func, closure, loss)
        return self._mechanic_call_base(func, closure, loss)

    def _mechanic_call_base(
        self, func: Callable[..., Any], closure: Optional[Callable[[], Any]], loss: Any
    ) -> Any:
        if closure is None:
            return func(self)
        calls = 0

        # The closure was evaluated once already for Mechanic's inner products; hand that loss back on
        # the base's first call instead of doubling the gradients, and re-evaluate after.
        def closure_once() -> Any:
            nonlocal calls
            calls += 1
            return loss if calls == 1 else closure()

        return func(self, closure_once)

    def _mechanic_groups(self, params: List[Tensor], grads: List[Tensor]) -> List[_Group]:
        """Aligned lists of local tensors per reduction domain and device/dtype; creates x_ref (and
        Delta) for parameters seen for the first time."""
        cfg = self._mechanic_config
        state = self._mechanic
        new = [p for p in params if p not in state["x_ref"]]
        if new:  # x_ref = x_t on a parameter's first step (Delta = 0)
            state["x_ref"].update(_tiled({p: p.detach() for p in new}, self._mechanic_ref_dtype))
            if cfg.store_delta:
                zeros = {p: torch.zeros_like(state["x_ref"][p]) for p in new}
                state["delta"].update(_tiled(zeros, self._mechanic_ref_dtype))
        # Sharded (DTensor) parameters give partial sums, reduced over the mesh dims they are sharded on.
        domains: Dict[Tuple[Any, ...], List[int]] = {}
        for i, p in enumerate(params):
            domains.setdefault(_distributed.reduce_groups(p), []).append(i)
        groups = []
        for reduce_over, idx in domains.items():
            lists = [
                [_distributed.local(params[i]) for i in idx],
                [_distributed.local(grads[i]) for i in idx],
                [_distributed.local(state["x_ref"][params[i]]) for i in idx],
            ]
            if cfg.store_delta:
                lists.append([_distributed.local(state["delta"][params[i]]) for i in idx])
            for _, (grouped, _) in self._group_tensors_by_device_and_dtype(lists).items():
                impl = _backend.select(cfg.backend, grouped[0][0].device)
                deltas = grouped[3] if cfg.store_delta else None
                groups.append(_Group(grouped[0], grouped[1], grouped[2], deltas, impl, reduce_over))
        return groups

    def _mechanic_total(self, parts: List[Tuple[Tensor, Tuple[Any, ...]]]) -> Tensor:
        """Sum per-group sums on the tuner's device: one all-reduce per reduction domain (one in all for
        FSDP2), never one per tensor."""
        device = self._mechanic["tuner"].s.device
        by_domain: Dict[Tuple[Any, ...], List[Tensor]] = {}
        for sums, reduce_over in parts:
            by_domain.setdefault(reduce_over, []).append(sums.to(device, non_blocking=True))
        totals = []
        for reduce_over, sums_list in by_domain.items():
            total = torch.stack(sums_list).sum(0) if len(sums_list) > 1 else sums_list[0]
            totals.append(_distributed.all_reduce(total, reduce_over))
        return torch.stack(totals).sum(0) if len(totals) > 1 else totals[0]

    def _mechanic_pre(self, groups: List[_Group]) -> Tuple[Tensor, List[Any]]:
        """Inner products over every parameter with a gradient, and the x_t copies (before the base step,
        so gradients need no copy)."""
        cfg = self._mechanic_config
        parts, copies = [], []
        for grp in groups:
            sums, copy = grp.impl.inner_products(
                grp.deltas if cfg.store_delta else grp.params,
                None if cfg.store_delta else grp.refs,
                grp.grads,
                grp.params,
                acc_dtype=self._mechanic_acc_dtype,
                x_sums=cfg.variant == "paper",  # mechanic_pytorch uses x after the base step
                copy_x=True,
            )
            parts.append((sums, grp.reduce_over))
            copies.append(copy)
        return self._mechanic_total(parts), copies

    def _mechanic_post(self, groups: List[_Group], copies: List[Any], sums: Tensor) -> None:
        """The tuner step and x = x_ref + S_new * (Delta + u), after the base step gave x_base."""
        cfg = self._mechanic_config
        state = self._mechanic
        if cfg.variant == "mechanic_pytorch":  # its weight-decay term uses x after the base step
            parts = []
            for grp, copy in zip(groups, copies):
                post, _ = grp.impl.inner_products(
                    grp.deltas if cfg.store_delta else copy,
                    None if cfg.store_delta else grp.refs,
                    None,
                    grp.params,
                    acc_dtype=self._mechanic_acc_dtype,
                )
                parts.append((post, grp.reduce_over))
            sums = sums + self._mechanic_total(parts)
        old = state["tuner"]
        new, scale, denom = tuner.step(old, sums, state["const"], cfg)
        for grp, copy in zip(groups, copies):
            device = grp.params[0].device
            grp.impl.apply_update(
                grp.params,
                copy,
                grp.refs,
                grp.deltas,
                scale.to(device, non_blocking=True),
                denom.to(device, non_blocking=True),
            )
        # Commit in place (stable addresses for CUDA graphs). Not one _foreach_copy_: inductor (torch
        # 2.13) fuses it so that r_new reads the already-overwritten s; see test_compile.py.
        for buf, value in zip(old, new):
            buf.copy_(value)
        state["count"].add_(1)

    def _mechanic_fns(self) -> Tuple[Callable[..., Any], Callable[..., Any]]:
        if not self._mechanic_config.compile:
            return self._mechanic_pre, self._mechanic_post
        if self._mechanic_compiled is None:  # compiled lazily, once per optimizer
            self._mechanic_compiled = (
                torch.compile(self._mechanic_pre, fullgraph=True),
                torch.compile(self._mechanic_post, fullgraph=True),
            )
        return self._mechanic_compiled

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One mechanized step. Returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cfg = self._mechanic_config
        params, grads = self._mechanic_gather()
        if not params:
            return self._mechanic_base_step(closure, loss)

        state = self._mechanic
        fresh_tuner = state["tuner"] is None
        known = set(state["x_ref"]) if cfg.skip_nonfinite else None
        if fresh_tuner:
            dtypes = {p.dtype for p in params}
            self._mechanic_init_tuner(dtypes)
            if not cfg.store_delta and dtypes & {torch.float16, torch.bfloat16}:
                warnings.warn(
                    "Mechanic on float16/bfloat16 parameters needs store_delta=True: recomputing Delta "
                    "as (x - x_ref) / S loses it while S * Delta is below the parameters' resolution, "
                    "and the scale then cannot grow. Add ref_dtype='float32' to keep x_ref and Delta "
                    "in float32.",
                    stacklevel=2,
                )
        self._mechanic_acc_dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        )
        pre, post = self._mechanic_fns()
        with torch.no_grad():
            groups = self._mechanic_groups(params, grads)
            sums, copies = pre(groups)
            # Opt-in: the one host sync per step. Non-finite gradients make ||g||^2 or <d, g> non-finite.
            if cfg.skip_nonfinite and not bool(torch.isfinite(sums).all()):
                self._mechanic_undo_new(known, fresh_tuner)
                self.mechanic_skipped_steps += 1
                return loss

        result = self._mechanic_base_step(closure, loss)
        with torch.no_grad():
            post(groups, copies, sums)

        if cfg.log_every > 0:
            self._mechanic_log()
        return loss if closure is not None else result

    def _mechanic_undo_new(self, known: set[Tensor], fresh_tuner: bool) -> None:
        """Forget what a skipped step created, so that it leaves no trace."""
        state = self._mechanic
        for p in [p for p in state["x_ref"] if p not in known]:
            del state["x_ref"][p]
            state["delta"].pop(p, None)
        if fresh_tuner:
            state.update(tuner=None, const=None, count=None)

    @torch._dynamo.disable
    def _mechanic_log(self) -> None:
        """Logging steps are the only ones that read a value on the host. Steps are counted on the host
        only when logging is on (a host counter in compiled code would be guarded on and recompiled)."""
        self._mechanic_log_count += 1
        if self._mechanic_log_count % self._mechanic_config.log_every == 0:
            scale = self._mechanic["tuner"].s.sum().item()
            self._mechanic_log_func({"iter_count": self._mechanic_log_count, "s": scale})

    # ----------------------------------------------------------------------------------- checkpoints
    def _mechanic_param_index(self) -> Dict[int, Tensor]:
        """Index -> parameter, numbered as `Optimizer.state_dict` numbers them."""
        index: Dict[int, Tensor] = {}
        seen = set()
        for p in self._mechanic_params():
            if id(p) not in seen:
                seen.add(id(p))
                index[len(index)] = p
        return index

    def _mechanic_state_dict(self) -> Dict[str, Any]:
        cfg = self._mechanic_config
        state = self._mechanic
        pos = {id(p): i for i, p in self._mechanic_param_index().items()}
        out: Dict[str, Any] = {
            "variant": cfg.variant,
            "betas": tuple(cfg.betas),
            "store_delta": cfg.store_delta,
            "x_ref": {pos[id(p)]: t for p, t in state["x_ref"].items()},
            "delta": {pos[id(p)]: t for p, t in state["delta"].items()},
        }
        if state["tuner"] is not None:
            out.update(state["tuner"]._asdict())
            out["count"] = state["count"]
        return out

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd[_STATE_KEY] = self._mechanic_state_dict()
        return sd

    def _mechanic_parse(self, saved: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
        """Validate a saved Mechanic state against this optimizer and build it on the parameters' devices,
        without touching the live state."""
        cfg = self._mechanic_config
        for key, mine in (
            ("variant", cfg.variant),
            ("betas", tuple(cfg.betas)),
            ("store_delta", cfg.store_delta),
        ):
            theirs = saved.get(key)
            if key == "betas" and theirs is not None:
                theirs = tuple(float(b) for b in theirs)
            if theirs != mine:
                raise ValueError(
                    f"checkpoint was saved with Mechanic {key}={theirs!r}, this optimizer has {mine!r}"
                )
        index = self._mechanic_param_index()
        fresh: Dict[str, Any] = {"x_ref": {}, "delta": {}}
        for key in ("x_ref", "delta"):
            for i, t in sorted(saved.get(key, {}).items()):
                p = index.get(int(i))
                if p is None:
                    raise ValueError(
                        f"checkpoint has Mechanic {key} for parameter {i}, but this optimizer has only "
                        f"{len(index)} parameters"
                    )
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"checkpoint's Mechanic {key} for parameter {i} has shape {tuple(t.shape)}, "
                        f"the parameter has shape {tuple(p.shape)}"
                    )
                fresh[key][p] = t.detach().to(device=p.device)
            fresh[key] = _tiled(fresh[key], self._mechanic_ref_dtype)
        if "s" in saved:
            device = self._mechanic_device()
            dtype = saved["s"].dtype
            n = len(cfg.betas)
            for name in tuner.TunerState._fields:
                if tuple(saved[name].shape) != (n,):
                    raise ValueError(
                        f"checkpoint's Mechanic {name} has shape {tuple(saved[name].shape)}, expected ({n},)"
                    )
            fresh["tuner"] = tuner.TunerState(
                *(saved[name].to(device=device, dtype=dtype, copy=True) for name in tuner.TunerState._fields)
            )
            fresh["const"] = tuner.constants(cfg, device, dtype)
            fresh["count"] = saved["count"].to(device=device, copy=True)
        else:
            fresh.update(tuner=None, const=None, count=None)
        # the step count (a sync, fine at load time) also numbers the log lines of the resumed run
        return fresh, int(saved["count"].item()) if "count" in saved else 0

    def _mechanic_check_base_state(self, base_sd: Dict[str, Any]) -> None:
        """Refuse a base checkpoint of another model before torch would load it: per-parameter state
        tensors of torch's optimizers that have the parameter's shape must have this parameter's shape."""
        index = self._mechanic_param_index()
        groups = base_sd.get("param_groups", [])
        if sum(len(g["params"]) for g in groups) != len(index):
            raise ValueError(
                f"checkpoint holds {sum(len(g['params']) for g in groups)} parameters, "
                f"this optimizer has {len(index)}"
            )
        for i, per_param in base_sd.get("state", {}).items():
            p = index.get(int(i))
            if p is None:
                raise ValueError(f"checkpoint has state for parameter {i}, this optimizer has {len(index)}")
            for key, value in per_param.items():
                if key in _PARAM_SHAPED_STATE and torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(
                        f"checkpoint's {key} for parameter {i} has shape {tuple(value.shape)}, "
                        f"the parameter has shape {tuple(p.shape)}"
                    )

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a mechanized checkpoint, or a plain base-optimizer one (Mechanic then starts afresh from
        the current parameters). Everything is validated before anything is overwritten."""
        base_sd = dict(state_dict)
        saved = base_sd.pop(_STATE_KEY, None)
        parsed = self._mechanic_parse(saved) if saved is not None else None
        self._mechanic_check_base_state(base_sd)
        super().load_state_dict(base_sd)
        if parsed is None:
            self._mechanic_reset_state()
        else:
            self._mechanic, self._mechanic_log_count = parsed


def _tiled(values: Dict[Tensor, Tensor], dtype_of: Callable[[Tensor], torch.dtype]) -> Dict[Tensor, Tensor]:
    """Copies of `values` (param -> tensor, in dtype_of(param)), laid out per device and dtype as views
    tiling one flat buffer, which the foreach backend reads and updates as one tensor."""
    out: Dict[Tensor, Tensor] = {}
    buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for p, v in values.items():
        if _distributed.is_dtensor(v) or not v.is_contiguous():
            out[p] = v.to(dtype=dtype_of(p), copy=True)
        else:
            buckets.setdefault((v.device, dtype_of(p)), []).append(p)
    for (_, dtype), params in buckets.items():
        out.update(zip(params, _foreach.flat_clones([values[p] for p in params], dtype)))
    return out


def _mechanize_instance(
    opt: torch.optim.Optimizer, cfg: MechanicConfig, log_func: Optional[Callable[[Dict[str, Any]], Any]]
) -> torch.optim.Optimizer:
    """Mechanize an existing optimizer in place, keeping its state: Mechanic starts from the current
    parameters at the next step."""
    if is_mechanized(opt):
        raise TypeError(f"{type(opt).__name__} is already mechanized")
    kwargs = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    opt.__class__ = mechanize(type(opt), log_func=log_func, **kwargs)
    opt._mechanic_reset()  # type: ignore[attr-defined]
    opt._patch_step_function()  # so step hooks wrap the mechanized step
    return opt


# torch's `_use_grad_for_differentiable` wrapper, recognised by its code object.
_USE_GRAD_CODE = _use_grad_for_differentiable(lambda self: None).__code__


def _unwrapped(step: Callable[..., Any]) -> Tuple[Callable[..., Any], bool]:
    """The base's own step, resolved once per class: without torch's step-hook wrapper (ours fires
    around the mechanized step), and without `_use_grad_for_differentiable`, whose graph breaks would
    split a compiled mechanized step in three; we apply its grad mode ourselves (second value True)."""
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    if getattr(step, "__code__", None) is _USE_GRAD_CODE:
        return step.__wrapped__, True
    return step, False


def is_mechanized(opt: Any) -> bool:
    return isinstance(opt, Mechanic)


def mechanize(
    Base: Any,
    s_decay: float = 0.01,
    betas: Sequence[float] = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999),
    s_init: Optional[float] = None,
    eps: float = 1e-8,
    store_delta: bool = False,
    log_func: Optional[Callable[[Dict[str, Any]], Any]] = None,
    log_every: int = 0,
    *,
    variant: str = "paper",
    backend: str = "auto",
    compile: bool = False,
    ref_dtype: Optional[str] = None,
    skip_nonfinite: bool = False,
) -> Any:
    """Return a subclass of ``Base`` (a ``torch.optim.Optimizer`` subclass) and of `Mechanic`.

    ``optimizer = mechanize(torch.optim.AdamW)(model.parameters(), lr=1e-3)``; see the README for
    every option.
    """
    cfg = MechanicConfig(
        s_decay=s_decay,
        betas=tuple(betas) if not isinstance(betas, (str, bytes)) else betas,  # type: ignore[arg-type]
        s_init=s_init,
        eps=eps,
        store_delta=store_delta,
        log_every=log_every,
        variant=variant,
        backend=backend,
        compile=compile,
        ref_dtype=ref_dtype,
        skip_nonfinite=skip_nonfinite,
    )
    if log_func is not None and not callable(log_func):
        raise TypeError(f"log_func must be callable, got {log_func!r}")
    if isinstance(Base, torch.optim.Optimizer):
        return _mechanize_instance(Base, cfg, log_func)
    if not (isinstance(Base, type) and issubclass(Base, torch.optim.Optimizer)):
        raise TypeError(f"mechanize expects a torch.optim.Optimizer subclass (or instance), got {Base!r}")
    if issubclass(Base, Mechanic):
        raise TypeError(f"{Base.__name__} is already mechanized")
    base_step, sets_grad_mode = _unwrapped(Base.step)
    return type(
        f"Mechanized{Base.__name__}",
        (Mechanic, Base),
        {
            "_mechanic_config": cfg,
            "_mechanic_log_func": staticmethod(log_func or _default_log_func),
            "_mechanic_base_step_fn": staticmethod(base_step),
            "_mechanic_base_sets_grad_mode": sets_grad_mode,
            "__qualname__": f"Mechanized{Base.__name__}",
        },
    )
