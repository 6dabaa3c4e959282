"""Reading a checkpoint into a mechanized optimizer: `load` validates it completely and builds the
new Mechanic state aside (`parse`), so that a refused checkpoint leaves the optimizer as it was.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _state, tuner
from ._config import MechanicConfig


def load(opt: Any, state_dict: Dict[str, Any], torch_load: Callable[[Dict[str, Any]], None]) -> None:
    """`opt.load_state_dict(state_dict)` with torch's contract: load-state-dict pre-hooks run first and
    may replace the checkpoint, post hooks see the loaded optimizer. In between, everything is validated
    before anything changes (`parse`), torch's own loading (`torch_load`, without its hooks) takes the
    base's part, and Mechanic's tensors keep their dtypes (torch would cast x_ref to the parameter's)."""
    state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        replaced = pre_hook(opt, state_dict)
        if replaced is not None:
            state_dict = replaced
    cfg = opt._mechanic_config
    torch_base = opt._mechanic_base_class.__module__.startswith("torch.optim")
    base_sd, per_param, entry = parse(opt, cfg, state_dict, opt._mechanic_ref_dtype, torch_base)
    pre_hooks, post_hooks = (
        opt._optimizer_load_state_dict_pre_hooks,
        opt._optimizer_load_state_dict_post_hooks,
    )
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        torch_load(base_sd)
    finally:
        opt._optimizer_load_state_dict_pre_hooks = pre_hooks
        opt._optimizer_load_state_dict_post_hooks = post_hooks
    for p, tensors in per_param.items():
        opt.state[p].update(tensors)
    if entry is not None:
        opt.param_groups[0][_state.TUNER_KEY] = entry
    opt._mechanic_tuner()  # a plain base checkpoint: the tuner starts afresh
    opt._mechanic_attach()  # host caches anew
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def parse(
    opt: torch.optim.Optimizer,
    cfg: MechanicConfig,
    state_dict: Dict[str, Any],
    dtype_of: Callable[[Tensor], torch.dtype],
    torch_base: bool,
) -> Tuple[Dict[str, Any], Dict[Tensor, Dict[str, Tensor]], Optional[Dict[str, Any]]]:
    """Validate `state_dict` against `opt` and split it into (what torch's own `load_state_dict` should
    load, Mechanic's per-parameter tensors ready to install, the tuner entry or None).

    Accepted: our layout, and a plain base-optimizer checkpoint (Mechanic then starts afresh). Parameter
    ids are matched as torch matches them (in order, whatever they are); non-parameter keys of `state`
    pass through as in torch.
    Raises ValueError naming the problem; nothing of `opt` is touched.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: expected the keys 'state' and 'param_groups'")
    sd = dict(state_dict)
    groups = [dict(g) for g in sd["param_groups"]]
    state = dict(sd["state"])
    if _state.MECHANIC_PYTORCH_KEY in state:
        raise ValueError(
            "this is a mechanic-pytorch checkpoint (its state sits under state['_mechanic'], keyed by "
            "parameter objects that do not survive saving); it cannot be loaded. Load the base "
            "optimizer's state alone, or start from the saved model weights."
        )
    id_map = _id_map(opt, groups)
    entry = groups[0].pop(_state.TUNER_KEY, None) if groups else None
    per_param: Dict[Tensor, Dict[str, Tensor]] = {}
    for key, value in list(state.items()):
        param = id_map.get(key)
        if param is None or not isinstance(value, dict):
            continue  # not a parameter's state: torch keeps it as it is
        ours = {k: value[k] for k in (_state.X_REF, _state.DELTA) if k in value}
        state[key] = {k: v for k, v in value.items() if k not in (_state.X_REF, _state.DELTA)}
        if ours:
            per_param[param] = ours
        _check_base_state(opt, key, param, state[key], torch_base)
    tuner_entry, fresh = _mechanic_part(opt, cfg, entry, per_param, state, id_map, dtype_of)
    sd["state"], sd["param_groups"] = state, groups
    return sd, fresh, tuner_entry


def _mechanic_part(
    opt: torch.optim.Optimizer,
    cfg: MechanicConfig,
    entry: Any,
    per_param: Dict[Tensor, Dict[str, Tensor]],
    state: Dict[Any, Any],
    id_map: Dict[Any, Tensor],
    dtype_of: Callable[[Tensor], torch.dtype],
) -> Tuple[Optional[Dict[str, Any]], Dict[Tensor, Dict[str, Tensor]]]:
    """The checkpoint's tuner entry (or None) and per-parameter state, checked and laid out as kept."""
    tuner_entry = None
    if entry is not None:
        tuner_entry = _parse_tuner(opt, cfg, entry, id_map)
        auto = cfg.store_delta is None
        cfg = dataclasses.replace(cfg, store_delta=tuner_entry["store_delta"])
        _check_per_param(cfg, per_param, state, id_map, int(tuner_entry["step"]))
        narrowed = any(
            v[_state.X_REF].dtype == torch.float64 and dtype_of(p) != torch.float64
            for p, v in per_param.items()
        )
        if auto and not cfg.store_delta and narrowed:
            # A float64 run (the default recomputes Delta there) resumed in lower precision: keep Delta
            # from now on, or the rounding stall that the default exists to prevent comes back. (A
            # layout chosen explicitly in the same precision is kept as it is.)
            _recompute_delta(per_param, tuner_entry, cfg, dtype_of)
            cfg = dataclasses.replace(cfg, store_delta=True)
    elif per_param:
        raise ValueError(
            "checkpoint has Mechanic's x_ref but no tuner (param_groups[0]['mechanic'] is missing)"
        )
    if tuner_entry is None:
        return None, {}
    x_refs = {p: v[_state.X_REF] for p, v in per_param.items()}
    deltas = {p: v[_state.DELTA] for p, v in per_param.items()} if cfg.store_delta else None
    return tuner_entry, _state.laid_out(x_refs, deltas, dtype_of)


def _id_map(opt: torch.optim.Optimizer, saved_groups: List[Dict[str, Any]]) -> Dict[Any, Tensor]:
    """Saved id -> parameter, as torch's `load_state_dict` pairs them (ids are just ids)."""
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} parameter groups, this optimizer has {len(opt.param_groups)}"
        )
    id_map: Dict[Any, Tensor] = {}
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"checkpoint's parameter group {i} holds {len(saved['params'])} parameters, "
                f"this optimizer's holds {len(group['params'])}"
            )
        id_map.update(zip(saved["params"], group["params"]))
    return id_map


