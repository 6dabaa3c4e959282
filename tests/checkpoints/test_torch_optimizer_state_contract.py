"""Mechanic's state inside torch's optimizer contract: deepcopy, pickle, state-dict hooks, what torch's
load_state_dict accepts (renumbered ids, non-parameter keys), refused checkpoints that leave the
optimizer as it was, the zero-lr initialisation step, and `mechanize(instance)`
after something wrapped the step."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from helpers import assert_same_snapshot, flatten, make_problem

from mechanic_fast import is_mechanized, mechanic_scale, mechanize


def _trained(steps=6, store_delta=False, Base=torch.optim.AdamW, **kwargs):
    problem = make_problem(torch.float32, stationary=True)
    x = problem.params()
    opt = mechanize(Base, store_delta=store_delta)(x, **(kwargs or dict(lr=0.02, weight_decay=0.01)))
    for t in range(steps):
        problem.grad_step(x, t)
        opt.step()
    return problem, x, opt


def _continue(problem, x, opt, start, steps=5):
    for t in range(start, start + steps):
        problem.grad_step(x, t)
        opt.step()
    return [p.detach().clone() for p in x], opt.mechanic_scale.clone()


def _assert_same_sd(a, b):
    assert_same_snapshot(flatten(a), flatten(b))


# ------------------------------------------------------------------------------- copy and pickle
@pytest.mark.parametrize("store_delta", [False, True])
def test_deepcopy_continues_identically(store_delta):
    problem, x, opt = _trained(store_delta=store_delta)
    model_copy, opt_copy = copy.deepcopy((x, opt))  # the copy's parameters are the copied ones
    assert type(opt_copy) is type(opt) and is_mechanized(opt_copy)
    key = "mechanic_delta" if store_delta else "mechanic_x_ref"
    assert opt_copy.state[model_copy[0]][key].data_ptr() != opt.state[x[0]][key].data_ptr()
    ref = _continue(problem, x, opt, 6)
    got = _continue(problem, model_copy, opt_copy, 6)
    assert torch.equal(ref[1], got[1]) and all(torch.equal(a, b) for a, b in zip(ref[0], got[0]))


def test_pickle_and_torch_save_of_the_optimizer_round_trip():
    problem, x, opt = _trained()
    buf = io.BytesIO()
    torch.save((x, opt), buf)  # pickles the optimizer object itself
    buf.seek(0)
    x2, opt2 = torch.load(buf, weights_only=False)
    x3, opt3 = pickle.loads(pickle.dumps((x, opt)))
    ref = _continue(problem, x, opt, 6)
    for xs, o in ((x2, opt2), (x3, opt3)):
        got = _continue(problem, xs, o, 6)
        assert torch.equal(ref[1], got[1]) and all(torch.equal(a, b) for a, b in zip(ref[0], got[0]))


# ------------------------------------------------------------------------------------------ hooks
def test_state_dict_hooks_see_and_can_replace_mechanics_state():
    problem, x, opt = _trained()
    seen = []
    opt.register_state_dict_post_hook(
        lambda o, sd: seen.append((sd["param_groups"][0]["mechanic"], sd["state"][0]))
    )
    other_problem, y, other = _trained(steps=9)
    replacement = other.state_dict()
    opt.register_load_state_dict_pre_hook(lambda o, sd: replacement)
    loaded = []
    opt.register_load_state_dict_post_hook(lambda o: loaded.append(o.mechanic_scale.clone()))
    opt.load_state_dict(opt.state_dict())  # the pre-hook swaps in the other run's checkpoint
    assert len(seen) == 1 and len(loaded) == 1
    assert "s" in seen[0][0] and "mechanic_x_ref" in seen[0][1]
    # base state and Mechanic state both come from the replacement
    assert torch.equal(opt.mechanic_scale, other.mechanic_scale) and torch.equal(
        loaded[0], other.mechanic_scale
    )
    for p, q in zip(x, y):
        assert torch.equal(opt.state[p]["exp_avg"], other.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["mechanic_x_ref"], other.state[q]["mechanic_x_ref"])


# ------------------------------------------------------------------------- what torch accepts
def test_renumbered_ids_and_non_parameter_keys_load_as_in_torch():
    problem, x, opt = _trained()
    opt.state["my_counter"] = 3
    sd = copy.deepcopy(opt.state_dict())  # torch's load keeps tensors of the right dtype: not shared with opt
    renumber = {i: 1000 + 7 * i for i in range(len(x))}
    sd = {
        "state": {renumber.get(k, k): v for k, v in sd["state"].items()},
        "param_groups": [{**g, "params": [renumber[i] for i in g["params"]]} for g in sd["param_groups"]],
    }
    problem2 = problem
    x2 = [torch.nn.Parameter(p.detach().clone()) for p in x]
    opt2 = mechanize(torch.optim.AdamW, store_delta=False)(x2, lr=0.02, weight_decay=0.01)
    opt2.load_state_dict(sd)
    assert opt2.state["my_counter"] == 3
    ref = _continue(problem, x, opt, 6)
    got = _continue(problem2, x2, opt2, 6)
    assert torch.equal(ref[1], got[1]) and all(torch.equal(a, b) for a, b in zip(ref[0], got[0]))


def test_float64_checkpoint_into_float32_parameters_gives_a_float32_tuner():
    problem = make_problem(torch.float64, stationary=True)
    x = problem.params()
    opt = mechanize(torch.optim.Adam)(x, lr=0.01)
    for t in range(3):
        problem.grad_step(x, t)
        opt.step()
    assert opt.param_groups[0]["mechanic"]["s"].dtype == torch.float64
    y = [torch.nn.Parameter(p.detach().float()) for p in x]
    opt32 = mechanize(torch.optim.Adam)(y, lr=0.01)
    opt32.load_state_dict(opt.state_dict())
    assert opt32.param_groups[0]["mechanic"]["s"].dtype == torch.float32
    assert opt32.state[y[0]]["mechanic_delta"].dtype == torch.float32


def test_a_parameter_listed_twice_loads_its_own_checkpoint_and_counts_once():
    """torch's SGD steps a twice-listed parameter twice (as lr 0.2 would once); Mechanic's inner
    products count it once, so the run equals the single listing at twice the lr."""
    w = torch.nn.Parameter(torch.randn(50))
    v = torch.nn.Parameter(w.detach().clone())
    target = torch.randn(50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate
        # the paper's math, where S is in units of whatever lr is given: lr 0.1 twice is lr 0.2 once
        twice = mechanize(torch.optim.SGD, lr_invariant=False)([w, w], lr=0.1)
    once = mechanize(torch.optim.SGD, lr_invariant=False)([v], lr=0.2)
    for o, p in ((twice, w), (once, v)):
        for _ in range(20):
            p.grad = p.detach() - target
            o.step()
    assert once.mechanic_scale > 1e-4
    torch.testing.assert_close(twice.mechanic_scale, once.mechanic_scale, rtol=1e-4, atol=0)
    twice.load_state_dict(twice.state_dict())


def test_third_party_base_may_reuse_a_torch_state_name_with_another_shape():
    """timm's NovoGrad keeps a 0-d exp_avg_sq per layer; only torch's own optimizers are held to
    torch's shapes."""

    class LayerNorm2ndMoment(torch.optim.Optimizer):
        def __init__(self, params, lr=0.01):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if len(state) == 0:
                        state["exp_avg_sq"] = torch.zeros(())
                    state["exp_avg_sq"].mul_(0.9).add_(p.grad.square().sum(), alpha=0.1)
                    p.add_(p.grad / (state["exp_avg_sq"].sqrt() + 1e-8), alpha=-group["lr"])

    _, x, opt = _trained(Base=LayerNorm2ndMoment, lr=0.01)
    y = [torch.nn.Parameter(p.detach().clone()) for p in x]
    fresh = mechanize(LayerNorm2ndMoment)(y, lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[y[0]]["exp_avg_sq"].shape == ()


# ---------------------------------------------------------------- torch's zero-lr initialisation step
@pytest.mark.parametrize(
    "Base,kwargs", [(torch.optim.SGD, dict(lr=0.05)), (torch.optim.AdamW, dict(lr=0.02))]
)
def test_zero_grad_zero_lr_step_changes_nothing_of_mechanic(Base, kwargs):
    problem, x, opt = _trained(Base=Base, **kwargs)
    params_before = [p.detach().clone() for p in x]
    mechanic_before = copy.deepcopy(
        {"tuner": opt.param_groups[0]["mechanic"], "x_ref": [opt.state[p]["mechanic_x_ref"] for p in x]}
    )
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in x:
        p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    assert all(torch.equal(a, b) for a, b in zip(x, params_before))
    _assert_same_sd(
        mechanic_before,
        {"tuner": opt.param_groups[0]["mechanic"], "x_ref": [opt.state[p]["mechanic_x_ref"] for p in x]},
    )


def test_zero_lr_step_on_a_fresh_optimizer_creates_state_without_moving():
    problem = make_problem(torch.float32)
    x = problem.params()
    before = [p.detach().clone() for p in x]
    opt = mechanize(torch.optim.SGD)(x, lr=0.0)
    for p in x:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(x, before))
    assert all(torch.equal(opt.state[p]["mechanic_delta"], torch.zeros_like(p)) for p in x)
    assert opt.param_groups[0]["mechanic"]["step"].item() == 0


