"""The tuner's scalar math: a pure function of (state, inner products) -> new state.

Symbols follow the paper (Cutkosky, Defazio, Mehta 2023, Algorithm 1): one tuner per beta_j, each holding
s_j (scale), r_j (reward), m_j (max |h|) and v_j (discounted sum of h^2). The total scale is S = sum_j s_j
and the parameters are x_ref + S * Delta. Everything here is O(len(betas)); the O(d) work lives in the
backends (`_foreach`, `_triton`), which hand us the four inner products in `sums`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
from torch import Tensor

from ._config import MechanicConfig

# Indices into the `sums` vector the backends return.
DELTA_GRAD, DELTA_PARAM, GRAD_SQ, PARAM_SQ = range(4)


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


def betas_tensor(cfg: MechanicConfig, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(cfg.betas, device=device, dtype=dtype)


def s_decay(cfg: MechanicConfig) -> float:
    # mechanic-pytorch holds lambda as a float32 tensor; reproduce that rounding.
    if cfg.variant == "mechanic_pytorch":
        return struct.unpack("f", struct.pack("f", cfg.s_decay))[0]
    return cfg.s_decay


def inner_product(sums: Tensor, scale: Tensor, cfg: MechanicConfig) -> Tensor:
    """h = <Delta, g_hat> with g_hat = g + lambda * S * ||g|| / (||x|| + eps) * x.

    `sums` holds <d, g>, <d, x>, ||g||^2, ||x||^2 where d = x_t - x_ref (so Delta = d / (S + eps)),
    or d = Delta itself when Delta is stored (store_delta=True).
    """
    grad_norm = sums[GRAD_SQ].sqrt()
    param_norm = sums[PARAM_SQ].sqrt()
    # scale enters in the sums' precision (float64 for float64 parameters), as in both references
    decay = s_decay(cfg) * scale.to(sums.dtype) * grad_norm / (param_norm + cfg.eps)
    h = sums[DELTA_GRAD] + decay * sums[DELTA_PARAM]
    if not cfg.store_delta:
        h = h / (scale + cfg.eps)
    return h


def update(state: TunerState, h: Tensor, betas: Tensor, cfg: MechanicConfig) -> TunerState:
    """One tuner step from the inner product h (Algorithm 1, lines for m, v, r, W, s)."""
    s, r, m, v = state
    n = len(cfg.betas)
    if cfg.variant == "paper":
        # optax.contrib.mechanize: h is clipped to the old m in the reward (authors' advice), m >= |h| + eps.
        m_new = torch.maximum(betas * m, h.abs() + cfg.eps)
        v_new = betas.square() * v + h.square()
        r_new = betas * r - torch.clamp(h, -m, m) * s
        wealth = (cfg.s_init / n) * m_new + r_new.clamp_min(0)
    else:
        # mechanic-pytorch 0.0.1, op for op (its float32 roundings included): no clip, r stored clamped.
        m_new = torch.maximum(betas * m, h.abs())
        v_new = v * betas**2 + h.square()
        r_new = (r * betas - s * h).clamp_min(0)
        wealth = m_new * cfg.s_init / n + r_new
    s_new = wealth / (v_new.sqrt() + cfg.eps)
    return TunerState(s=s_new, r=r_new, m=m_new, v=v_new)


def effective_scale(state: TunerState, cfg: MechanicConfig) -> Tensor:
    """The S that multiplies Delta: sum(s), clamped at 0 by mechanic-pytorch (the paper's s is >= 0)."""
    total = state.s.sum()
    return total.clamp_min(0) if cfg.variant == "mechanic_pytorch" else total
