"""Where Mechanic keeps its state inside a torch optimizer, and how a checkpoint of it is checked.

Layout (everything lives where torch's own machinery already carries optimizer state, so that
`state_dict`/`load_state_dict`, `torch.distributed.checkpoint` (DCP), deepcopy, pickling and state-dict
hooks handle it with no special case):

- ``state[p]["mechanic_delta"]``: Delta, by default (`MechanicConfig.with_store_delta`), and
  ``state[p]["mechanic_x_ref"]``: x_ref (x_0 in the paper) where it is kept (`keeps_x_ref`).
  Per-parameter like ``exp_avg``, with the parameter's shape and, under FSDP2, its DTensor layout (so
  DCP saves them sharded and reshards them on load). Tensors of one device and dtype are views tiling
  one flat buffer, which the foreach backend reads without a gather. Prefixed names: a base
  optimizer's own keys never collide with ours.
- ``param_groups[0]["mechanic"]``: the tuner, a dict of s, r, m, v (one entry per beta), its step count
  and the options that give them meaning (variant, betas, store_delta; in the lr-invariant mode its
  reference lr, ``lr_ref``, and ``base_lr_factor``, the factor the base's lrs are multiplied by in its
  step: Delta is the sum of the base's updates at those lrs). The tuner is global, not
  per-parameter, and it must keep its float32/float64 dtype: `load_state_dict` casts per-parameter
  floating state to the parameter's dtype (bf16 for a bf16 model), while param-group values are kept
  verbatim; DCP's `get_state_dict` keeps only parameter-keyed `state` (another key there breaks its
  id-to-name mapping) and `param_groups`, whose values `set_state_dict` hands back to the group that
  holds the same parameters. Group 0 is the group every optimizer has.

Reading a checkpoint is `_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor

from . import _buffers, _distributed, tuner
from ._config import MechanicConfig

TUNER_KEY = "mechanic"  # in param_groups[0]
X_REF = "mechanic_x_ref"  # in state[p]
DELTA = "mechanic_delta"  # in state[p], where Delta is stored
BASE_LR_FACTOR = "base_lr_factor"  # in the tuner entry (`settle_lr_ref`)
X_SCALE = "mechanic_x_scale"  # in state[p] while p skips steps: the S its x was made with (`_gaps`)
MECHANIC_PYTORCH_KEY = "_mechanic"  # mechanic-pytorch keeps its state under this `state` key
LOW_PRECISION = (torch.float16, torch.bfloat16)

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
    cfg: MechanicConfig, device: torch.device, dtype: torch.dtype, lr: Any = None, fallback_lr: Any = None
) -> Dict[str, Any]:
    """The param_groups[0] entry of a fresh tuner (`cfg` resolved: `store_delta` and `lr_invariant`
    decided). In the lr-invariant mode `lr` (group 0's lr now) becomes the reference lr, kept with the
    tuner; where it is not > 0 (a warmup's first lr) `fallback_lr` does, if given."""
    entry: Dict[str, Any] = dict(tuner.initial_state(cfg, device, dtype)._asdict())
    entry["step"] = torch.zeros((), dtype=torch.int64, device=device)
    entry.update(options(cfg))
    if cfg.lr_invariant:
        usable = fallback_lr is None or _is_positive(lr)
        # settled at the first step (`settle_lr_ref`): an LR scheduler made after the optimizer may
        # replace the lr it was made with (OneCycleLR, CyclicLR)
        entry["lr_ref"] = reference_lr(lr if usable else fallback_lr)
    return entry


def lr_value(lr: Any) -> float:
    """An lr as a float: any real number (Python, numpy) or a one-element floating tensor; NaN otherwise."""
    if torch.is_tensor(lr):
        return float(lr) if lr.numel() == 1 and lr.is_floating_point() else math.nan
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        return math.nan
    return float(lr)


def _is_positive(lr: Any) -> bool:
    value = lr_value(lr)
    return math.isfinite(value) and value > 0


def lr_ref_pending(entry: Optional[Dict[str, Any]]) -> bool:
    """Whether an lr-invariant tuner has yet to take its first step (one host read: not in a step)."""
    return entry is not None and "lr_ref" in entry and int(entry["step"]) == 0


def settle_lr_ref(
    entry: Dict[str, Any], group: Dict[str, Any], cfg: MechanicConfig, dtypes: Set[torch.dtype]
) -> None:
    """At the first step of an lr-invariant tuner, its reference lr from what the user gave: the lr an LR
    scheduler started group 0 from (`initial_lr`), else group 0's lr now, else the one it was made with.
    So scaling every lr the user gives (the optimizer's, a scheduler's max_lr or base_lr) by a constant
    scales the reference with them, whichever scheduler replaced the optimizer's lr when it was made.
    With it, the factor the base's lrs are multiplied by in its step (`base_lr_factor`), for parameters
    of these `dtypes`."""
    for lr in (group.get("initial_lr"), group.get("lr")):
        if _is_positive(lr):
            entry["lr_ref"] = lr_value(lr)
            break
    headroom = 1.0 if torch.float16 in dtypes else BASE_LR_HEADROOM
    entry[BASE_LR_FACTOR] = base_lr_factor(cfg, entry["lr_ref"], headroom)


# A base lr below this many times the base's usual lr is raised near it in the base's step: Mechanic's
# scale on the base's updates, S * lr / (lr * factor), is then below 1 for effective lrs up to this many
# times the usual one, and a scale <= 1 does not magnify the base's rounding. float16 weights (largest
# value 65504) get 1: their base steps at most at its usual lr, whose range its users train in. 2^60 keeps
# a float32 lr tensor times the factor finite.
BASE_LR_HEADROOM = 64.0
_MAX_FACTOR_EXPONENT = 60


def base_lr_factor(cfg: MechanicConfig, lr_ref: float, headroom: float = BASE_LR_HEADROOM) -> float:
    """What the base's lrs are multiplied by in its step: for a base whose update is proportional to its
    lr, and a reference lr below `headroom` times its usual lr, the power of two that brings lr_ref
    nearest that; else 1. The base steps at lr * factor and Mechanic applies S / factor to its update:
    the same update, but the base's own rounding of x_base (half an ulp of x, in u = x_base - x_t) is that
    of a step at least as large as the one applied, where a small lr leaves u a few ulps of x and S > 1
    multiplies its rounding error. A power of two is exact in every float format. A larger lr stays: a
    step larger than the one applied costs nothing (x_t carries x in the update), and a base at its
    given lr keeps the range its user chose."""
    if not cfg.base_lr_proportional:
        return 1.0
    exponent = round(math.log2(headroom * cfg.usual_lr / lr_ref))
    return 2.0 ** min(_MAX_FACTOR_EXPONENT, max(0, exponent))


def reference_lr(lr: Any) -> float:
    if not _is_positive(lr):
        raise ValueError(
            f"lr_invariant=True measures the scale in units of group 0's lr, which must be a finite "
            f"number > 0 when the tuner is made; it is {lr!r}"
        )
    return lr_value(lr)


def lr_ref(entry: Dict[str, Any]) -> float:
    """The reference lr of an lr-invariant tuner; 1 (no rescaling) otherwise."""
    return entry.get("lr_ref", 1.0)


def is_power_of_two(value: Any) -> bool:
    """Whether `value` is a real number 2^k (a `base_lr_factor`), read as `lr_value` reads an lr."""
    return _is_positive(value) and math.frexp(lr_value(value))[0] == 0.5


def delta_unit(entry: Dict[str, Any]) -> float:
    """What Delta is measured in, for the tuner: the reference lr times the factor the base's lrs ran at
    (Delta is the sum of the base's updates at lr * factor; 1 where there is none, as in checkpoints
    made before it existed)."""
    return lr_ref(entry) * entry.get(BASE_LR_FACTOR, 1.0)


def run_config(cfg: MechanicConfig, entry: Dict[str, Any]) -> MechanicConfig:
    """The options a step runs with: `cfg` with what the tuner `entry` decided when it was made or
    loaded (`store_delta`, the betas, the mode) and that mode's defaults for what was left at None."""
    store_delta, invariant = entry["store_delta"], entry.get("lr_invariant", False)
    return dataclasses.replace(cfg, store_delta=store_delta, betas=entry["betas"]).resolved(invariant)


class RunCache:
    """`run_config` and the tuner's constants on its device, made once, and again only when the tuner
    entry's mode or place changes (a load): per step they would copy constants from the host."""

    def __init__(self, cfg: MechanicConfig) -> None:
        self.cfg = cfg
        self.run: Optional[Tuple[Any, MechanicConfig, tuner.Constants]] = None

    def get(self, entry: Dict[str, Any]) -> Tuple[MechanicConfig, tuner.Constants]:
        s = entry["s"]
        key = (entry["store_delta"], entry.get("lr_invariant", False), entry["betas"], s.device, s.dtype)
        if self.run is None or self.run[0] != key:
            cfg = run_config(self.cfg, entry)
            self.run = (key, cfg, tuner.constants(cfg, s.device, s.dtype))
        return self.run[1], self.run[2]


def tuner_state(entry: Dict[str, Any]) -> tuner.TunerState:
    return tuner.TunerState(*(entry[name] for name in tuner.TunerState._fields))


def options(cfg: MechanicConfig) -> Dict[str, Any]:
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
        copies = _buffers.flat_clones(
            [_distributed.local(_distributed.shard_like(p, values[p])) for p in params], dtype
        )
        out.update((p, _distributed.like(p, c)) for p, c in zip(params, copies))
    return out


def laid_out(
    x_refs: Dict[Tensor, Tensor],
    deltas: Optional[Dict[Tensor, Tensor]],
    dtype_of: Callable[[Tensor], torch.dtype],
) -> Dict[Tensor, Dict[str, Tensor]]:
    """Per-parameter Mechanic state made from x_ref and Delta values (either may cover only some
    parameters), each tiled as `tiled` lays it out."""
    fresh: Dict[Tensor, Dict[str, Tensor]] = {}
    for name, values in ((X_REF, x_refs), (DELTA, deltas or {})):
        for p, v in tiled(values, dtype_of).items():
            fresh.setdefault(p, {})[name] = v
    return fresh


def keeps_x_ref(store_delta: bool, p: Tensor) -> bool:
    """Whether p's Mechanic state holds x_ref. With Delta stored, float32/float64 parameters need only
    Delta (x = x_t + S * Delta_new - S_old * Delta_old, `functional.mechanic_update`); bfloat16/float16
    ones keep x_ref too, so that x = x_ref + S * Delta is rounded once from precise values, not
    accumulated in a format whose resolution is 2^-8."""
    return not store_delta or p.dtype in LOW_PRECISION


def has_state(entry: Dict[str, Any]) -> bool:
    """Whether a parameter's state dict holds Mechanic's state."""
    return X_REF in entry or DELTA in entry


def ref_dtype(cfg: MechanicConfig, p: Tensor) -> torch.dtype:
    """The dtype of p's x_ref and Delta: p's own, or float32 for low precision with ref_dtype='float32'."""
    return torch.float32 if cfg.ref_dtype == "float32" and p.dtype in LOW_PRECISION else p.dtype


def fresh_tuner(param_groups: List[Dict[str, Any]], cfg: MechanicConfig, lr: Any) -> Dict[str, Any]:
    """A tuner entry in its initial state for these parameters (not installed), `lr` its reference lr
    with lr_invariant: made before anything changes, so that a refusal leaves the optimizer as it was."""
    params = [p for g in param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    # the default mode falls back to the base's usual lr where group 0's is 0; lr_invariant=True refuses
    fallback = cfg.usual_lr if cfg.lr_invariant is None else None
    cfg = cfg.with_store_delta().resolved(cfg.invariant_by_default)
    return new_tuner(cfg, device, tuner.state_dtype(cfg, {p.dtype for p in params}), lr, fallback)


def tuner_entry(param_groups: List[Dict[str, Any]], cfg: MechanicConfig) -> Dict[str, Any]:
    """The tuner in param_groups[0], created in its initial state where it is missing (a new optimizer)
    and moved to where the parameters are."""
    group = param_groups[0]
    entry = group.get(TUNER_KEY)
    if entry is None:
        entry = group[TUNER_KEY] = fresh_tuner(param_groups, cfg, group.get("lr"))
        return entry
    # the model moved after the optimizer was made (the first parameter: no list of all, per step)
    first = next((g["params"][0] for g in param_groups if g["params"]), None)
    if first is not None and entry["s"].device != first.device:
        for name in (*tuner.TunerState._fields, "step"):
            entry[name] = entry[name].to(first.device)
    return entry


def advance_tuner(
    entry: Dict[str, Any], sums: Tensor, const: tuner.Constants, cfg: MechanicConfig
) -> Tuple[Tensor, Tensor, Tensor]:
    """`tuner.step` on the tuner `entry`, committed in place (stable addresses for CUDA graphs); returns
    (S_new, S_old, denom) for the update (`tuner.step`). One copy_ per vector: inductor misorders a
    _foreach_copy_ whose sources read one of its destinations (compile/test_compiled_step.py)."""
    old = tuner_state(entry)
    new, scale, scale_old, denom = tuner.step(old, sums, const, cfg, delta_unit(entry))
    for buf, value in zip(old, new):
        buf.copy_(value)
    entry["step"].add_(1)
    return scale, scale_old, denom
