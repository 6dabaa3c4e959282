"""Drop-in compatibility: param groups, frozen parameters, closures, schedulers, every torch base
optimizer (including foreach / fused implementations) and optimizer step hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import max_rel, reference_trajectory
from torch.optim.optimizer import register_optimizer_step_post_hook

from mechanic_fast import Mechanic, is_mechanized, mechanize


def _fused_ok(Base) -> bool:
    try:
        Base([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


BASES = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.05)),
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (torch.optim.RMSprop, dict(lr=0.01)),
    (torch.optim.Adagrad, dict(lr=0.1)),
    (torch.optim.NAdam, dict(lr=0.01)),
    (torch.optim.RAdam, dict(lr=0.01)),
    (torch.optim.Adamax, dict(lr=0.01)),
]
CASES = []
for Base, kwargs in BASES:
    for impl in ("default", "foreach", "fused"):
        if impl == "fused" and not _fused_ok(Base):
            continue
        extra = {} if impl == "default" else {impl: True}
        CASES.append(pytest.param(Base, {**kwargs, **extra}, id=f"{Base.__name__}-{impl}-{len(kwargs)}"))


def _run_ours(problem, factory, steps, frozen=()):
    x = problem.params()
    opt = factory(x)
    for t in range(steps):
        problem.grad_step(x, t)
        for i in frozen:
            x[i].grad = None
        opt.step()
    return x, opt


@pytest.mark.parametrize("Base,kwargs", CASES)
def test_base_optimizers_match_reference(Base, kwargs, problem, seed):
    ref_x, _ = reference_trajectory(problem, Base, kwargs, 15)
    x, opt = _run_ours(problem, lambda ps: mechanize(Base, lr_invariant=False)(ps, **kwargs), 15)
    assert isinstance(opt, Base) and isinstance(opt, Mechanic) and is_mechanized(opt)
    for a, b in zip(x, ref_x):
        assert max_rel(a.detach(), b) < 1e-11, seed


def test_param_groups_with_own_lr_and_weight_decay(problem, seed):
    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.02, "weight_decay": 0.0},
            {"params": ps[2:], "lr": 0.005, "weight_decay": 0.3},
        ]

    ref_x, _ = reference_trajectory(
        problem, None, None, 20, make_base=lambda ps: torch.optim.AdamW(groups(ps))
    )
    x, opt = _run_ours(problem, lambda ps: mechanize(torch.optim.AdamW, lr_invariant=False)(groups(ps)), 20)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.005]
    for a, b in zip(x, ref_x):
        assert max_rel(a.detach(), b) < 1e-11, seed


def test_frozen_parameters_are_untouched_and_excluded(problem, seed):
    frozen = (1, 3)
    initial = problem.params()
    ref_x, _ = reference_trajectory(problem, torch.optim.Adam, dict(lr=0.01), 20, frozen=frozen)
    x, opt = _run_ours(
        problem, lambda ps: mechanize(torch.optim.Adam, lr_invariant=False)(ps, lr=0.01), 20, frozen=frozen
    )
    for i in frozen:
        assert torch.equal(x[i].detach(), initial[i].detach())
        assert "mechanic_delta" not in opt.state.get(x[i], {})
    for a, b in zip(x, ref_x):
        assert max_rel(a.detach(), b) < 1e-11, seed


def test_parameter_unfrozen_later_starts_from_its_current_value(problem):
    x = problem.params()
    opt = mechanize(torch.optim.SGD)(x, lr=0.1)
    for t in range(6):
        problem.grad_step(x, t)
        if t < 3:
            x[0].grad = None
        opt.step()
    assert torch.isfinite(x[0]).all() and "mechanic_delta" in opt.state[x[0]]


def test_closure_returns_loss_and_matches_plain_step(problem):
    x_plain, _ = _run_ours(problem, lambda ps: mechanize(torch.optim.Adam)(ps, lr=0.01), 10)
    x = problem.params()
    opt = mechanize(torch.optim.Adam)(x, lr=0.01)
    calls = []
    for t in range(10):

        def closure(t=t):
            calls.append(t)
            opt.zero_grad()
            loss = problem.loss(x, t)
            loss.backward()
            return loss

        opt.step(closure)
    assert calls == list(range(10))  # evaluated exactly once per step
    for a, b in zip(x, x_plain):
        assert torch.equal(a, b)


def test_closure_loss_value_is_returned(problem):
    x = problem.params()
    opt = mechanize(torch.optim.SGD)(x, lr=0.01)
    expected = []

    def closure():
        opt.zero_grad()
        loss = problem.loss(x, 0)
        loss.backward()
        expected.append(loss)
        return loss

    out = opt.step(closure)
    assert out is expected[0]


class _ReEvaluatingSGD(torch.optim.SGD):
    """A base that evaluates the closure itself, several times (as line-search optimizers do)."""

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
            loss = closure()
        super().step()
        return loss


def test_base_may_reevaluate_the_closure(problem):
    x = problem.params()
    opt = mechanize(_ReEvaluatingSGD)(x, lr=0.1)
    n = []

    def closure():
        n.append(1)
        opt.zero_grad()
        loss = problem.loss(x, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and len(n) == 2  # ours, then the base's second call (its first is ours)


def test_lr_scheduler_drives_the_base_lr(problem):
    x = problem.params()
    opt = mechanize(torch.optim.AdamW, lr_invariant=False)(x, lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for t in range(30):
            problem.grad_step(x, t)
            opt.step()
            sched.step() if t < 29 else None
            lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) > 5 * min(lrs)
    # the mechanized update used the scheduled lr: compare with the reference driven by the same schedule
    scheds = []

    def make_base(ps):
        base = torch.optim.AdamW(ps, lr=0.1)
        scheds.append(torch.optim.lr_scheduler.OneCycleLR(base, max_lr=0.1, total_steps=30))
        return base

    ref_x, _ = reference_trajectory(
        problem,
        None,
        None,
        30,
        make_base=make_base,
        after_step=lambda t: scheds[0].step() if t < 29 else None,
    )
    for a, b in zip(x, ref_x):
        assert max_rel(a.detach(), b) < 1e-10


def test_step_hooks_fire_once_per_step(problem):
    torch.optim.Adam(problem.params(), lr=0.1)  # a plain Adam instance hooks Adam.step itself
    x = problem.params()
    opt = mechanize(torch.optim.Adam)(x, lr=0.01)
    pre, post, glob = [], [], []
    opt.register_step_pre_hook(lambda o, a, k: pre.append(o))
    opt.register_step_post_hook(lambda o, a, k: post.append(o))
    handle = register_optimizer_step_post_hook(lambda o, a, k: glob.append(o))
    try:
        for t in range(4):
            problem.grad_step(x, t)
            opt.step()
    finally:
        handle.remove()
    assert len(pre) == len(post) == 4 and all(o is opt for o in pre + post)
    assert len([o for o in glob if o is opt]) == 4


def test_no_grad_at_all_is_a_base_step(problem):
    x = problem.params()
    before = [p.detach().clone() for p in x]
    opt = mechanize(torch.optim.SGD)(x, lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(x, before))
    assert not opt.state and opt.param_groups[0]["mechanic"]["step"].item() == 0


def test_mechanize_an_instance_in_place_keeps_its_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    exp_avg = opt.state[model.weight]["exp_avg"].clone()
    same = mechanize(opt, s_decay=0.0, lr_invariant=False)
    assert same is opt and isinstance(opt, torch.optim.Adam)
    assert torch.equal(opt.state[model.weight]["exp_avg"], exp_avg)
    posts = []
    opt.register_step_post_hook(lambda *a: posts.append(1))
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    assert posts == [1] and opt._mechanic_spec.config.s_decay == 0.0
    assert opt.mechanic_scale.item() == pytest.approx(1e-6, rel=1e-3)  # Mechanic starts here
    with pytest.raises(TypeError, match="already mechanized"):
        mechanize(opt)
