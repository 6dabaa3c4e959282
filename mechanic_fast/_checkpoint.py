"""Reading a checkpoint into a mechanized optimizer: `load` validates it completely and builds the
new Mechanic state aside (`parse`), so that a refused checkpoint leaves the optimizer as it was.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _gaps, _saved_tuner, _state, _torch, tuner
from ._config import MechanicConfig
from ._saved_tuner import CHECKPOINT, HELD, Source


def load(opt: Any, state_dict: Dict[str, Any], torch_load: Callable[[Dict[str, Any]], None]) -> None:
    """`opt.load_state_dict(state_dict)` with torch's contract: load-state-dict pre-hooks run first and
    may replace the checkpoint, post hooks see the loaded optimizer. In between, everything is validated
    before anything changes (`parse`), torch's own loading (`torch_load`, without its hooks) takes the
    base's part, and Mechanic's tensors keep their dtypes (torch would cast x_ref to the parameter's)."""
    state_dict = state_dict.copy()
    for pre_hook in _torch.load_state_dict_hooks(opt)[0]:
        replaced = pre_hook(opt, state_dict)
        if replaced is not None:
            state_dict = replaced
    cfg = opt._mechanic_config
    torch_base = opt._mechanic_spec.base.__module__.startswith("torch.optim")
    base_sd, per_param, entry = parse(
        opt, cfg, state_dict, functools.partial(_state.ref_dtype, cfg), torch_base
    )
    if entry is None:  # a plain base checkpoint: the tuner starts afresh, at the checkpoint's lr
        saved_lr = base_sd["param_groups"][0].get("lr") if base_sd["param_groups"] else None
        entry = _state.fresh_tuner(opt.param_groups, cfg, saved_lr)
    with _torch.without_load_state_dict_hooks(opt):
        torch_load(base_sd)
    for p, tensors in per_param.items():
        opt.state[p].update(tensors)
    opt.param_groups[0][_state.TUNER_KEY] = entry
    opt._mechanic_attach()  # host caches anew
    for post_hook in _torch.load_state_dict_hooks(opt)[1]:
        post_hook(opt)


def adopt(
    opt: torch.optim.Optimizer, cfg: MechanicConfig, dtype_of: Callable[[Tensor], torch.dtype]
) -> Tuple[Dict[str, Any], Dict[Tensor, Dict[str, Tensor]]]:
    """Mechanic's state for an optimizer mechanized in place (`mechanize(opt)`): the tuner entry and
    per-parameter state it holds already (a mechanized checkpoint loaded into the plain optimizer),
    checked against `cfg` as a load checks a checkpoint, or a fresh tuner. Changes nothing of `opt`."""
    holds = _state.TUNER_KEY in opt.param_groups[0] or any(
        isinstance(s, dict) and _state.has_state(s) for s in opt.state.values()
    )
    per_param: Dict[Tensor, Dict[str, Tensor]] = {}
    entry = None
    if holds:
        torch_base = type(opt).__module__.startswith("torch.optim")
        _, per_param, entry = parse(opt, cfg, opt.state_dict(), dtype_of, torch_base, HELD)
    if entry is None:
        entry = _state.fresh_tuner(opt.param_groups, cfg, opt.param_groups[0].get("lr"))
    return entry, per_param


def parse(
    opt: torch.optim.Optimizer,
    cfg: MechanicConfig,
    state_dict: Dict[str, Any],
    dtype_of: Callable[[Tensor], torch.dtype],
    torch_base: bool,
    source: Source = CHECKPOINT,
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
        ours = {k: value[k] for k in _MECHANIC_KEYS if k in value}
        state[key] = {k: v for k, v in value.items() if k not in _MECHANIC_KEYS}
        if ours:
            per_param[param] = ours
        _check_base_state(opt, key, param, state[key], torch_base)
    tuner_entry, fresh = _mechanic_part(opt, cfg, entry, per_param, id_map, dtype_of, source)
    sd["state"], sd["param_groups"] = state, groups
    return sd, fresh, tuner_entry


def _mechanic_part(
    opt: torch.optim.Optimizer,
    cfg: MechanicConfig,
    entry: Any,
    per_param: Dict[Tensor, Dict[str, Tensor]],
    id_map: Dict[Any, Tensor],
    dtype_of: Callable[[Tensor], torch.dtype],
    source: Source,
) -> Tuple[Optional[Dict[str, Any]], Dict[Tensor, Dict[str, Tensor]]]:
    """The checkpoint's tuner entry (or None) and per-parameter state, checked and laid out as kept:
    x_ref only where `_state.keeps_x_ref` (older checkpoints kept it for every parameter), and the
    records of parameters that skipped steps (`_gaps`) in the tuner's dtype."""
    if entry is None:
        if per_param:
            raise ValueError(
                f"{source.owner} Mechanic state has x_ref or Delta but no tuner "
                "(param_groups[0]['mechanic'] is missing)"
            )
        return None, {}
    tuner_entry = _saved_tuner.parse(cfg, entry, id_map, source)
    auto = cfg.store_delta is None
    cfg = dataclasses.replace(cfg, store_delta=tuner_entry["store_delta"])
    records = _check_per_param(cfg, per_param, id_map, source)
    if auto and not cfg.store_delta:
        # An x_ref-only checkpoint (store_delta=False, the float64 default of earlier versions) with the
        # layout left to us: Delta from now on, which costs no more and cannot stall in lower precision.
        _recompute_delta(per_param, tuner_entry, cfg, dtype_of)
        cfg = dataclasses.replace(cfg, store_delta=True)
    if cfg.store_delta:
        _complete_x_ref(per_param, tuner_entry, cfg, dtype_of)
    x_refs = {p: v[_state.X_REF] for p, v in per_param.items() if _state.keeps_x_ref(cfg.store_delta, p)}
    deltas = {p: v[_state.DELTA] for p, v in per_param.items()} if cfg.store_delta else None
    fresh = _state.laid_out(x_refs, deltas, dtype_of)
    like = tuner_entry["s"]
    for p, value in records.items():
        fresh[p][_gaps.X_SCALE] = value.to(device=like.device, dtype=like.dtype, copy=True)
    return tuner_entry, fresh


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


def _applied_scale(entry: Dict[str, Any], cfg: MechanicConfig, ours: Dict[str, Tensor]) -> float:
    """The S a saved parameter was made with, in the parameters' units (a host read, once, while
    loading): its record where it skipped steps (`_gaps`), else the tuner's; a tiny positive number
    where that is 0 (mechanic_pytorch's first steps: x = x_ref there, so Delta = 0)."""
    raw = ours.get(_gaps.X_SCALE)
    raw = tuner.effective_scale(_state.tuner_state(entry), cfg) if raw is None else raw
    return max(float(raw), torch.finfo(torch.float64).tiny) / _state.delta_unit(entry)


def _recompute_delta(
    per_param: Dict[Tensor, Dict[str, Tensor]],
    entry: Dict[str, Any],
    cfg: MechanicConfig,
    dtype_of: Callable[[Tensor], torch.dtype],
) -> None:
    """Delta = (x - x_ref) / S, from the parameters as they are now (load the model's weights before the
    optimizer's state, as usual) and x_ref in the dtype it will be kept in, so that x = x_ref + S * Delta
    holds exactly as loaded (S + eps, as the x_ref-only step of the paper's variant divides by, would
    move every parameter at the next step by eps / S of its displacement). Taken in float64."""
    for param, ours in per_param.items():
        x_ref = _distributed.shard_like(param, ours[_state.X_REF]).to(param.device).to(dtype_of(param))
        ours[_state.DELTA] = (param.detach().double() - x_ref.double()) / _applied_scale(entry, cfg, ours)
    entry["store_delta"] = True


def _complete_x_ref(
    per_param: Dict[Tensor, Dict[str, Tensor]],
    entry: Dict[str, Any],
    cfg: MechanicConfig,
    dtype_of: Callable[[Tensor], torch.dtype],
) -> None:
    """x_ref = x - S * Delta (taken in float64) for bfloat16/float16 parameters whose checkpoint holds
    Delta alone (saved from float32 parameters of the same model)."""
    for param, ours in per_param.items():
        if _state.X_REF in ours or not _state.keeps_x_ref(True, param):
            continue
        delta = _distributed.shard_like(param, ours[_state.DELTA]).to(param.device).to(dtype_of(param))
        ours[_state.X_REF] = param.detach().double() - _applied_scale(entry, cfg, ours) * delta.double()


def _check_per_param(
    cfg: MechanicConfig, per_param: Dict[Tensor, Dict[str, Tensor]], id_map: Dict[Any, Tensor], source: Source
) -> Dict[Tensor, Tensor]:
    """Check each parameter's Mechanic state against its layout and the parameter; returns the records
    of parameters that skipped steps (`_gaps`), checked, as one-element tensors."""
    records: Dict[Tensor, Tensor] = {}
    for key, param in id_map.items():
        # A parameter with base state but no Mechanic state is valid: one that never had a gradient
        # while mechanized (Adagrad makes state when it is made; a layer frozen since `mechanize(opt)`
        # or since a plain checkpoint was loaded). It starts afresh at its first tuned step.
        ours = per_param.get(param, {})
        if not ours:
            continue
        where = f"{source.owner} Mechanic state for parameter {key!r}"
        if _gaps.X_SCALE in ours:
            label = f"{where}: the record of its scale ({_gaps.X_SCALE})"
            records[param] = _gaps.parse_record(ours[_gaps.X_SCALE], label)
            if len(ours) == 1:
                raise ValueError(f"{where} has {_gaps.X_SCALE} but neither x_ref nor Delta")
        if cfg.store_delta and _state.DELTA not in ours:
            raise ValueError(f"{where} has no Delta (store_delta=True)")
        if not cfg.store_delta and _state.X_REF not in ours:
            raise ValueError(f"{where} has no x_ref (store_delta=False)")
        if not cfg.store_delta and _state.DELTA in ours:
            raise ValueError(f"{where} has Delta, but store_delta=False")
        for name in (_state.X_REF, _state.DELTA):
            t = ours.get(name)
            if t is None:
                continue
            label = f"{source.owner} Mechanic {name.replace('mechanic_', '')} for parameter {key!r}"
            if not torch.is_tensor(t) or not t.is_floating_point():
                raise ValueError(f"{label} is not a floating-point tensor")
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(
                    f"{label} has shape {tuple(t.shape)}, the parameter has {tuple(param.shape)}"
                )
            if not bool(torch.isfinite(_distributed.local(t)).all()):
                raise ValueError(f"{label} holds NaN or Inf")
    return records


_MECHANIC_KEYS = (_state.X_REF, _state.DELTA, _gaps.X_SCALE)


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
