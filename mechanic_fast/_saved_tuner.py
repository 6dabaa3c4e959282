"""Reading the tuner of a checkpoint (param_groups[0]['mechanic']): its options, checked against this
optimizer's, its units in the lr-invariant mode, and its state vectors."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Tuple

import torch
from torch import Tensor

from . import _distributed, _state, tuner
from ._config import MechanicConfig, checked_betas


class Source(NamedTuple):
    """How messages name where Mechanic's state comes from: a checkpoint being loaded, or the state an
    optimizer holds when `mechanize(opt)` adopts it."""

    owner: str  # "<owner> Mechanic s holds NaN"
    made: str  # "<made> variant='paper', this optimizer has ..."


CHECKPOINT = Source("checkpoint's", "checkpoint was saved with Mechanic")
HELD = Source("the optimizer's held", "the Mechanic state this optimizer holds was made with")


def parse(cfg: MechanicConfig, entry: Any, id_map: Dict[Any, Tensor], source: Source) -> Dict[str, Any]:
    """The tuner entry to install from a saved one (param_groups[0]['mechanic']), checked against `cfg`
    (options left at None take the saved values) and moved to the parameters' device and dtype."""
    if not isinstance(entry, dict):
        raise ValueError(f"{source.owner} param_groups[0]['mechanic'] is not a dict: {type(entry).__name__}")
    if cfg.betas is None:  # left to us: the checkpoint's tuners, however many
        cfg = _adopted_betas(cfg, entry.get("betas"), source)
    options = _state.options(cfg)
    if cfg.store_delta is None:  # left to us: the checkpoint's layout, whichever it is
        theirs = entry.get("store_delta")
        if not isinstance(theirs, bool):
            raise ValueError(f"{source.owner} Mechanic store_delta is not a bool: {theirs!r}")
        options["store_delta"] = theirs
    for key, mine in options.items():
        theirs = entry.get(key, False if key == "lr_invariant" else None)
        if key == "betas" and isinstance(theirs, (list, tuple)):
            theirs = tuple(float(b) for b in theirs)
        if theirs != mine:
            raise ValueError(f"{source.made} {key}={theirs!r}, this optimizer has {mine!r}")
    saved_invariant = entry.get("lr_invariant", False)
    if cfg.lr_invariant is not None and saved_invariant != cfg.lr_invariant:
        raise ValueError(
            f"{source.made} lr_invariant={saved_invariant!r}, this optimizer has {cfg.lr_invariant!r}"
        )
    if not isinstance(saved_invariant, bool):
        raise ValueError(f"{source.owner} Mechanic lr_invariant is not a bool: {saved_invariant!r}")
    cfg = cfg.resolved(saved_invariant)  # the default (None) keeps the checkpoint's mode
    if saved_invariant:
        options["lr_invariant"] = True
    params = list(id_map.values())
    device = params[0].device if params else torch.device("cpu")
    dtype = tuner.state_dtype(cfg, {p.dtype for p in params})
    out: Dict[str, Any] = _parse_units(entry, source) if cfg.lr_invariant else {}
    out.update(_parse_vectors(entry, cfg.betas, device, dtype, source))
    step = entry.get("step")
    if not torch.is_tensor(step) or step.dtype.is_floating_point or step.dim() != 0 or int(step) < 0:
        raise ValueError(f"{source.owner} Mechanic step count is not a 0-d integer tensor >= 0: {step!r}")
    out["step"] = step.detach().to(device=device, dtype=torch.int64, copy=True)
    out.update(options)
    return out


def _adopted_betas(cfg: MechanicConfig, theirs: Any, source: Source) -> MechanicConfig:
    """`cfg` with a checkpoint's betas, checked as `mechanize` checks them."""
    try:
        return dataclasses.replace(cfg, betas=checked_betas(theirs))
    except ValueError as error:
        raise ValueError(f"{source.owner} Mechanic betas are not valid: {error}") from None


def _parse_vectors(
    entry: Dict[str, Any], betas: Tuple[float, ...], device: torch.device, dtype: torch.dtype, source: Source
) -> Dict[str, Tensor]:
    """The tuner's state vectors (s, r, m, v), one value per beta, checked and moved."""
    out: Dict[str, Tensor] = {}
    n = len(betas)
    for name in tuner.TunerState._fields:
        value = entry.get(name)
        if not torch.is_tensor(value):
            raise ValueError(f"{source.owner} Mechanic tuner has no tensor {name!r}")
        if value.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{source.owner} Mechanic {name} is {value.dtype}; the tuner is kept in float32 or float64"
            )
        if tuple(value.shape) != (n,):
            raise ValueError(
                f"{source.owner} Mechanic {name} has shape {tuple(value.shape)}, expected ({n},): one value "
                f"per beta of betas={betas}"
            )
        if not bool(torch.isfinite(value).all()):  # a sync, fine at load time
            raise ValueError(f"{source.owner} Mechanic {name} holds NaN or Inf")
        if name != "r" and bool((value < 0).any()):  # s, m, v are >= 0 in both variants
            raise ValueError(f"{source.owner} Mechanic {name} holds negative values: {value.tolist()}")
        out[name] = _distributed.local(value).detach().to(device=device, dtype=dtype, copy=True)
    return out


def _parse_units(entry: Dict[str, Any], source: Source) -> Dict[str, Any]:
    """An lr-invariant tuner's reference lr and base lr factor (none in earlier versions' checkpoints)."""
    out = {"lr_ref": _state.reference_lr(entry.get("lr_ref"))}
    name = _state.BASE_LR_FACTOR
    if name in entry:
        if not _state.is_power_of_two(entry[name]):
            raise ValueError(f"{source.owner} Mechanic {name} is not a power of two: {entry[name]!r}")
        out[name] = float(entry[name])
    return out
