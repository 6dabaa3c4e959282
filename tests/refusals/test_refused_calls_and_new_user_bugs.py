"""Bugs a new user meets (issue 28): silent wrong results, refusals that change things or refuse what is
valid. Every test here fails on 0c5c3f0. And the property that ties them together: a refused call
(mechanize, load_state_dict, add_param_group) leaves the optimizer's class and state_dict as they were."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import assert_same_snapshot, flatten

from mechanic_fast import mechanize


def _linear(seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(dtype)


def _train(opt, params, steps, seed=0, skip=()):
    """`steps` steps on fresh gradients, none for the parameters at the indices in `skip`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = None if i in skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


# ------------------------------------------------------------------------------- silent wrong results
def test_a_0d_parameter_whose_data_is_replaced_between_steps_stays_tuned():
    """CLIP clamps its logit scale with `s.data = torch.clamp(s.data, 0, 4.6)`: the step must move the
    new storage by S times the base step, not leave the full base step in it."""
    scale = torch.nn.Parameter(torch.tensor(2.0))
    w = torch.nn.Parameter(torch.randn(4))
    opt = mechanize(torch.optim.AdamW)([scale, w], lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        (scale * w.sum()).backward()
        before = scale.detach().clone()
        opt.step()
        moved = (scale.detach() - before).abs().item()
        # S is ~1e-6 here: the base step is 0.1, Mechanic's a millionth of it
        assert moved < 1e-4, moved
        scale.data = torch.clamp(scale.data, 0, 4.6)


@pytest.mark.parametrize("late_dtype", [torch.float32, torch.bfloat16])
def test_parameters_added_in_another_dtype_than_the_first_are_tuned(late_dtype):
    """An optimizer first built over float64 parameters: float32 or bfloat16 ones added later, the only
    ones training, move with the scale (before, the float64 layout without Delta was applied to them:
    x - x_ref rounded to 0 while S was small, and S stayed at 1e-6)."""
    first = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    # float32 at 10 (ulp 1e-6: x_ref + 1e-6 * Delta rounds to x_ref); bfloat16 near 0, where the base's
    # own steps are not lost to its resolution
    late = torch.nn.Parameter(((10 if late_dtype == torch.float32 else 0) + torch.randn(64)).to(late_dtype))
    opt = mechanize(torch.optim.AdamW)([first], lr=1e-2)
    opt.add_param_group({"params": [late]})
    start = late.detach().clone()
    for _ in range(200):
        late.grad = (late.detach().float() - 3).to(late.dtype)  # a pull towards 3; none for `first`
        opt.step()
    assert opt.mechanic_scale > 1e-2
    assert (late.detach().float() - start.float()).abs().mean() > 0.1


def test_a_float64_optimizer_with_delta_recomputed_refuses_low_precision_parameters_added_later():
    opt = mechanize(torch.optim.AdamW, store_delta=False)([torch.nn.Parameter(torch.randn(3).double())])
    before = flatten(opt.state_dict())
    with pytest.raises(ValueError, match="store_delta=False cannot tune"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3).bfloat16())]})
    assert_same_snapshot(before, flatten(opt.state_dict()))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile", "compile=True"])
def test_skipped_steps_are_counted_when_the_step_is_compiled(how):
    w = torch.nn.Parameter(torch.randn(8))
    opt = mechanize(torch.optim.AdamW, skip_nonfinite=True, compile=how == "compile=True")([w], lr=0.1)
    step = torch.compile(opt.step) if how == "torch.compile" else opt.step
    for i in range(4):
        w.grad = 2 * w.detach()
        if i == 2:
            w.grad[0] = float("nan")
        before = w.detach().clone()
        step()
        if i == 2:  # the skipped step changes nothing
            assert torch.equal(before, w.detach())
    assert opt.mechanic_skipped_steps == 1