def _parse_tuner(
    opt: torch.optim.Optimizer, cfg: MechanicConfig, entry: Any, id_map: Dict[Any, Tensor]
) -> Dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"checkpoint's param_groups[0]['mechanic'] is not a dict: {type(entry).__name__}")
    options = _state.options(cfg)
    if cfg.store_delta is None:  # left to us: the checkpoint's layout, whichever it is
        theirs = entry.get("store_delta")
        if not isinstance(theirs, bool):
            raise ValueError(f"checkpoint's Mechanic store_delta is not a bool: {theirs!r}")
        options["store_delta"] = theirs
    for key, mine in options.items():
        theirs = entry.get(key)
        if key == "betas" and isinstance(theirs, (list, tuple)):
            theirs = tuple(float(b) for b in theirs)
        if theirs != mine:
            raise ValueError(
                f"checkpoint was saved with Mechanic {key}={theirs!r}, this optimizer has {mine!r}"
            )
    if entry.get("lr_invariant", False) != cfg.lr_invariant:
        raise ValueError(
            f"checkpoint was saved with Mechanic lr_invariant={entry.get('lr_invariant', False)!r}, "
            f"this optimizer has {cfg.lr_invariant!r}"
        )
    params = list(id_map.values())
    device = params[0].device if params else torch.device("cpu")
    dtype = tuner.state_dtype(cfg, {p.dtype for p in params})
    n = len(cfg.betas)
    out: Dict[str, Any] = {}
    if cfg.lr_invariant:
        out["lr_ref"] = _state.reference_lr(entry.get("lr_ref"))
    for name in tuner.TunerState._fields:
        value = entry.get(name)
        if not torch.is_tensor(value):
            raise ValueError(f"checkpoint's Mechanic tuner has no tensor {name!r}")
        if value.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"checkpoint's Mechanic {name} is {value.dtype}; the tuner is kept in float32 or float64"
            )
        if tuple(value.shape) != (n,):
            raise ValueError(f"checkpoint's Mechanic {name} has shape {tuple(value.shape)}, expected ({n},)")
        if not bool(torch.isfinite(value).all()):  # a sync, fine at load time
            raise ValueError(f"checkpoint's Mechanic {name} holds NaN or Inf")
        out[name] = _distributed.local(value).detach().to(device=device, dtype=dtype, copy=True)
    step = entry.get("step")
    if not torch.is_tensor(step) or step.dtype.is_floating_point or step.dim() != 0 or int(step) < 0:
        raise ValueError(f"checkpoint's Mechanic step count is not a 0-d integer tensor >= 0: {step!r}")
    out["step"] = step.detach().to(device=device, dtype=torch.int64, copy=True)
    out.update(options)
    return out


