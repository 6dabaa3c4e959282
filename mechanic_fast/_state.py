"""Where Mechanic keeps its state inside a torch optimizer, and how a checkpoint of it is checked.

Layout (everything lives where torch's own machinery already carries optimizer state, so that
`state_dict`/`load_state_dict`, `torch.distributed.checkpoint` (DCP), deepcopy, pickling and state-dict
hooks handle it with no special case):

- ``state[p]["mechanic_x_ref"]``: x_ref (x_0 in the paper), and where Delta is stored (by default
  unless every x_ref is float64; see `MechanicConfig.with_store_delta`) ``state[p]["mechanic_delta"]``.
  Per-parameter like ``exp_avg``, with the parameter's shape and, under FSDP2, its DTensor layout (so
  DCP saves them sharded and reshards them on load). Tensors of one device and dtype are views tiling
  one flat buffer, which the foreach backend reads without a gather. Prefixed names: a base
  optimizer's own keys never collide with ours.
- ``param_groups[0]["mechanic"]``: the tuner, a dict of s, r, m, v (one entry per beta), its step count
  and the options that give them meaning (variant, betas, store_delta). The tuner is global, not
  per-parameter, and it must keep its float32/float64 dtype: `load_state_dict` casts per-parameter
  floating state to the parameter's dtype (bf16 for a bf16 model), while param-group values are kept
  verbatim; DCP's `get_state_dict` keeps only parameter-keyed `state` (another key there breaks its
  id-to-name mapping) and `param_groups`, whose values `set_state_dict` hands back to the group that
  holds the same parameters. Group 0 is the group every optimizer has.

The reading side (`parse`) validates a checkpoint completely and builds the new Mechanic state aside,
so that a refused checkpoint leaves the optimizer as it was.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _foreach, tuner
from ._config import MechanicConfig

TUNER_KEY = "mechanic"  # in param_groups[0]
X_REF = "mechanic_x_ref"  # in state[p]
DELTA = "mechanic_delta"  # in state[p], where Delta is stored
MECHANIC_PYTORCH_KEY = "_mechanic"  # mechanic-pytorch keeps its state under this `state` key

# per-parameter state of torch.optim optimizers that always has the parameter's shape
TORCH_PARAM_SHAPED_STATE = frozenset(
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


def new_tuner(
    cfg: MechanicConfig, device: torch.device, dtype: torch.dtype, lr: Any = None
) -> Dict[str, Any]:
    """The param_groups[0] entry of a fresh tuner (`cfg.store_delta` decided, see `with_store_delta`).
    With lr_invariant, `lr` (group 0's lr now) becomes the reference lr, kept with the tuner."""
    entry: Dict[str, Any] = dict(tuner.initial_state(cfg, device, dtype)._asdict())
    entry["step"] = torch.zeros((), dtype=torch.int64, device=device)
    entry.update(_options(cfg))
    if cfg.lr_invariant:
        entry["lr_ref"] = _reference_lr(lr)
    return entry


def _reference_lr(lr: Any) -> float:
    value = float(lr) if torch.is_tensor(lr) or isinstance(lr, (int, float)) else math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"lr_invariant=True measures the scale in units of group 0's lr, which must be a finite "
            f"number > 0 when the tuner is made; it is {lr!r}"
        )
    return value


def lr_ref(entry: Dict[str, Any]) -> float:
    """The reference lr of an lr-invariant tuner; 1 (no rescaling) otherwise."""
    return entry.get("lr_ref", 1.0)


def tuner_state(entry: Dict[str, Any]) -> tuner.TunerState:
    return tuner.TunerState(*(entry[name] for name in tuner.TunerState._fields))


def _options(cfg: MechanicConfig) -> Dict[str, Any]:
    options = {"variant": cfg.variant, "betas": tuple(cfg.betas), "store_delta": cfg.store_delta}
    if cfg.lr_invariant:  # absent otherwise, as in checkpoints made before the option existed
        options["lr_invariant"] = True
    return options


