"""The paper variant (lr_invariant=False) against a plain float64 loop written straight from the spec
(optax's math)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import max_rel

from mechanic_fast import mechanize

BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


def default_mode(Base, lr):
    """`reference_trajectory`'s arguments for mechanize(Base)'s lr-invariant default at base lr `lr` (its
    reference lr), in the paper's units: S = S~ / lr, so s_init / lr; the lambda term at S = 1; Delta
    recomputed without eps. The tuner's eps stays in other units, so the two agree to about 1e-5."""
    from mechanic_fast import mechanize

    s_init = mechanize(Base)._mechanic_spec.config.resolved(True).s_init
    return dict(s_init=s_init / lr, unit_decay=True, recompute_eps=0.0)


def reference_trajectory(
    problem,
    Base,
    kwargs,
    steps,
    s_decay=0.01,
    s_init=1e-6,
    eps=1e-8,
    store_delta=True,  # as mechanize's default
    make_base=None,
    frozen=(),
    after_step=None,
    gaps=None,
    recompute_eps=None,
    unit_decay=False,
):
    """Obviously-correct float64 Mechanic: Python loops, one tensor at a time, Python floats for the tuner.

    `make_base(params)` builds the base optimizer (default `Base(params, **kwargs)`); parameters whose
    index is in `frozen` never get a gradient, nor, at step t, those in `gaps(t)`. A parameter takes part
    only in the steps where it has a gradient, and then x = x_ref + S * Delta (Delta not stored:
    (x_t - x_ref) / (S_p + `recompute_eps`, default eps), S_p the S its x was last made with).
    `unit_decay`: the lambda term at S = 1, as the lr-invariant default has it (`default_mode`).
    """
    all_x = problem.params()
    base = make_base(all_x) if make_base else Base(all_x, **kwargs)
    x = [p for i, p in enumerate(all_x) if i not in frozen]
    index = [i for i in range(len(all_x)) if i not in frozen]
    n = len(BETAS)
    s, r, m, v = [s_init] * n, [0.0] * n, [0.0] * n, [0.0] * n
    x_ref = [p.detach().clone() for p in x]
    stored = [torch.zeros_like(p) for p in x]
    made_with = [s_init] * len(x)  # irrelevant before a parameter's first step (x = x_ref)
    eps_r = eps if recompute_eps is None else recompute_eps
    scales = []
    for t in range(steps):
        problem.grad_step(all_x, t)
        skipped = set(frozen) | (set(gaps(t)) if gaps else set())
        for i in skipped:
            all_x[i].grad = None
        active = [k for k, i in enumerate(index) if i not in skipped]
        with torch.no_grad():
            S = torch.tensor(s, dtype=torch.float64).sum()
            x_all = x
            x = [x_all[k] for k in active]
            g = [p.grad.clone() for p in x]
            if store_delta:
                delta = [stored[k].clone() for k in active]
            else:
                delta = [(x_all[k] - x_ref[k]) / (made_with[k] + eps_r) for k in active]
            g_norm = math.sqrt(sum((gi * gi).sum().item() for gi in g))
            x_norm = math.sqrt(sum((p * p).sum().item() for p in x))
            weight = s_decay * (1.0 if unit_decay else S)
            g_hat = [gi + weight * g_norm / (x_norm + eps) * p for gi, p in zip(g, x)]
            h = sum((d * gh).sum().item() for d, gh in zip(delta, g_hat))
            x_t = [p.clone() for p in x]
        base.step()
        with torch.no_grad():
            u = [p - xt for p, xt in zip(x, x_t)]
            for j, beta in enumerate(BETAS):
                m_new = max(beta * m[j], abs(h) + eps)
                v[j] = beta**2 * v[j] + h * h
                r[j] = beta * r[j] - min(max(h, -m[j]), m[j]) * s[j]
                m[j] = m_new
                wealth = (s_init / n) * m[j] + max(r[j], 0.0)
                s[j] = wealth / (math.sqrt(v[j]) + eps)
            S_new = torch.tensor(s, dtype=torch.float64).sum()
            for i, (k, p) in enumerate(zip(active, x)):
                new_delta = delta[i] + u[i]
                p.copy_(x_ref[k] + S_new * new_delta)
                stored[k] = new_delta
                made_with[k] = S_new.item()
            x = x_all
        scales.append(S_new.item())
        if after_step is not None:
            after_step(t)
    return all_x, scales


@pytest.mark.parametrize("store_delta", [False, True])
@pytest.mark.parametrize(
    "Base,kwargs",
    [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.Adam, dict(lr=0.01))],
    ids=["sgd_momentum", "adam"],
)
def test_paper_variant_matches_float64_reference(Base, kwargs, store_delta, problem, seed):
    steps = 50
    ref_x, ref_scales = reference_trajectory(problem, Base, kwargs, steps, store_delta=store_delta)
    x = problem.params()
    opt = mechanize(Base, store_delta=store_delta, lr_invariant=False)(x, **kwargs)
    scales = []
    for t in range(steps):
        problem.grad_step(x, t)
        opt.step()
        scales.append(
            opt.param_groups[0]["mechanic"]["s"].sum().item()
        )  # float64 state on float64 parameters
    assert ref_scales[-1] > 1e-3, (seed, ref_scales[-1])  # the tuner moved far from s_init
    for a, b in zip(scales, ref_scales):
        assert abs(a - b) <= 1e-12 * abs(b), (seed, a, b)
    for a, b in zip(x, ref_x):
        assert max_rel(a.detach(), b) < 1e-12, seed
    assert opt.mechanic_scale.dtype == torch.float32