# ------------------------------------------------- a parameter with base state but no Mechanic state
def _round_trip_and_resume(opt, params, skip):
    """The optimizer loads its own checkpoint, and a copy resumed from it steps as the original does."""
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = type(opt)(twin_params, **{k: v for k, v in opt.defaults.items() if k in ("lr",)})
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(opt.state_dict())
    twin.load_state_dict(sd)
    _train(opt, params, 3, seed=7, skip=skip)
    _train(twin, twin_params, 3, seed=7, skip=skip)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_adagrad_with_a_parameter_that_never_gets_a_gradient_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = mechanize(torch.optim.Adagrad)([a, b], lr=0.1)  # Adagrad makes state for both when made
    _train(opt, [a, b], 3, skip=(1,))
    _round_trip_and_resume(opt, [a, b], skip=(1,))


def test_mechanized_mid_training_then_a_frozen_layer_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    _train(opt, [a, b], 2)  # base state for both
    mechanize(opt)
    _train(opt, [a, b], 3, skip=(1,))  # b frozen since: base state, no Mechanic state
    _round_trip_and_resume(opt, [a, b], skip=(1,))


def test_plain_checkpoint_loaded_then_a_frozen_layer_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    plain = torch.optim.AdamW([a, b], lr=0.1)
    _train(plain, [a, b], 2)
    opt = mechanize(torch.optim.AdamW)([a, b], lr=0.1)
    opt.load_state_dict(plain.state_dict())
    _train(opt, [a, b], 3, skip=(1,))
    _round_trip_and_resume(opt, [a, b], skip=(1,))


def test_a_frozen_parameter_with_a_kept_zero_gradient_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = mechanize(torch.optim.AdamW)([a, b], lr=0.1)
    b.requires_grad_(False)
    b.grad = torch.zeros(3)  # zero_grad(set_to_none=False) keeps it: the base makes state for b
    for _ in range(3):
        a.grad = torch.randn(3)
        opt.step()
    assert opt.state[b] and "mechanic_delta" not in opt.state[b]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    a.grad = torch.randn(3)
    opt.step()


# ----------------------------------------------------------------------------- refusals change nothing
def _snapshot(opt):
    step = vars(opt).get("step")
    return type(opt), flatten(opt.state_dict()), getattr(step, "_wrapped_by_lr_sched", None)


def _assert_unchanged(before, opt):
    after = _snapshot(opt)
    assert after[0] is before[0], "class changed"
    assert_same_snapshot(before[1], after[1])
    assert after[2] == before[2], "the scheduler's step wrapper changed"


def _warming_up():
    """A plain AdamW under a scheduler whose first lr is 0 (a warmup)."""
    params = list(_linear().parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10)
    return opt, params


def _holding_a_tuner(**options):
    """A plain AdamW that loaded a mechanized checkpoint (its param_groups[0] holds the tuner)."""
    params = list(_linear().parameters())
    mech = mechanize(torch.optim.AdamW)(params, lr=1e-2)
    _train(mech, params, 2)
    plain = torch.optim.AdamW(params, lr=1e-2)
    plain.load_state_dict(copy.deepcopy(mech.state_dict()))
    return plain, params


def _mechanized(**options):
    params = list(_linear().parameters())
    opt = mechanize(torch.optim.AdamW, **options)(params, lr=1e-2)
    _train(opt, params, 2)
    return opt, params


def _bad_tuner(edit):
    def make(opt):
        sd = copy.deepcopy(opt.state_dict())
        edit(sd["param_groups"][0]["mechanic"])
        return sd

    return make


def _plain_at_lr_0(opt):
    params = [torch.nn.Parameter(p.detach().clone()) for g in opt.param_groups for p in g["params"]]
    plain = torch.optim.AdamW(params, lr=0.0)
    _train(plain, params, 1)
    return plain.state_dict()