# --------------------------------------------------------------------- mechanize(instance) wrapped
def test_mechanize_instance_after_an_lr_scheduler_mechanizes_the_step_that_runs():
    problem = make_problem(torch.float32, stationary=True)
    x, y = problem.params(), problem.params()
    opt = torch.optim.AdamW(x, lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # wraps opt.step on the instance
    mechanize(opt)
    direct = mechanize(torch.optim.AdamW)(y, lr=0.02)
    direct_sched = torch.optim.lr_scheduler.StepLR(direct, step_size=3, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for t in range(8):
            for params, o, s in ((x, opt, sched), (y, direct, direct_sched)):
                problem.grad_step(params, t)
                o.step()
                s.step()
    assert opt.param_groups[0]["mechanic"]["step"].item() == 8
    assert torch.equal(mechanic_scale(opt), direct.mechanic_scale)
    assert all(torch.equal(a, b) for a, b in zip(x, y))


def test_mechanize_instance_refuses_a_foreign_step_wrapper():
    x = [torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.SGD(x, lr=0.1)
    bare = opt.step
    opt.step = lambda closure=None: bare(closure)
    with pytest.raises(TypeError, match="replaced on the instance"):
        mechanize(opt)
    assert not is_mechanized(opt) and type(opt) is torch.optim.SGD


@pytest.mark.parametrize("saved_with", [False, True])
def test_default_store_delta_loads_either_layout(saved_with):
    """store_delta left at None loads either layout into Delta alone (an x_ref-only checkpoint is
    converted, the run goes on from the same point); the same explicit value resumes bit for bit, and
    another is refused."""
    problem, x, opt = _trained(store_delta=saved_with)
    sd = copy.deepcopy(opt.state_dict())
    y = [p.detach().clone().requires_grad_() for p in x]
    z = [p.detach().clone().requires_grad_() for p in x]
    resumed = mechanize(torch.optim.AdamW)(y, lr=0.02, weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(sd))  # torch's load may alias the base's tensors: one each
    assert resumed.param_groups[0]["mechanic"]["store_delta"] is True
    assert all("mechanic_x_ref" not in resumed.state[p] for p in y)
    same = mechanize(torch.optim.AdamW, store_delta=saved_with)(z, lr=0.02, weight_decay=0.01)
    same.load_state_dict(copy.deepcopy(sd))
    expected = _continue(problem, x, opt, 6)
    got, got_same = _continue(problem, y, resumed, 6), _continue(problem, z, same, 6)
    assert all(torch.equal(a, b) for a, b in zip(expected[0], got_same[0]))
    assert torch.equal(expected[1], got_same[1])
    for a, b in zip(expected[0], got[0]):  # Delta from x_ref: the same run to rounding
        torch.testing.assert_close(a, b, rtol=0 if saved_with else 1e-5, atol=0 if saved_with else 1e-6)
    other = mechanize(torch.optim.AdamW, store_delta=not saved_with)(y, lr=0.02)
    with pytest.raises(ValueError, match="store_delta"):
        other.load_state_dict(sd)
