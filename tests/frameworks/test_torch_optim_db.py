"""Conformance over torch's own `optim_db` (torch.testing._internal.common_optimizers): every
OptimizerInfo's CPU configs, float32 and float64, mechanized, held to the contracts any torch optimizer
keeps. Mechanic changes the trajectory on purpose (it rescales every base update), so the contracts
compare mechanized runs with each other, never with the bare optimizer, except for progress.

LBFGS and SparseAdam are refused by `mechanize` (tested here too); configs with differentiable=True
are refused at construction (tested in update_math/test_models_and_options_torch_accepts.py).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

pytest.importorskip("expecttest")  # common_optimizers imports torch's test utilities, which need it
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

from mechanic_fast import mechanize  # noqa: E402

REFUSED = (torch.optim.LBFGS, torch.optim.SparseAdam)
DTYPES = (torch.float32, torch.float64)


def _cases():
    for info in optim_db:
        if info.optim_cls in REFUSED:
            continue
        for dtype in DTYPES:
            for inp in info.optim_inputs_func(device="cpu", dtype=dtype):
                if inp.kwargs.get("differentiable"):
                    continue
                name = f"{info.optim_cls.__name__}-{inp.desc}-{str(dtype)[6:]}".replace(" ", "_")
                yield pytest.param(info, dtype, dict(inp.kwargs), id=name)


CASES = list(_cases())


class Problem:
    """A two-layer regression with 2-D weights only (Muon takes nothing else); fresh data per seed."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.start = [
            torch.randn(6, 4, generator=gen, dtype=dtype),
            torch.randn(3, 6, generator=gen, dtype=dtype),
        ]
        self.x = torch.randn(32, 4, generator=gen, dtype=dtype)
        self.y = torch.randn(32, 3, generator=gen, dtype=dtype)

    def params(self):
        return [t.clone().requires_grad_() for t in self.start]

    def loss(self, params):
        w1, w2 = params
        return ((torch.tanh(self.x @ w1.t()) @ w2.t() - self.y) ** 2).mean()


def _kwargs_copy(kwargs):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}