def _recompute_delta(
    per_param: Dict[Tensor, Dict[str, Tensor]],
    entry: Dict[str, Any],
    cfg: MechanicConfig,
    dtype_of: Callable[[Tensor], torch.dtype],
) -> None:
    """Delta = (x - x_ref) / (S + eps), as the step recomputes it, from the parameters as they are now
    (load the model's weights before the optimizer's state, as usual) and x_ref in the dtype it will
    be kept in, so that x = x_ref + S * Delta holds as loaded. Taken in float64."""
    scale = float(entry["s"].sum()) + cfg.eps  # a host read, once, while loading
    for param, ours in per_param.items():
        x_ref = _distributed.shard_like(param, ours[_state.X_REF]).to(param.device).to(dtype_of(param))
        ours[_state.DELTA] = (param.detach().double() - x_ref.double()) / scale
    entry["store_delta"] = True


def _check_per_param(
    cfg: MechanicConfig,
    per_param: Dict[Tensor, Dict[str, Tensor]],
    state: Dict[Any, Any],
    id_map: Dict[Any, Tensor],
    tuner_steps: int,
) -> None:
    for key, param in id_map.items():
        ours = per_param.get(param, {})
        # A parameter the base holds state for has taken a step, so Mechanic has x_ref for it too (one
        # that never had a gradient has neither, and starts afresh at its first step). Not so before
        # Mechanic's first step: some bases (Adagrad) make their state when they are made.
        missing = tuner_steps > 0 and state.get(key) and _state.X_REF not in ours
        if missing and param.numel() > 0:  # empty ones are not tuned
            raise ValueError(f"checkpoint has no Mechanic x_ref for parameter {key!r}, which has base state")
        if not ours:
            continue
        if _state.X_REF not in ours:
            raise ValueError(f"checkpoint has Mechanic Delta but no x_ref for parameter {key!r}")
        if cfg.store_delta and _state.DELTA not in ours:
            raise ValueError(f"checkpoint has no Mechanic Delta for parameter {key!r} (store_delta=True)")
        if not cfg.store_delta and _state.DELTA in ours:
            raise ValueError(f"checkpoint has Mechanic Delta for parameter {key!r}, but store_delta=False")
        for name, t in ours.items():
            label = f"checkpoint's Mechanic {name.replace('mechanic_', '')} for parameter {key!r}"
            if not torch.is_tensor(t) or not t.is_floating_point():
                raise ValueError(f"{label} is not a floating-point tensor")
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(
                    f"{label} has shape {tuple(t.shape)}, the parameter has {tuple(param.shape)}"
                )
            if not bool(torch.isfinite(_distributed.local(t)).all()):
                raise ValueError(f"{label} holds NaN or Inf")


def _check_base_state(
    opt: torch.optim.Optimizer, key: Any, param: Tensor, saved: Dict[str, Any], torch_base: bool
) -> None:
    """Refuse a base checkpoint of another model before torch would load it. For torch's optimizers,
    state that always has the parameter's shape must have this parameter's shape; for any optimizer,
    a tensor must have the shape of the live state of the same name (when there is one)."""
    live = opt.state.get(param, {})
    for name, value in saved.items():
        if not torch.is_tensor(value):
            continue
        mine = live.get(name)
        if torch.is_tensor(mine):
            expected = tuple(mine.shape)
        elif torch_base and name in _state.TORCH_PARAM_SHAPED_STATE:
            expected = tuple(param.shape)
        else:
            continue
        if tuple(value.shape) != expected:
            raise ValueError(
                f"checkpoint's {name} for parameter {key!r} has shape {tuple(value.shape)}, "
                f"expected {expected}"
            )
