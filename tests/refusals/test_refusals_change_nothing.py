"""Refusals: bad options, bases, parameters, gradients and checkpoints are refused with a message that
names the problem, before anything changes: a refused call (mechanize, a step, load_state_dict,
add_param_group) leaves the optimizer's class, state_dict and parameters as they were. And what is valid
(numpy and Python numbers) is not refused."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_snapshot, flatten, make_problem, random_grad_steps, run, small_linear

from mechanic_fast import functional, mechanize

# ------------------------------------------------------------------------------- silent wrong results


def test_a_float64_optimizer_with_delta_recomputed_refuses_low_precision_parameters_added_later():
    opt = mechanize(torch.optim.AdamW, store_delta=False)([torch.nn.Parameter(torch.randn(3).double())])
    before = flatten(opt.state_dict())
    with pytest.raises(ValueError, match="store_delta=False cannot tune"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3).bfloat16())]})
    assert_same_snapshot(before, flatten(opt.state_dict()))


# ------------------------------------------------- a parameter with base state but no Mechanic state


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
    params = list(small_linear().parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10)
    return opt, params


def _holding_a_tuner(**options):
    """A plain AdamW that loaded a mechanized checkpoint (its param_groups[0] holds the tuner)."""
    params = list(small_linear().parameters())
    mech = mechanize(torch.optim.AdamW)(params, lr=1e-2)
    random_grad_steps(mech, params, 2)
    plain = torch.optim.AdamW(params, lr=1e-2)
    plain.load_state_dict(copy.deepcopy(mech.state_dict()))
    return plain, params


def _mechanized(**options):
    params = list(small_linear().parameters())
    opt = mechanize(torch.optim.AdamW, **options)(params, lr=1e-2)
    random_grad_steps(opt, params, 2)
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
    random_grad_steps(plain, params, 1)
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
    random_grad_steps(opt, params, 1)


def test_mechanize_of_an_optimizer_holding_a_tuner_resumes_it():
    """The options match: the held tuner and Mechanic's state go on as the original run's."""
    params = list(small_linear().parameters())
    mech = mechanize(torch.optim.AdamW)(params, lr=1e-2)
    random_grad_steps(mech, params, 3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(twin, lr=1e-2)
    plain.load_state_dict(copy.deepcopy(mech.state_dict()))
    mechanize(plain)
    random_grad_steps(mech, params, 3, seed=5)
    random_grad_steps(plain, twin, 3, seed=5)
    assert torch.equal(mech.mechanic_scale, plain.mechanic_scale)
    assert all(torch.equal(a, b) for a, b in zip(params, twin))


# ------------------------------------------------------------------------------------ option values


@pytest.mark.parametrize("value", ["0.01", torch.tensor(0.01), True, [0.01]])
def test_what_is_not_a_real_number_is_refused_saying_so(value):
    with pytest.raises(ValueError, match="must be a real number"):
        mechanize(torch.optim.SGD, s_init=value)


@pytest.mark.parametrize("group", ["world", 3, object()])
def test_a_partition_group_that_is_not_a_process_group_is_refused_at_mechanize(group):
    with pytest.raises(TypeError, match="partition_group must be a torch.distributed ProcessGroup"):
        mechanize(torch.optim.SGD, partition_group=group)


def test_eps_zero_is_refused():
    with pytest.raises(ValueError, match="eps"):
        mechanize(torch.optim.SGD, eps=0.0)


def test_differentiable_is_refused_at_construction():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="differentiable"):
        mechanize(torch.optim.SGD)([w], lr=0.1, differentiable=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_without_stored_delta_is_refused_before_anything_changes(dtype):
    model = torch.nn.Linear(4, 4).to(dtype)
    with pytest.raises(ValueError, match="store_delta=False"):
        mechanize(torch.optim.AdamW, store_delta=False)(model.parameters(), lr=1e-3)
    w = torch.nn.Parameter(torch.randn(3))
    opt = mechanize(torch.optim.AdamW, store_delta=False)([w], lr=1e-3)
    with pytest.raises(ValueError, match="store_delta=False"):
        opt.add_param_group({"params": model.parameters()})
    assert len(opt.param_groups) == 1
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="store_delta=False"):
        mechanize(plain, store_delta=False)
    assert type(plain) is torch.optim.AdamW


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(s_init=0.0), "s_init"),
        (dict(s_init=-1e-8), "s_init"),
        (dict(betas=()), "betas"),
        (dict(betas=(0.9, 1.0)), "beta"),
        (dict(betas=(0.0,)), "beta"),
        (dict(eps=-1e-8), "eps"),
        (dict(s_decay=-0.1), "s_decay"),
        (dict(variant="optax"), "variant"),
        (dict(backend="cuda"), "backend"),
        (dict(log_every=-1), "log_every"),
        (dict(eps=float("nan")), "eps"),
    ],
)
def test_invalid_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        mechanize(torch.optim.SGD, **options)


@pytest.mark.parametrize("not_an_optimizer", [int, "SGD", None, torch.nn.Linear])
def test_non_optimizer_raises_type_error(not_an_optimizer):
    with pytest.raises(TypeError, match="Optimizer"):
        mechanize(not_an_optimizer)


def test_sparse_gradients_are_refused_before_anything_changes():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = mechanize(torch.optim.SGD)(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(before, emb.weight) and not opt.state
    assert opt.param_groups[0]["mechanic"]["step"].item() == 0


def test_complex_parameters_are_refused_clearly():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = mechanize(torch.optim.Adam)([p], lr=0.1)
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


# --------------------------------------------------------------------------- refused checkpoints
def _spoil(kind):
    def edit(sd):
        tuner = sd["param_groups"][0]["mechanic"]
        first = sd["state"][0]
        if kind == "nan tuner":
            tuner["s"] = tuner["s"].clone().fill_(float("nan"))
        elif kind == "inf x_ref":
            first["mechanic_x_ref"] = first["mechanic_x_ref"].clone().fill_(float("inf"))
        elif kind == "inf delta":
            first["mechanic_delta"] = first["mechanic_delta"].clone().fill_(float("inf"))
        elif kind == "int64 tuner":
            tuner["m"] = tuner["m"].long()
        elif kind == "float16 tuner":
            tuner["v"] = tuner["v"].half()
        elif kind == "delta missing":  # x_ref in its place
            first["mechanic_x_ref"] = first.pop("mechanic_delta")
        elif kind == "delta in the x_ref layout":
            first["mechanic_delta"] = first["mechanic_x_ref"].clone()
        elif kind == "x_ref shape":
            first["mechanic_x_ref"] = first["mechanic_x_ref"].reshape(-1)[:3].clone()
        elif kind == "delta shape":
            first["mechanic_delta"] = first["mechanic_delta"].reshape(-1)[:3].clone()
        elif kind == "tuner shape":
            tuner["r"] = tuner["r"][:2].clone()
        elif kind == "step":
            tuner["step"] = torch.tensor(1.5)
        elif kind == "mechanic-pytorch":
            sd["state"]["_mechanic"] = {"s": torch.zeros(6)}
        elif kind == "betas":
            tuner["betas"] = (0.9,)
        elif kind == "base lr factor not a power of two":
            tuner["base_lr_factor"] = 3.0
        elif kind == "base lr factor not a number":
            tuner["base_lr_factor"] = "16"
        return sd

    return edit


MESSAGES = {
    "nan tuner": "NaN or Inf",
    "inf x_ref": "NaN or Inf",
    "inf delta": "NaN or Inf",
    "int64 tuner": "float32 or float64",
    "float16 tuner": "float32 or float64",
    "delta missing": "has no Delta",
    "delta in the x_ref layout": "store_delta=False",
    "x_ref shape": "shape",
    "delta shape": "shape",
    "tuner shape": "shape",
    "step": "step count",
    "mechanic-pytorch": "mechanic-pytorch checkpoint",
    "betas": "betas",
    "base lr factor not a power of two": "base_lr_factor is not a power of two",
    "base lr factor not a number": "base_lr_factor is not a power of two",
}


def _trained_adamw(store_delta):
    """AdamW mechanized, 6 steps on a stationary float32 problem."""
    problem = make_problem(torch.float32, stationary=True)
    return run(lambda ps: mechanize(torch.optim.AdamW, store_delta=store_delta)(ps, lr=0.02), problem, 6)


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_bad_checkpoints_are_refused_and_the_optimizer_is_unchanged(kind):
    # the x_ref layout (store_delta=False) for what spoils x_ref, else the default one (Delta alone)
    x, opt = _trained_adamw(store_delta=False if "x_ref" in kind else None)
    bad = _spoil(kind)(copy.deepcopy(opt.state_dict()))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=MESSAGES[kind]):
        opt.load_state_dict(bad)
    assert_same_snapshot(flatten(before), flatten(opt.state_dict()))


@pytest.mark.parametrize("foreign", ["mechanized", "plain"])
def test_checkpoint_of_another_model_is_refused_before_anything_changes(foreign):
    problem = make_problem(torch.float32)
    x, opt = run(lambda ps: mechanize(torch.optim.Adam)(ps, lr=0.01), problem, 3)
    before_s, before_avg = opt.param_groups[0]["mechanic"]["s"].clone(), opt.state[x[0]]["exp_avg"].clone()

    other = make_problem(torch.float32, shapes=((3, 3), (5,), (3, 4, 2), (11,)))
    Other = mechanize(torch.optim.Adam) if foreign == "mechanized" else torch.optim.Adam
    y, other_opt = run(lambda ps: Other(ps, lr=0.01), other, 2)
    with pytest.raises(ValueError, match="shape"):  # x_ref or exp_avg of another shape
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(Other(y[:2], lr=0.01).state_dict())
    if foreign == "mechanized":
        with pytest.raises(ValueError, match="variant"):
            opt.load_state_dict(
                mechanize(torch.optim.Adam, variant="mechanic_pytorch")(x, lr=0.01).state_dict()
            )
    assert torch.equal(opt.param_groups[0]["mechanic"]["s"], before_s)
    assert torch.equal(opt.state[x[0]]["exp_avg"], before_avg)


@pytest.mark.parametrize("Base", [torch.optim.LBFGS, torch.optim.SparseAdam])
def test_bases_mechanic_would_silently_break_are_refused_at_mechanize(Base):
    with pytest.raises(TypeError, match=Base.__name__):
        mechanize(Base)
    opt = Base([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(TypeError, match=Base.__name__):
        mechanize(opt)
    assert type(opt) is Base


def test_explicit_triton_never_falls_back_silently(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        functional.select_impl("triton", [torch.ones(3)])
    assert functional.select_impl("auto", [torch.ones(3)]) is functional.FOREACH  # auto: foreach on CPU
    opt = mechanize(torch.optim.SGD, backend="triton")([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        opt.step()
    assert torch.equal(opt.param_groups[0]["params"][0].detach(), torch.ones(3))
