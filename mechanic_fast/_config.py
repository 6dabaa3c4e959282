"""Mechanic's options, validated once, so that a bad value fails at `mechanize` and never mid-run."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

VARIANTS = ("paper", "mechanic_pytorch")
BACKENDS = ("auto", "foreach", "triton")

# Each variant's own default for s_init (with 1e-8 the paper math starts far slower).
DEFAULT_S_INIT = {"paper": 1e-6, "mechanic_pytorch": 1e-8}
DEFAULT_S_DECAY = 0.01
# Mechanic's betas, one tuner per value: the paper's six, 1 - 10^-i for i = 1..6 (its variants keep them).
# The lr-invariant mode drops the two fast tuners (memories of 10 and 100 steps): their bettors are
# scale-free in the inner product h, so a run of tiny same-signed h once a task is near interpolation
# grows their scale until a step is unstable; the slow ones hold it (docs/lr_invariant.md).
PAPER_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)
INVARIANT_BETAS = PAPER_BETAS[2:]
# The lr-invariant mode (docs/lr_invariant.md) measures S in units of the reference lr and reads lambda as
# the paper's, dimensionless, so both modes share DEFAULT_S_DECAY. Its first effective lr is 1e-2 of the
# base's usual lr (1e-5 for Adam-like bases, 1e-3 for SGD): the paper's s_init at the usual lr, 1e-6 of
# it, took hundreds of steps to climb to a working lr, and 1e-3 of it trained slower than 1e-2 on every
# task for both families (bench/fast_right.py, docs/lr_invariant.md).
INVARIANT_S_INIT_FRACTION = 1e-2
# The base's usual lr: the lr-invariant mode's reference where group 0's lr is 0 when the tuner is made
# (a warmup's first lr): 1e-3 for Adam-like bases, whose updates are normalised, 0.1 for SGD.
ADAM_LIKE_LR = 1e-3
SGD_LIKE_LR = 0.1


# torch.optim bases whose update, weight decay included, is proportional to their lr whatever their other
# options (not Adagrad: its lr_decay divides by the lr; not Rprop, ASGD or Adafactor)
LR_PROPORTIONAL = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    *((torch.optim.Muon,) if hasattr(torch.optim, "Muon") else ()),
)


def usual_lr(base: type) -> float:
    """The usual lr of a base optimizer class: SGD's (gradient-sized updates) or Adam's (normalised)."""
    return SGD_LIKE_LR if issubclass(base, torch.optim.SGD) else ADAM_LIKE_LR


@dataclass(frozen=True)
class MechanicConfig:
    s_decay: Optional[float] = None  # lambda in the paper; None: 0.01
    # None: the mode's (PAPER_BETAS, INVARIANT_BETAS); a checkpoint's are kept when loaded
    betas: Optional[Tuple[float, ...]] = None
    s_init: Optional[float] = None
    eps: float = 1e-8
    store_delta: Optional[bool] = None  # None: True (Delta kept; a checkpoint's x_ref-only layout converted)
    log_every: int = 0
    variant: str = "paper"
    backend: str = "auto"
    compile: bool = False
    ref_dtype: Optional[str] = None  # None: x_ref in the parameter's dtype; "float32": fp32 for low precision
    skip_nonfinite: bool = False
    # S and lambda in units of the reference lr (group 0's when the tuner is made). None: the default,
    # lr-invariant for the paper variant; a checkpoint's mode is kept when loaded
    lr_invariant: Optional[bool] = None
    keep_workspace: Optional[bool] = None  # None: keep the step's flat buffer between steps on CPU only
    # the base's usual lr (`usual_lr`, set per base class by `mechanize`): the lr-invariant default's
    # reference where group 0's lr is 0
    usual_lr: float = ADAM_LIKE_LR
    # whether the base's update is proportional to its lr (`LR_PROPORTIONAL`, set per base class): the
    # lr-invariant mode then runs its step at a power-of-two multiple of the lr near its usual one
    base_lr_proportional: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.betas is not None:
            object.__setattr__(self, "betas", checked_betas(self.betas))
        if self.lr_invariant is not None and not isinstance(self.lr_invariant, bool):
            raise ValueError(f"lr_invariant must be None or a bool, got {self.lr_invariant!r}")
        if self.lr_invariant and self.variant != "paper":
            raise ValueError("lr_invariant=True is a form of the paper variant; use variant='paper'")
        if self.s_init is not None:
            object.__setattr__(self, "s_init", _real("s_init", self.s_init, positive=True))
        # eps > 0: 0 divides 0 by 0 at a zero gradient
        object.__setattr__(self, "eps", _real("eps", self.eps, positive=True))
        if self.s_decay is not None:
            object.__setattr__(self, "s_decay", _real("s_decay", self.s_decay))
        object.__setattr__(self, "usual_lr", _real("usual_lr", self.usual_lr, positive=True))
        log_every = self.log_every
        if isinstance(log_every, bool) or not isinstance(log_every, numbers.Integral) or log_every < 0:
            raise ValueError(
                f"log_every must be an integer >= 0, got {type(log_every).__name__} {log_every!r}"
            )
        object.__setattr__(self, "log_every", int(log_every))
        if self.ref_dtype not in (None, "float32"):
            raise ValueError(f"ref_dtype must be None or 'float32', got {self.ref_dtype!r}")
        if self.store_delta is not None and not isinstance(self.store_delta, bool):
            raise ValueError(f"store_delta must be None or a bool, got {self.store_delta!r}")
        if self.keep_workspace is not None and not isinstance(self.keep_workspace, bool):
            raise ValueError(f"keep_workspace must be None or a bool, got {self.keep_workspace!r}")
        for name in ("compile", "skip_nonfinite", "base_lr_proportional"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def for_base(self, base: type) -> MechanicConfig:
        """This config for a base optimizer class: its usual lr (the lr-invariant mode's fallback unit) and
        whether its update is proportional to its lr."""
        return replace(self, usual_lr=usual_lr(base), base_lr_proportional=issubclass(base, LR_PROPORTIONAL))

    def with_store_delta(self) -> MechanicConfig:
        """This config with `store_delta` decided (None: True, for parameters of every dtype).

        Recomputing Delta as (x - x_ref) / S loses it while S * Delta is below half an ulp of x: x then
        rounds back to x_ref, the inner product h is 0, and the scale never grows (float32 weights of
        order 1 with Adam at lr 1e-3 stall this way from the first step, since S starts at 1e-6). Kept
        as state, Delta accumulates every base update whatever x can resolve, and costs no more memory
        than x_ref, which float32/float64 parameters then do not keep (`_state.keeps_x_ref`).
        """
        return self if self.store_delta is not None else replace(self, store_delta=True)

    @property
    def invariant_by_default(self) -> bool:
        """The mode of a new tuner: `lr_invariant` as given, else lr-invariant for the paper variant."""
        return self.lr_invariant if self.lr_invariant is not None else self.variant == "paper"

    def resolved(self, invariant: bool) -> MechanicConfig:
        """This config for a tuner in the given mode: `lr_invariant` set, and `betas`, `s_init` and
        `s_decay` left at None given that mode's defaults (the variant's; in the lr-invariant mode s_init
        is a value of the effective lr, INVARIANT_S_INIT_FRACTION of the base's usual lr)."""
        s_init = INVARIANT_S_INIT_FRACTION * self.usual_lr if invariant else DEFAULT_S_INIT[self.variant]
        betas = INVARIANT_BETAS if invariant else PAPER_BETAS
        return replace(
            self,
            lr_invariant=invariant,
            betas=betas if self.betas is None else self.betas,
            s_init=s_init if self.s_init is None else self.s_init,
            s_decay=DEFAULT_S_DECAY if self.s_decay is None else self.s_decay,
        )


def checked_betas(betas: object) -> Tuple[float, ...]:
    """Mechanic's betas as a tuple of floats: a non-empty sequence of real numbers in (0, 1)."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable):
        raise ValueError(f"betas must be a sequence of real numbers, got {betas!r}")
    values = tuple(_real("every beta", b) for b in betas)
    if not values:
        raise ValueError("betas must not be empty")
    if not all(0.0 < b < 1.0 for b in values):
        raise ValueError(f"every beta must lie in (0, 1), got {values}")
    return values


def _real(name: str, value: object, positive: bool = False) -> float:
    """`value` as a float: any real number (int, float, a numpy scalar), finite, > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a real number (int, float or a numpy scalar), got {type(value).__name__} "
            f"{value!r}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not positive and number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


# Inductor options for a user's `torch.compile(opt.step, options=INDUCTOR_OPTIONS)` over many tensors.
# Every tensor's update reads the scale S and waits on the op that took the sums, so inductor's fusion
# search checks each pair of such nodes against up to 64 neighbours that never fuse; with 8 it writes the
# same code in less compile time (bench/compile_times.py). Not set by Mechanic: inductor's config is
# global, and a compiled training step holds the model's graph too.
INDUCTOR_OPTIONS: Dict[str, Any] = {"max_fusion_buffer_group_pairwise_attempts": 8}
