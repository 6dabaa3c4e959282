"""The tuner's scalar math: a pure function of (state, inner products) -> new state.

Symbols follow the paper (Cutkosky, Defazio, Mehta 2023, Algorithm 1): one tuner per beta_j, each holding
s_j (scale), r_j (reward), m_j (max |h|) and v_j (discounted sum of h^2). The total scale is S = sum_j s_j
and the parameters are x_ref + S * Delta. Everything here is O(len(betas)); the O(d) work lives in the
backends (`_foreach`, `_triton`), which hand us the four inner products in `sums`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from ._config import MechanicConfig


class TunerState(NamedTuple):
    s: Tensor  # s_j, per-beta scale
    r: Tensor  # r_j, reward
    m: Tensor  # m_j, running max of |h|
    v: Tensor  # v_j, discounted sum of h^2


def state_dtype(cfg: MechanicConfig, param_dtypes: set[torch.dtype]) -> torch.dtype:
    """float32, except float64 for the paper variant on float64 parameters (so it is float64-exact).

    The mechanic_pytorch variant always keeps float32 state, as mechanic-pytorch does.
    """
    if cfg.variant == "paper" and torch.float64 in param_dtypes:
        return torch.float64
    return torch.float32


def initial_state(cfg: MechanicConfig, device: torch.device, dtype: torch.dtype) -> TunerState:
    n = len(cfg.betas)
    zeros = torch.zeros(n, device=device, dtype=dtype)
    if cfg.variant == "paper":  # optax: s starts at s_init, m at 0
        return TunerState(s=torch.full_like(zeros, cfg.s_init), r=zeros, m=zeros.clone(), v=zeros.clone())
    # mechanic-pytorch: s starts at 0 and m at 1e-6
    return TunerState(s=zeros, r=zeros.clone(), m=torch.full_like(zeros, 1e-6), v=zeros.clone())


class Constants(NamedTuple):
    """Per-run constants kept on the device (building them per step would copy from the host)."""

    betas: Tensor
    betas_sq: Tensor


def constants(cfg: MechanicConfig, device: torch.device, dtype: torch.dtype) -> Constants:
    betas = torch.tensor(cfg.betas, device=device, dtype=dtype)
    return Constants(betas=betas, betas_sq=betas**2)


def s_decay(cfg: MechanicConfig) -> float:
    # mechanic-pytorch holds lambda as a float32 tensor; reproduce that rounding.
    if cfg.variant == "mechanic_pytorch":
        return struct.unpack("f", struct.pack("f", cfg.s_decay))[0]
    return cfg.s_decay


def inner_product(sums: Tensor, scale: Tensor, cfg: MechanicConfig, lr_ref: float = 1.0) -> Tensor:
    """h = <Delta, g_hat> with g_hat = g + lambda * S * ||g|| / (||x|| + eps) * x.

    `sums` holds <d, g>, <d, x>, ||g||^2, ||x||^2 where d = x_t - x_ref (so Delta = d / (S + eps)),
    or d = Delta itself when Delta is stored (store_delta=True).

    With lr_invariant, `scale` is the tuner's S~ = S * lr_ref and Delta~ = Delta / lr_ref: for a base
    whose update is proportional to lr, both and so h are the same whatever the lr's overall size. There
    the S in g_hat is read as the paper's, a multiple of a well-chosen lr, measured against the tuner's own
    choice: S = 1, so that lambda is dimensionless and the same for every base and lr.
    """
    delta_grad, delta_param, grad_sq, param_sq = sums.unbind()
    # scale enters in the sums' precision (float64 for float64 parameters), as in both references
    weight = s_decay(cfg) if cfg.lr_invariant else s_decay(cfg) * scale.to(sums.dtype)
    decay = weight * grad_sq.sqrt() / (param_sq.sqrt() + cfg.eps)
    h = delta_grad + decay * delta_param
    if not cfg.store_delta:
        # Delta = d / (S + eps) as optax has it; Delta~ = d / S~ in the lr-invariant mode (`recompute_denom`)
        return h / recompute_denom(scale, cfg)
    return h / lr_ref if cfg.lr_invariant else h


def recompute_denom(scale: Tensor, cfg: MechanicConfig) -> Tensor:
    """What x - x_ref is divided by to recover Delta when it is not stored, in the tuner's units.

    The paper and optax divide by S + eps; the lr-invariant mode by S~ itself: S~ is a value of the
    effective lr, which can be of the order of eps (an s_init of 1e-9 would be shrunk 10x), and eps in those
    units would break the invariance. S~ > 0 there (s_init > 0 and m >= eps keep every s_j > 0); the clamp
    only keeps an underflowed S~ (x = x_ref, so 0 / tiny = 0) finite."""
    if cfg.lr_invariant:
        return scale.clamp_min(torch.finfo(scale.dtype).tiny)
    return scale + cfg.eps


def update(state: TunerState, h: Tensor, const: Constants, cfg: MechanicConfig) -> TunerState:
    """One tuner step from the inner product h (Algorithm 1, lines for m, v, r, W, s)."""
    s, r, m, v = state
    betas, betas_sq = const
    n = len(cfg.betas)
    if cfg.variant == "paper":
        # optax.contrib.mechanize: h is clipped to the old m in the reward (authors' advice), m >= |h| + eps.
        m_new = torch.maximum(betas * m, h.abs() + cfg.eps)
        v_new = betas_sq * v + h * h
        r_new = betas * r - torch.clamp(h, -m, m) * s
        wealth = (cfg.s_init / n) * m_new + r_new.clamp_min(0)
    else:
        # mechanic-pytorch 0.0.1, op for op (its float32 roundings included): no clip, r stored clamped.
        m_new = torch.maximum(betas * m, h.abs())
        v_new = v * betas_sq + h.square()
        r_new = (r * betas - s * h).clamp_min(0)
        wealth = m_new * cfg.s_init / n + r_new
    s_new = wealth / (v_new.sqrt() + cfg.eps)
    return TunerState(s=s_new, r=r_new, m=m_new, v=v_new)


def effective_scale(state: TunerState, cfg: MechanicConfig) -> Tensor:
    """The S that multiplies Delta: sum(s), clamped at 0 by mechanic-pytorch (the paper's s is >= 0)."""
    total = state.s.sum()
    return total.clamp_min(0) if cfg.variant == "mechanic_pytorch" else total


def step(
    state: TunerState, sums: Tensor, const: Constants, cfg: MechanicConfig, lr_ref: float = 1.0
) -> Tuple[TunerState, Tensor, Tensor, Tensor]:
    """The whole scalar part of a Mechanic step: (state, inner products) -> (new state, S_new, S_old,
    denom).

    S_new multiplies Delta + u in the parameter update, S_old the Delta it replaces (x_ref not kept);
    S_old + eps (lr-invariant: S_old, `recompute_denom`) divides x_t - x_ref into Delta (Delta not stored).
    With lr_invariant the tuner runs in units of the reference lr (S~ = S * lr_ref), and the scales
    returned are in the parameters' units: S~_new / lr_ref, S~_old / lr_ref and `recompute_denom` / lr_ref.
    """
    scale_old = state.s.sum()
    new = update(state, inner_product(sums, scale_old, cfg, lr_ref), const, cfg)
    # A step whose inner products overflow (finite float32 gradients of ~1e20: ||g||^2 > 3.4e38) or whose
    # h^2 does leaves the tuner as it was, decided on the device: x then takes the base's step at the
    # current scale, finite wherever the base's is.
    finite = torch.isfinite(torch.cat(new)).all()
    new = TunerState(*(torch.where(finite, a, b) for a, b in zip(new, state)))
    applied = effective_scale(state, cfg)  # the S that made x_t from Delta
    denom = recompute_denom(scale_old, cfg)
    if cfg.lr_invariant:
        return new, effective_scale(new, cfg) / lr_ref, applied / lr_ref, denom / lr_ref
    return new, effective_scale(new, cfg), applied, denom
