"""variant="mechanic_pytorch" reproduces the installed mechanic-pytorch 0.0.1, to float64 rounding.

Where that package differs from the paper variant (optax.contrib.mechanize, our default), each
difference being reproduced here:

1. s starts at 0 (paper: s_init in every entry) and m at 1e-6 (paper: 0); default s_init is 1e-8.
2. No clipping of h in the reward (paper: r uses clamp(h, -m_old, m_old)).
3. m = max(beta*m, |h|) (paper: max(beta*m, |h| + eps)).
4. r = max(beta*r - s*h, 0) is stored clamped (paper stores r unclamped, clamps only inside W).
5. The s_decay term and the parameter norm use the parameters *after* the base step (paper: x_t).
6. x = x_ref + Delta * max(sum(s), 0) (paper: no clamp; sum(s) >= 0 there anyway).
7. Its tuner state and the constants s_decay, s_init, betas are float32 tensors even for float64
   parameters, so h is rounded to float32 inside the state update, s_decay is float32(0.01), and
   S + eps is formed in float32.
8. With store_delta=True, Delta is state (starting at 0) that accumulates the base updates, instead of
   being recomputed as (x_t - x_ref) / (S + eps).
9. x_ref is taken *after* the first base step's bookkeeping, from the values before it (same x_t).
"""

from __future__ import annotations

import mechanic_pytorch
import pytest
import torch
from helpers import max_rel, run

from mechanic_fast import is_mechanized, mechanize

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adamw_wd": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
}


@pytest.mark.parametrize("store_delta", [False, True])
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_mechanic_pytorch(base, store_delta, problem, seed):
    Base, kwargs = BASES[base]
    ref_params, ref_opt = run(
        lambda ps: mechanic_pytorch.mechanize(Base, store_delta=store_delta)(ps, **kwargs), problem, 60
    )
    ours_params, ours_opt = run(
        lambda ps: mechanize(Base, store_delta=store_delta, variant="mechanic_pytorch")(ps, **kwargs),
        problem,
        60,
    )
    ref_scale = ref_opt.state["_mechanic"]["s"].sum()  # float32, as it uses it
    ours_scale = ours_opt.mechanic_scale.double()
    # the tuner really moved: the scale grew by orders of magnitude from its start
    assert ref_scale > 1e-4, (seed, ref_scale)
    assert max_rel(ours_scale, ref_scale) < 1e-9, (seed, ours_scale, ref_scale)
    for a, b in zip(ours_params, ref_params):
        assert a.dtype == torch.float64
        assert max_rel(a.detach(), b.detach()) < 1e-9, seed
    assert is_mechanized(ours_opt) and isinstance(ours_opt, Base)
    assert mechanic_pytorch.is_mechanized(ref_opt)


def test_paper_variant_differs_from_mechanic_pytorch(problem):
    """The two variants are different algorithms (guards against one silently aliasing the other)."""
    a, _ = run(lambda ps: mechanize(torch.optim.SGD, s_init=1e-8)(ps, lr=0.05), problem, 20)
    b, _ = run(lambda ps: mechanize(torch.optim.SGD, variant="mechanic_pytorch")(ps, lr=0.05), problem, 20)
    assert max(max_rel(x.detach(), y.detach()) for x, y in zip(a, b)) > 1e-6
