"""Parameters that skip steps: a gradient of None, a layer frozen and later unfrozen, an expert that was
not routed.

Every parameter follows x = x_ref + S * Delta. One that takes no step keeps its x, made with the S of its
last step, while S moves on; the step where it resumes must start from that S, not from the last step's
(the update without x_ref assumes x_t = x_ref + S_old * Delta). So a parameter that stops stepping gets a
record of the S its x was made with, ``state[p]["mechanic_x_scale"]`` (0-d, in the tuner's units and
dtype), written once when it stops; where it resumes, its update is corrected and the record deleted:

- Delta stored alone: x += (S_old - S_p) * Delta_old (the update took x_t as x_ref + S_old * Delta_old);
- x_ref alone: Delta_old = (x_t - x_ref) / (S_p + eps), in the sums too (`prepare`);
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
    param: Tensor  # the local tensor, corrected in place after the update
    term: Optional[Tensor]  # Delta stored alone: added to it
    x_ref: Optional[Tensor]  # x_ref alone: the x_ref the step works with ...
    kept: Optional[Tensor]  # ... and its true value, put back after the update


def prepare(
    resumed_params: Dict[Tensor, Dict[str, Any]],
    refs: Dict[Tensor, Dict[str, Tensor]],
    tuner_entry: Dict[str, Any],
    cfg: MechanicConfig,
) -> List[Correction]:
    """The corrections of resuming parameters, before the sums (x = x_t, Delta = Delta_old, the tuner
    not advanced); `refs` are the x_ref/Delta tensors the step works with.

    Delta stored alone: the term (S_old - S_p) * Delta_old. x_ref alone: the step's x_ref is moved to
    x_ref' = x_t - (den_old / den_p) * (x_t - x_ref), so that the step's (x_t - x_ref') / den_old is this
    parameter's Delta in its sums and its update alike; the update then lands at x_ref' + S * Delta_new,
    and `apply` adds x_ref - x_ref' and puts x_ref back."""
    out = []
    state = _state.tuner_state(tuner_entry)
    applied, raw = tuner.effective_scale(state, cfg), state.s.sum()
    unit = _state.delta_unit(tuner_entry)
    for p, entry in resumed_params.items():
        ours = refs[p]
        if _state.X_REF in ours and _state.DELTA in ours:
            continue  # x = x_ref + S * Delta holds by itself
        x = _distributed.local(p)
        s_p = entry[X_SCALE].to(applied.device, applied.dtype)
        wide = torch.promote_types(applied.dtype, x.dtype)
        if _state.DELTA in ours:
            factor = ((applied - s_p) / unit).to(x.device, wide)
            delta = _distributed.local(ours[_state.DELTA])
            out.append(Correction(x, (delta.to(wide) * factor).to(x.dtype), None, None))
        else:
            ratio = (tuner.recompute_denom(raw, cfg) / tuner.recompute_denom(s_p, cfg)).to(x.device, wide)
            x_ref = _distributed.local(ours[_state.X_REF])
            kept = x_ref.clone()
            moved = x.to(wide) - ratio * (x.to(wide) - kept.to(wide))
            x_ref.copy_(moved)
            out.append(Correction(x, None, x_ref, kept))
    return out


def apply(corrections: List[Correction], resumed_params: Dict[Tensor, Dict[str, Any]]) -> None:
    """Complete the corrections after the update, and drop the records."""
    for c in corrections:
        if c.term is not None:
            c.param.add_(c.term)
        else:
            c.param.add_(c.kept - c.x_ref)
            c.x_ref.copy_(c.kept)
    for entry in resumed_params.values():
        del entry[X_SCALE]


def restore(corrections: List[Correction]) -> None:
    """Undo `prepare` where a step ends without an update (skipped, or raised)."""
    for c in corrections:
        if c.x_ref is not None:
            c.x_ref.copy_(c.kept)


def parse_record(value: Any, label: str) -> Tensor:
    """A checkpoint's record, checked: a finite, non-negative, one-element floating tensor."""
    if not torch.is_tensor(value) or not value.is_floating_point() or value.numel() != 1:
        raise ValueError(f"{label} is not a one-element floating-point tensor")
    local = _distributed.local(value).detach()
    if not bool(torch.isfinite(local).all()) or bool((local < 0).any()):
        raise ValueError(f"{label} must be finite and >= 0, got {local.tolist()}")
    return local.reshape(())