REFUSED = {
    # mechanize(opt, ...)
    "lr_invariant at lr 0": (_warming_up, lambda o: mechanize(o, lr_invariant=True), ValueError, "lr"),
    "other betas than the held tuner": (
        _holding_a_tuner,
        lambda o: mechanize(o, betas=(0.9, 0.99, 0.999)),
        ValueError,
        "betas",
    ),
    "other variant than the held tuner": (
        _holding_a_tuner,
        lambda o: mechanize(o, variant="mechanic_pytorch"),
        ValueError,
        "variant",
    ),
    "bad partition_group (instance)": (
        _warming_up,
        lambda o: mechanize(o, partition_group="world"),
        TypeError,
        "ProcessGroup",
    ),
    "bad option (instance)": (_warming_up, lambda o: mechanize(o, eps="1e-8"), ValueError, "eps"),
    # load_state_dict
    "negative v": (
        _mechanized,
        lambda o: o.load_state_dict(_bad_tuner(lambda t: t["v"].neg_().sub_(1))(o)),
        ValueError,
        "negative",
    ),
    "negative s": (
        _mechanized,
        lambda o: o.load_state_dict(_bad_tuner(lambda t: t["s"].fill_(-1))(o)),
        ValueError,
        "negative",
    ),
    "plain checkpoint at lr 0 into lr_invariant": (
        lambda: _mechanized(lr_invariant=True),
        lambda o: o.load_state_dict(_plain_at_lr_0(o)),
        ValueError,
        "lr",
    ),
    # add_param_group
    "differentiable group": (
        _mechanized,
        lambda o: o.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "differentiable": True}),
        ValueError,
        "differentiable",
    ),
    "bfloat16 group without Delta": (
        lambda: _mechanized(store_delta=False),
        lambda o: o.add_param_group({"params": [torch.nn.Parameter(torch.ones(2).bfloat16())]}),
        ValueError,
        "store_delta",
    ),
    "a parameter twice": (
        _mechanized,
        lambda o: o.add_param_group({"params": [o.param_groups[0]["params"][0]]}),
        ValueError,
        "more than one",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_call_leaves_the_optimizer_as_it_was(case):
    make, call, error, match = REFUSED[case]
    opt, params = make()
    before = _snapshot(opt)
    with pytest.raises(error, match=match):
        call(opt)
    _assert_unchanged(before, opt)
    # and it still steps as the optimizer it was
    _train(opt, params, 1)


def test_mechanize_of_an_optimizer_holding_a_tuner_resumes_it():
    """The options match: the held tuner and Mechanic's state go on as the original run's."""
    params = list(_linear().parameters())
    mech = mechanize(torch.optim.AdamW)(params, lr=1e-2)
    _train(mech, params, 3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(twin, lr=1e-2)
    plain.load_state_dict(copy.deepcopy(mech.state_dict()))
    mechanize(plain)
    _train(mech, params, 3, seed=5)
    _train(plain, twin, 3, seed=5)
    assert torch.equal(mech.mechanic_scale, plain.mechanic_scale)
    assert all(torch.equal(a, b) for a, b in zip(params, twin))


# ------------------------------------------------------------------------------------ option values
@pytest.mark.parametrize("value", [np.float32(0.01), np.float64(0.01), np.int64(0), 0.01, 0])
def test_numpy_and_python_real_numbers_are_accepted(value):
    cls = mechanize(torch.optim.SGD, s_decay=value, s_init=np.float32(1e-6), eps=np.float64(1e-8))
    assert cls._mechanic_spec.config.s_decay == float(value)
    assert type(cls._mechanic_spec.config.s_decay) is float
    assert mechanize(torch.optim.SGD, log_every=np.int64(3))._mechanic_spec.config.log_every == 3
    assert mechanize(torch.optim.SGD, betas=np.array([0.9, 0.99, 0.999]))._mechanic_spec.config.betas == (
        0.9,
        0.99,
        0.999,
    )


@pytest.mark.parametrize("value", ["0.01", torch.tensor(0.01), True, [0.01]])
def test_what_is_not_a_real_number_is_refused_saying_so(value):
    with pytest.raises(ValueError, match="must be a real number"):
        mechanize(torch.optim.SGD, s_init=value)


@pytest.mark.parametrize("group", ["world", 3, object()])
def test_a_partition_group_that_is_not_a_process_group_is_refused_at_mechanize(group):
    with pytest.raises(TypeError, match="partition_group must be a torch.distributed ProcessGroup"):
        mechanize(torch.optim.SGD, partition_group=group)