def _train(opt, problem, params, steps, sign=1.0, closure=False):
    losses = []
    for _ in range(steps):
        if closure:

            def fn():
                opt.zero_grad()
                loss = sign * problem.loss(params)
                loss.backward()
                return loss

            losses.append(opt.step(fn).item())
        else:
            opt.zero_grad()
            loss = sign * problem.loss(params)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _tols(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


# Bases whose own foreach and for-loop runs differ beyond float64 rounding: torch's ASGD keeps eta and
# mu as float32 scalars, and its two implementations round them differently (bare runs differ by 3e-8
# relative after 20 float64 steps); Mechanic is held to float32 tolerances there.
LOOSE_IMPLS = (torch.optim.ASGD,)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own notices (Adafactor's, tensor lr with foreach=False)
        yield


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_progress(info, dtype, kwargs):
    """Loss falls on a simple problem with the config's options (under maximize, -loss is maximized)."""
    problem = Problem(dtype, seed=1)
    params = problem.params()
    opt = mechanize(info.optim_cls)(params, **_kwargs_copy(kwargs))
    start = problem.loss(params).item()
    _train(opt, problem, params, 60, sign=-1.0 if kwargs.get("maximize") else 1.0)
    end = problem.loss(params).item()
    assert end < start, (start, end)
    assert opt.mechanic_scale > 1e-4  # the scale grew from s_init = 1e-6 (Delta recomputed in float32 stalls)


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_maximize_f_equals_minimize_minus_f(info, dtype, kwargs):
    if "maximize" not in inspect.signature(info.optim_cls.__init__).parameters:
        pytest.skip(f"{info.optim_cls.__name__} has no maximize option")
    kwargs = {k: v for k, v in kwargs.items() if k != "maximize"}
    problem = Problem(dtype, seed=2)
    runs = []
    for maximize in (False, True):
        params = problem.params()
        opt = mechanize(info.optim_cls)(params, maximize=maximize, **_kwargs_copy(kwargs))
        _train(opt, problem, params, 20, sign=-1.0 if maximize else 1.0)
        runs.append((params, opt.mechanic_scale))
    (p_min, s_min), (p_max, s_max) = runs
    torch.testing.assert_close(p_max, p_min, **_tols(dtype))
    torch.testing.assert_close(s_max, s_min, **_tols(dtype))


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_foreach_forloop_fused_agree(info, dtype, kwargs):
    impls = [dict(foreach=False)]
    if "foreach" in info.supported_impls:
        impls.append(dict(foreach=True))
    if "fused" in info.supported_impls and "cpu" in info.supports_fused_on:
        impls.append(dict(fused=True))
    if len(impls) == 1:
        pytest.skip(f"{info.optim_cls.__name__} has one implementation")
    problem = Problem(dtype, seed=3)
    results = []
    for impl in impls:
        params = problem.params()
        try:
            opt = mechanize(info.optim_cls)(params, **_kwargs_copy(kwargs), **impl)
        except (RuntimeError, ValueError) as err:  # torch's own refusal of this combination
            assert "fused" in impl, err
            continue
        _train(opt, problem, params, 20)
        results.append((impl, params, opt.mechanic_scale))
    _, ref_params, ref_scale = results[0]
    tols = _tols(torch.float32 if info.optim_cls in LOOSE_IMPLS else dtype)
    for impl, params, scale in results[1:]:
        torch.testing.assert_close(params, ref_params, **tols, msg=lambda m, impl=impl: f"{impl}: {m}")
        torch.testing.assert_close(scale, ref_scale, **tols)


def _round_trip(Opt, problem, kwargs):
    """(original, loaded copy) after 6 steps, a state_dict round trip and 6 more steps each."""
    params = problem.params()
    opt = Opt(params, **_kwargs_copy(kwargs))
    _train(opt, problem, params, 6)
    saved = copy.deepcopy(opt.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    twin = Opt(twins, **_kwargs_copy(kwargs))
    twin.load_state_dict(saved)
    _train(opt, problem, params, 6)
    _train(twin, problem, twins, 6)
    return (params, opt), (twins, twin)


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_state_dict_round_trip_continues_identically(info, dtype, kwargs):
    (params, opt), (twins, twin) = _round_trip(mechanize(info.optim_cls), Problem(dtype, seed=4), kwargs)
    (bare, _), (bare_twins, _) = _round_trip(info.optim_cls, Problem(dtype, seed=4), kwargs)
    if all(torch.equal(a, b) for a, b in zip(bare, bare_twins)):
        assert all(torch.equal(a, b) for a, b in zip(params, twins))
        assert torch.equal(opt.mechanic_scale, twin.mechanic_scale)
    else:
        # torch's own round trip is not exact here (NAdam: load_state_dict casts its float32 mu_product
        # to float64 parameters' dtype), so neither is ours; it must still be as close as rounding
        torch.testing.assert_close(twins, params, **_tols(dtype))
        torch.testing.assert_close(twin.mechanic_scale, opt.mechanic_scale, **_tols(dtype))


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_parameter_without_gradient_is_untouched(info, dtype, kwargs):
    problem = Problem(dtype, seed=5)
    params = problem.params()
    idle = torch.randn(5, 5, dtype=dtype, requires_grad=True)
    before = idle.detach().clone()
    opt = mechanize(info.optim_cls)([*params, idle], **_kwargs_copy(kwargs))
    _train(opt, problem, params, 10)
    assert torch.equal(idle.detach(), before)
    assert idle not in opt.state or "mechanic_delta" not in opt.state[idle]


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_closure_step_equals_plain_step(info, dtype, kwargs):
    """step(closure) returns the closure's loss and takes the same step as backward() then step()."""
    problem = Problem(dtype, seed=6)
    Opt = mechanize(info.optim_cls)
    runs = []
    for closure in (False, True):
        params = problem.params()
        opt = Opt(params, **_kwargs_copy(kwargs))
        runs.append((_train(opt, problem, params, 10, closure=closure), params))
    (losses, params), (closure_losses, closure_params) = runs
    assert losses == closure_losses
    assert all(torch.equal(a, b) for a, b in zip(params, closure_params))


@pytest.mark.parametrize("info,dtype,kwargs", CASES)
def test_param_groups_keep_their_own_options(info, dtype, kwargs):
    """A group with lr 0 beside the config's group: where the bare optimizer leaves its parameter where
    it is, so does Mechanic (Delta stays 0, so no change of S moves it; Rprop's lr is only its initial
    step size, clamped below at 1e-6, so there it moves), while the other group trains."""
    problem = Problem(dtype, seed=7)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    runs = []
    for Opt in (info.optim_cls, mechanize(info.optim_cls)):
        w1, w2 = problem.params()
        groups = [{"params": [w1]}, {"params": [w2], **_kwargs_copy(kwargs), "lr": 0.0}]
        opt = Opt(groups, **_kwargs_copy(kwargs))
        start = problem.loss([w1, w2]).item()
        _train(opt, problem, [w1, w2], 40, sign=sign)
        runs.append((torch.equal(w2.detach(), problem.start[1]), start, problem.loss([w1, w2]).item()))
    (bare_kept, _, _), (kept, start, end) = runs
    assert kept == bare_kept
    assert end < start, (start, end)