def tiled(values: Dict[Tensor, Tensor], dtype_of: Callable[[Tensor], torch.dtype]) -> Dict[Tensor, Tensor]:
    """Copies of `values` (param -> tensor of the param's shape, plain or DTensor), in dtype_of(param),
    laid out per device and dtype as views tiling one flat buffer; DTensors stay DTensors with the
    parameter's layout (their local shards tile the buffer)."""
    out: Dict[Tensor, Tensor] = {}
    buckets: Dict[Tuple[torch.device, torch.dtype, torch.dtype], List[Tensor]] = {}
    for p, v in values.items():
        local = _distributed.local(_distributed.shard_like(p, v))
        if local.is_contiguous() and local.numel() > 0:
            buckets.setdefault((local.device, local.dtype, dtype_of(p)), []).append(p)
        else:  # nothing to tile (an empty shard) or a layout a flat buffer cannot view
            out[p] = _distributed.like(p, local.to(dtype=dtype_of(p), copy=True))
    for (_, _, dtype), params in buckets.items():
        copies = _foreach.flat_clones(
            [_distributed.local(_distributed.shard_like(p, values[p])) for p in params], dtype
        )
        out.update((p, _distributed.like(p, c)) for p, c in zip(params, copies))
    return out


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
    if MECHANIC_PYTORCH_KEY in state:
        raise ValueError(
            "this is a mechanic-pytorch checkpoint (its state sits under state['_mechanic'], keyed by "
            "parameter objects that do not survive saving); it cannot be loaded. Load the base "
            "optimizer's state alone, or start from the saved model weights."
        )
    id_map = _id_map(opt, groups)
    entry = groups[0].pop(TUNER_KEY, None) if groups else None
    per_param: Dict[Tensor, Dict[str, Tensor]] = {}
    for key, value in list(state.items()):
        param = id_map.get(key)
        if param is None or not isinstance(value, dict):
            continue  # not a parameter's state: torch keeps it as it is
        ours = {k: value[k] for k in (X_REF, DELTA) if k in value}
        state[key] = {k: v for k, v in value.items() if k not in (X_REF, DELTA)}
        if ours:
            per_param[param] = ours
        _check_base_state(opt, key, param, state[key], torch_base)
    tuner_entry = None
    if entry is not None:
        tuner_entry = _parse_tuner(opt, cfg, entry, id_map)
        auto = cfg.store_delta is None
        cfg = dataclasses.replace(cfg, store_delta=tuner_entry["store_delta"])
        _check_per_param(cfg, per_param, state, id_map, int(tuner_entry["step"]))
        narrowed = any(
            v[X_REF].dtype == torch.float64 and dtype_of(p) != torch.float64 for p, v in per_param.items()
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
    fresh = {}
    if tuner_entry is not None:
        x_refs = tiled({p: v[X_REF] for p, v in per_param.items()}, dtype_of)
        fresh = {p: {X_REF: x} for p, x in x_refs.items()}
        if cfg.store_delta:
            for p, d in tiled({p: v[DELTA] for p, v in per_param.items()}, dtype_of).items():
                fresh[p][DELTA] = d
    sd["state"], sd["param_groups"] = state, groups
    return sd, fresh, tuner_entry


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
    options = _options(cfg)
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
        out["lr_ref"] = _reference_lr(entry.get("lr_ref"))
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
        x_ref = _distributed.shard_like(param, ours[X_REF]).to(param.device).to(dtype_of(param))
        ours[DELTA] = (param.detach().double() - x_ref.double()) / scale
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
        missing = tuner_steps > 0 and state.get(key) and X_REF not in ours
        if missing and param.numel() > 0:  # empty ones are not tuned
            raise ValueError(f"checkpoint has no Mechanic x_ref for parameter {key!r}, which has base state")
        if not ours:
            continue
        if X_REF not in ours:
            raise ValueError(f"checkpoint has Mechanic Delta but no x_ref for parameter {key!r}")
        if cfg.store_delta and DELTA not in ours:
            raise ValueError(f"checkpoint has no Mechanic Delta for parameter {key!r} (store_delta=True)")
        if not cfg.store_delta and DELTA in ours:
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
        elif torch_base and name in TORCH_PARAM_SHAPED_STATE:
            expected = tuple(param.shape)
        else:
            continue
        if tuple(value.shape) != expected:
            raise ValueError(
                f"checkpoint's {name} for parameter {key!r} has shape {tuple(value.shape)}, "
                f"expected {expected}"
            )
