"""`mechanize`: wrap any torch optimizer in the Mechanic learning-rate tuner.

The class here only orchestrates and keeps state: the scalar math is `tuner`, the O(d) work is a backend
(`_foreach` or `_triton`, chosen in `_backend`). One step, with x_t the parameters before it:

1. inner products over all parameters with a gradient (before the base step, so gradients need no copy),
   plus a copy of x_t;
2. the paper variant updates the tuner here (h only needs g, x_t, x_ref);
3. the base optimizer's own step gives x_base;
4. the mechanic_pytorch variant needs x_base for its weight-decay term, so its tuner update comes here;
5. x = x_ref + S * (Delta + x_base - x_t).

Nothing in a step reads a tensor's value on the host, except on logging steps.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backend, tuner
from ._config import MechanicConfig

logger = logging.getLogger("mechanic_fast")

_STATE_KEY = "mechanic"


def _default_log_func(data: Dict[str, Any]) -> None:
    logger.info(f"(iter={data['iter_count']}), s_sum (global scaling): {data['s']}")


class Mechanic(torch.optim.Optimizer):
    """Mixin that turns a torch optimizer into its Mechanic-tuned version; built by `mechanize`."""

    _mechanic_config: MechanicConfig
    _mechanic_log_func: Callable[[Dict[str, Any]], Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mechanic_reset()

    # ----------------------------------------------------------------------------------------- state
    def _mechanic_reset(self) -> None:
        """Start Mechanic afresh: x_ref is taken from the parameters at the next step."""
        self._mechanic: Dict[str, Any] = {
            "tuner": None,  # TunerState, created at the first step on the parameters' device
            "const": None,  # betas on the device
            "count": None,  # steps taken, as a device tensor (no host int that compiled code would guard on)
            "x_ref": {},  # param -> reference point x_ref (x_0 in the paper)
            "delta": {},  # param -> Delta (only with store_delta=True)
        }
        self._mechanic_log_count = 0

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
        func = super().step.__func__  # type: ignore[attr-defined]
        if getattr(func, "hooked", False):
            func = func.__wrapped__
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
        new_refs = [p for p in params if p not in state["x_ref"]]
        if state["tuner"] is None:
            self._mechanic_init_tuner({p.dtype for p in params})
        if new_refs:  # x_ref = x_t on a parameter's first step (Delta = 0)
            with torch.no_grad():
                for p in new_refs:
                    state["x_ref"][p] = p.detach().to(self._mechanic_ref_dtype(p), copy=True)
                    if cfg.store_delta:
                        state["delta"][p] = torch.zeros_like(state["x_ref"][p])

        refs = [state["x_ref"][p] for p in params]
        deltas = [state["delta"][p] for p in params] if cfg.store_delta else None
        acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        groups = self._group_tensors_by_device_and_dtype(
            [params, grads, refs] + ([deltas] if deltas is not None else [])
        )
        device = state["tuner"].s.device

        with torch.no_grad():
            # 1. inner products and the x_t copy, per device/dtype group
            pre_sums = []
            copies = []
            for (_, _), (lists, _) in groups.items():
                p, g, r = lists[0], lists[1], lists[2]
                d = lists[3] if deltas is not None else None
                impl = _backend.select(cfg.backend, p[0].device)
                sums, copy = impl.inner_products(
                    d if d is not None else p,
                    None if d is not None else r,
                    g,
                    p,
                    acc_dtype=acc_dtype,
                    x_sums=cfg.variant == "paper",
                    copy_x=True,
                )
                pre_sums.append(sums.to(device, non_blocking=True))
                copies.append(copy)
            sums = torch.stack(pre_sums).sum(0) if len(pre_sums) > 1 else pre_sums[0]
            old = state["tuner"]
            # 2. paper: the tuner needs only g, x_t and x_ref
            if cfg.variant == "paper":
                new, scale, denom = tuner.step(old, sums, state["const"], cfg)

        # 3. the base optimizer
        result = self._mechanic_base_step(closure, loss)

        with torch.no_grad():
            # 4. mechanic_pytorch: its weight-decay term uses the parameters after the base step
            if cfg.variant == "mechanic_pytorch":
                post_sums = []
                for ((_, _), (lists, _)), copy in zip(groups.items(), copies):
                    p, r = lists[0], lists[2]
                    d = lists[3] if deltas is not None else None
                    impl = _backend.select(cfg.backend, p[0].device)
                    s_post, _ = impl.inner_products(
                        d if d is not None else copy,
                        None if d is not None else r,
                        None,
                        p,
                        acc_dtype=acc_dtype,
                    )
                    post_sums.append(s_post.to(device, non_blocking=True))
                sums = sums + (torch.stack(post_sums).sum(0) if len(post_sums) > 1 else post_sums[0])
                new, scale, denom = tuner.step(old, sums, state["const"], cfg)

            # 5. x = x_ref + S_new * (Delta + u)
            for ((_, _), (lists, _)), copy in zip(groups.items(), copies):
                p, r = lists[0], lists[2]
                d = lists[3] if deltas is not None else None
                impl = _backend.select(cfg.backend, p[0].device)
                dev = p[0].device
                impl.apply_update(
                    p, copy, r, d, scale.to(dev, non_blocking=True), denom.to(dev, non_blocking=True)
                )
            torch._foreach_copy_(list(old), list(new))
            state["count"].add_(1)

        if cfg.log_every > 0:
            self._mechanic_log()
        return loss if closure is not None else result

    @torch._dynamo.disable
    def _mechanic_log(self) -> None:
        """Logging steps are the only ones that read a value on the host."""
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
            "iter_count": self._mechanic_log_count,
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
            for i, t in saved.get(key, {}).items():
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
                fresh[key][p] = t.detach().to(device=p.device, dtype=self._mechanic_ref_dtype(p), copy=True)
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
        return fresh, int(saved.get("iter_count", 0))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a mechanized checkpoint, or a plain base-optimizer one (Mechanic then starts afresh from
        the current parameters). Everything is validated before anything is overwritten."""
        base_sd = dict(state_dict)
        saved = base_sd.pop(_STATE_KEY, None)
        parsed = self._mechanic_parse(saved) if saved is not None else None
        super().load_state_dict(base_sd)
        if parsed is None:
            self._mechanic_reset()
        else:
            self._mechanic, self._mechanic_log_count = parsed


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
    if not (isinstance(Base, type) and issubclass(Base, torch.optim.Optimizer)):
        raise TypeError(f"mechanize expects a torch.optim.Optimizer subclass, got {Base!r}")
    return type(
        f"Mechanized{Base.__name__}",
        (Mechanic, Base),
        {
            "_mechanic_config": cfg,
            "_mechanic_log_func": staticmethod(log_func or _default_log_func),
            "__qualname__": f"Mechanized{Base.__name__}",
        },
    )
