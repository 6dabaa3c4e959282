"""Parameters that skip steps: a gradient of None, a layer frozen and later unfrozen, an expert that was
not routed.

Every parameter follows x = x_ref + S * Delta. One that takes no step keeps its x, made with the S of its
last step, while S moves on; the step where it resumes must start from that S, not from the last step's
(the update without x_ref assumes x_t = x_ref + S_old * Delta). So a parameter that stops stepping gets a
record of the S its x was made with, ``state[p]["mechanic_x_scale"]`` (0-d, in the tuner's units and
dtype), written once when it stops; where it resumes, its update is corrected and the record deleted:

- Delta stored alone: x += (S_old - S_p) * Delta_old (the update took x_t as x_ref + S_old * Delta_old);
- x_ref alone: Delta_old = (x_t - x_ref) / (S_p + eps), so x += S * (x_t - x_ref) * (1/den_p - 1/den_old);
- x_ref and Delta: x = x_ref + S * Delta holds without it.

Parameters that step every time cost one dict lookup per step; a step that writes or uses a record runs
eagerly under torch.compile (it changes the state's keys).
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from . import _distributed, _state, tuner
from ._config import MechanicConfig

X_SCALE = _state.X_SCALE


def unrecorded(state: Dict[Tensor, Any], idle: List[Tensor]) -> List[Tensor]:
    """Those of the parameters taking no step that have Mechanic state and no record yet."""
    out = []
    for p in idle:
        entry = state.get(p)
        if entry is not None and _state.has_state(entry) and X_SCALE not in entry:
            out.append(p)
    return out


def resumed(known: Dict[Tensor, Dict[str, Any]]) -> Dict[Tensor, Dict[str, Any]]:
    """Those of the stepping parameters (with their state) that hold a record: they skipped steps."""
    return {p: entry for p, entry in known.items() if X_SCALE in entry}


def record(state: Dict[Tensor, Any], params: List[Tensor], applied: Tensor) -> None:
    """Record the S (`applied`, the tuner's current one) that made the parameters' x, before it moves."""
    for p in params:
        state[p][X_SCALE] = applied.detach().clone()


class Correction(NamedTuple):
    param: Tensor  # the local tensor, corrected in place
    term: Tensor  # added to it after the update, times S_new where `scaled`
    scaled: bool


def prepare(
    resumed_params: Dict[Tensor, Dict[str, Any]], tuner_entry: Dict[str, Any], cfg: MechanicConfig
) -> List[Correction]:
    """The corrections of resuming parameters, taken before the base step (x = x_t, Delta = Delta_old)."""
    out = []
    state = _state.tuner_state(tuner_entry)
    applied, raw = tuner.effective_scale(state, cfg), state.s.sum()
    lr_ref = _state.lr_ref(tuner_entry)
    for p, entry in resumed_params.items():
        if _state.X_REF in entry and _state.DELTA in entry:
            continue
        x = _distributed.local(p)
        s_p = entry[X_SCALE].to(applied.device, applied.dtype)
        wide = torch.promote_types(applied.dtype, x.dtype)
        if _state.DELTA in entry:
            factor = ((applied - s_p) / lr_ref).to(x.device, wide)
            delta = _distributed.local(entry[_state.DELTA])
            term = (delta.to(wide) * factor).to(x.dtype)
            out.append(Correction(x, term, False))
        else:
            den_p, den_old = tuner.recompute_denom(s_p, cfg), tuner.recompute_denom(raw, cfg)
            factor = (lr_ref / den_p - lr_ref / den_old).to(x.device, wide)
            d = x.to(wide) - _distributed.local(entry[_state.X_REF]).to(wide)
            out.append(Correction(x, d * factor, True))
    return out


def apply(corrections: List[Correction], scale: Tensor, resumed_params: Dict[Tensor, Dict[str, Any]]) -> None:
    """Add the corrections after the update (`scale`: S_new in the parameters' units) and drop the records."""
    for c in corrections:
        if c.scaled:
            c.param.add_((c.term * scale.to(c.param.device, c.term.dtype)).to(c.param.dtype))
        else:
            c.param.add_(c.term)
    for entry in resumed_params.values():
        del entry[X_SCALE]


def parse_record(value: Any, label: str) -> Optional[Tensor]:
    """A checkpoint's record, checked: a finite, non-negative, one-element floating tensor."""
    if not torch.is_tensor(value) or not value.is_floating_point() or value.numel() != 1:
        raise ValueError(f"{label} is not a one-element floating-point tensor")
    local = _distributed.local(value).detach()
    if not bool(torch.isfinite(local).all()) or bool((local < 0).any()):
        raise ValueError(f"{label} must be finite and >= 0, got {local.tolist()}")
    return local.reshape(())
