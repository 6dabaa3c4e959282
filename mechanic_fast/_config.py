"""Mechanic's options, validated once, so that a bad value fails at `mechanize` and never mid-run."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

VARIANTS = ("paper", "mechanic_pytorch")
BACKENDS = ("auto", "foreach", "triton")

# Each variant's own default for s_init (with 1e-8 the paper math starts far slower).
DEFAULT_S_INIT = {"paper": 1e-6, "mechanic_pytorch": 1e-8}
DEFAULT_S_DECAY = 0.01
# lr_invariant=True measures S and lambda in units of the reference lr (docs/lr_invariant.md); its
# defaults are the paper's s_init and lambda at a reference lr of 1e-3 (the tuner's eps stays as it is,
# in the tuner's own units, so the two modes differ by eps's share while h is small).
INVARIANT_REFERENCE_LR = 1e-3


@dataclass(frozen=True)
class MechanicConfig:
    s_decay: Optional[float] = None  # lambda in the paper; None: 0.01 (lr_invariant: 0.01 / 1e-3)
    betas: Tuple[float, ...] = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)
    s_init: Optional[float] = None
    eps: float = 1e-8
    store_delta: Optional[bool] = None  # None: decided per optimizer from its parameters' dtypes
    log_every: int = 0
    variant: str = "paper"
    backend: str = "auto"
    compile: bool = False
    ref_dtype: Optional[str] = None  # None: x_ref in the parameter's dtype; "float32": fp32 for low precision
    skip_nonfinite: bool = False
    lr_invariant: bool = False  # S and lambda in units of the reference lr (group 0's when made)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        try:
            betas = tuple(float(b) for b in self.betas)
        except TypeError:
            raise ValueError(f"betas must be a sequence of floats, got {self.betas!r}") from None
        if not betas:
            raise ValueError("betas must not be empty")
        if not all(0.0 < b < 1.0 for b in betas):
            raise ValueError(f"every beta must lie in (0, 1), got {betas}")
        object.__setattr__(self, "betas", betas)
        if not isinstance(self.lr_invariant, bool):
            raise ValueError(f"lr_invariant must be a bool, got {self.lr_invariant!r}")
        if self.lr_invariant and self.variant != "paper":
            raise ValueError("lr_invariant=True is a form of the paper variant; use variant='paper'")
        if self.s_init is None:
            s_init = DEFAULT_S_INIT[self.variant]
            object.__setattr__(
                self, "s_init", s_init * INVARIANT_REFERENCE_LR if self.lr_invariant else s_init
            )
        if self.s_decay is None:
            s_decay = DEFAULT_S_DECAY / INVARIANT_REFERENCE_LR if self.lr_invariant else DEFAULT_S_DECAY
            object.__setattr__(self, "s_decay", s_decay)
        _check_float("s_init", self.s_init, positive=True)
        _check_float("eps", self.eps, positive=True)  # 0 divides 0 by 0 at a zero gradient
        _check_float("s_decay", self.s_decay)
        if not isinstance(self.log_every, int) or isinstance(self.log_every, bool) or self.log_every < 0:
            raise ValueError(f"log_every must be an integer >= 0, got {self.log_every!r}")
        if self.ref_dtype not in (None, "float32"):
            raise ValueError(f"ref_dtype must be None or 'float32', got {self.ref_dtype!r}")
        if self.store_delta is not None and not isinstance(self.store_delta, bool):
            raise ValueError(f"store_delta must be None or a bool, got {self.store_delta!r}")
        for name in ("compile", "skip_nonfinite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def with_store_delta(self, dtypes: Iterable[torch.dtype]) -> MechanicConfig:
        """This config with `store_delta` decided for parameters whose x_ref has these dtypes.

        Recomputing Delta as (x - x_ref) / S loses it while S * Delta is below half an ulp of x: x then
        rounds back to x_ref, the inner product h is 0, and the scale never grows (float32 weights of
        order 1 with Adam at lr 1e-3 stall this way from the first step, since S starts at 1e-6). Kept
        as state, Delta accumulates every base update whatever x can resolve. That costs one copy of
        the weights (in x_ref's dtype), paid by default unless every x_ref is float64, where S * Delta
        would have to fall below 1e-16 of the weights to be lost.
        """
        if self.store_delta is not None:
            return self
        return replace(self, store_delta=any(d != torch.float64 for d in dtypes))

    def options(self) -> Dict[str, Any]:
        """The options as `mechanize` keywords (to rebuild the same class)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_float(name: str, value: object, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


# Inductor options for a user's `torch.compile(opt.step, options=INDUCTOR_OPTIONS)` over many tensors.
# Every tensor's update reads the scale S and waits on the op that took the sums, so inductor's fusion
# search checks each pair of such nodes against up to 64 neighbours that never fuse; with 8 it writes the
# same code in less compile time (bench/compile_times.py). Not set by Mechanic: inductor's config is
# global, and a compiled training step holds the model's graph too.
INDUCTOR_OPTIONS: Dict[str, Any] = {"max_fusion_buffer_group_pairwise_attempts": 8}
