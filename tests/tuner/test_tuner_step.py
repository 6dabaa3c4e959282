"""`tuner.step`, the scalar math alone: a pure function, Algorithm 1 of the paper (optax's form) checked
against a plain Python float64 loop on fresh random inner products, the lr-invariant mode's units, and
the overflow guard."""

from __future__ import annotations

import math

import pytest
import torch

from mechanic_fast import tuner
from mechanic_fast._config import MechanicConfig


def _cfg(**options):
    return MechanicConfig(**options).resolved(options.get("lr_invariant", False))


def _random_sums(gen, steps):
    """Inner products of a plausible run: <Delta, g> of either sign, <Delta, x>, ||g||^2, ||x||^2 > 0."""
    return [
        torch.tensor(
            [
                torch.randn((), generator=gen, dtype=torch.float64).item(),
                torch.randn((), generator=gen, dtype=torch.float64).item(),
                torch.rand((), generator=gen, dtype=torch.float64).item() + 0.1,
                torch.rand((), generator=gen, dtype=torch.float64).item() + 1.0,
            ],
            dtype=torch.float64,
        )
        for _ in range(steps)
    ]


def _reference(sums_seq, cfg):
    """Algorithm 1 per beta in Python floats (optax.contrib.mechanize: h clipped to the old m in the
    reward, m >= |h| + eps, Delta stored): the sequence of S."""
    n = len(cfg.betas)
    s, r, m, v = [cfg.s_init] * n, [0.0] * n, [0.0] * n, [0.0] * n
    scales = []
    for sums in sums_seq:
        dg, dx, gg, xx = (float(t) for t in sums)
        total = sum(s)
        h = dg + cfg.s_decay * total * math.sqrt(gg) / (math.sqrt(xx) + cfg.eps) * dx
        for j, beta in enumerate(cfg.betas):
            m_new = max(beta * m[j], abs(h) + cfg.eps)
            v[j] = beta**2 * v[j] + h * h
            r[j] = beta * r[j] - max(-m[j], min(h, m[j])) * s[j]
            m[j] = m_new
            s[j] = ((cfg.s_init / n) * m[j] + max(r[j], 0.0)) / (math.sqrt(v[j]) + cfg.eps)
        scales.append(sum(s))
    return scales


def test_step_is_a_pure_function_of_state_and_sums(seed):
    cfg = _cfg(store_delta=True)
    const = tuner.constants(cfg, torch.device("cpu"), torch.float64)
    state = tuner.initial_state(cfg, torch.device("cpu"), torch.float64)
    sums = _random_sums(torch.Generator().manual_seed(seed), 1)[0]
    before = [t.clone() for t in (*state, sums)]
    first = tuner.step(state, sums, const, cfg)
    again = tuner.step(state, sums, const, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, (*state, sums))), "an input was changed"
    assert all(torch.equal(a, b) for a, b in zip(torch.cat(first[0]), torch.cat(again[0])))


@pytest.mark.parametrize("s_decay", [0.0, 0.01, 1.0])
def test_paper_step_is_algorithm_1(s_decay, seed):
    cfg = _cfg(store_delta=True, s_decay=s_decay)
    const = tuner.constants(cfg, torch.device("cpu"), torch.float64)
    state = tuner.initial_state(cfg, torch.device("cpu"), torch.float64)
    sums_seq = _random_sums(torch.Generator().manual_seed(seed), 30)
    expected = _reference(sums_seq, cfg)
    for t, sums in enumerate(sums_seq):
        state, scale, scale_old, _ = tuner.step(state, sums, const, cfg)
        assert math.isclose(float(scale), expected[t], rel_tol=1e-12), (seed, t)
        if t:
            assert math.isclose(float(scale_old), expected[t - 1], rel_tol=1e-12), (seed, t)


@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e4])
def test_invariant_mode_measures_delta_in_units_of_the_reference_lr(factor, seed):
    """Delta and the reference lr scaled together by any factor: the same tuner state, and the returned
    scales divided by it (a base whose update is proportional to lr then takes the same effective step)."""
    cfg = _cfg(store_delta=True, lr_invariant=True)
    const = tuner.constants(cfg, torch.device("cpu"), torch.float64)
    scaled_delta = torch.tensor([factor, factor, 1.0, 1.0], dtype=torch.float64)
    state_a = state_b = tuner.initial_state(cfg, torch.device("cpu"), torch.float64)
    for sums in _random_sums(torch.Generator().manual_seed(seed), 20):
        state_a, *scales_a = tuner.step(state_a, sums, const, cfg, lr_ref=1e-3)
        state_b, *scales_b = tuner.step(state_b, sums * scaled_delta, const, cfg, lr_ref=1e-3 * factor)
        # to rounding: h is formed from scaled operands; a reward r that crosses 0 is compared absolutely
        a, b = torch.cat(state_a), torch.cat(state_b)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13 * float(a.abs().max()), msg=f"seed {seed}")
        for a, b in zip(scales_a, scales_b):
            torch.testing.assert_close(b * factor, a, rtol=1e-10, atol=0, msg=f"seed {seed}")


def test_sums_that_overflow_leave_the_tuner_as_it_was():
    cfg = _cfg(store_delta=True)
    const = tuner.constants(cfg, torch.device("cpu"), torch.float32)
    state = tuner.initial_state(cfg, torch.device("cpu"), torch.float32)
    state, *_ = tuner.step(state, torch.tensor([0.5, 0.1, 1.0, 1.0]), const, cfg)
    new, scale, scale_old, _ = tuner.step(state, torch.tensor([1e30, 0.0, float("inf"), 1.0]), const, cfg)
    assert all(torch.equal(a, b) for a, b in zip(new, state))
    assert torch.equal(scale, scale_old) and torch.isfinite(scale)
