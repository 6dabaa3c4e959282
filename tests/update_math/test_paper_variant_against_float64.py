"""The paper variant (lr_invariant=False) against a plain float64 loop written straight from the spec
(optax's math)."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel, reference_trajectory

from mechanic_fast import mechanize


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
