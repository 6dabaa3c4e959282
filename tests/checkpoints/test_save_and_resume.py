"""Checkpoints: torch.save / torch.load(weights_only=True) round-trip, bit-exact resume in a fresh
optimizer (and a fresh process), plain base checkpoints, and refusal of foreign checkpoints."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import HANG_LIMIT_S, make_problem, random_grad_steps

from mechanic_fast import mechanize

VARIANTS = {
    "default": {},  # the paper variant, lr-invariant
    "paper": {"lr_invariant": False},
    "mechanic_pytorch": {"variant": "mechanic_pytorch"},
}


def _build(problem, x, variant, store_delta):
    opt = mechanize(torch.optim.AdamW, store_delta=store_delta, **VARIANTS[variant])(
        x, lr=0.02, weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    return opt, sched


def _train(problem, x, opt, sched, steps, start):
    for t in range(start, start + steps):
        problem.grad_step(x, t)
        opt.step()
        sched.step()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("store_delta", [False, True])
def test_resume_is_bit_identical(variant, store_delta, tmp_path, seed):
    if variant == "default" and store_delta is False:
        pytest.skip(
            "its first effective lr (1e-9) is lost to float32 rounding with Delta recomputed: S stalls"
        )
    problem = make_problem(torch.float32, stationary=True)
    # uninterrupted
    x = problem.params()
    opt, sched = _build(problem, x, variant, store_delta)
    _train(problem, x, opt, sched, 40, 0)
    # interrupted after 20 steps, saved to disk, resumed in fresh objects over fresh parameters
    y = problem.params()
    opt_a, sched_a = _build(problem, y, variant, store_delta)
    _train(problem, y, opt_a, sched_a, 20, 0)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"params": [p.detach() for p in y], "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, path
    )
    del y, opt_a, sched_a

    ckpt = torch.load(path, weights_only=True)
    z = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    opt_b, sched_b = _build(problem, z, variant, store_delta)
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    _train(problem, z, opt_b, sched_b, 20, 20)

    assert opt.mechanic_scale > 1e-3  # the tuner moved far from its start
    assert torch.equal(opt.mechanic_scale, opt_b.mechanic_scale), seed
    for a, b in zip(x, z):
        assert torch.equal(a, b), seed
    sd, sd_b = (
        opt.state_dict()["param_groups"][0]["mechanic"],
        opt_b.state_dict()["param_groups"][0]["mechanic"],
    )
    for key in ("s", "r", "m", "v"):
        assert torch.equal(sd[key], sd_b[key])
    assert sd["step"].item() == sd_b["step"].item() == 40


def test_state_dict_holds_all_mechanic_state_in_torchs_places(tmp_path):
    """Delta is per-parameter state, the tuner is in param_groups[0]: state_dict() has
    exactly torch's keys, and the tuner keeps its float32 dtype even for bfloat16 parameters."""
    problem = make_problem(torch.float32)
    x = problem.params()
    opt = mechanize(torch.optim.Adam, store_delta=True)(x, lr=0.01)
    _train(problem, x, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0), 3, 0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == set(range(len(x)))
    for i, p in enumerate(x):
        # float32 parameters: Delta alone (x_ref is kept for bfloat16/float16 ones)
        assert set(sd["state"][i]) == {"step", "exp_avg", "exp_avg_sq", "mechanic_delta"}
        assert sd["state"][i]["mechanic_delta"].shape == p.shape
    tuner = sd["param_groups"][0]["mechanic"]
    assert tuner["s"].shape == (4,) and tuner["step"].item() == 3 and tuner["variant"] == "paper"
    assert tuner["betas"] == (0.999, 0.9999, 0.99999, 0.999999)  # the lr-invariant default's four
    torch.save(sd, tmp_path / "o.pt")
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert torch.equal(back["param_groups"][0]["mechanic"]["s"], tuner["s"])


def test_bfloat16_parameters_keep_a_float32_tuner_and_references_through_a_load():
    """torch's load_state_dict casts per-parameter state to the parameter's dtype; Mechanic's x_ref
    (ref_dtype='float32') and the tuner must keep theirs."""
    w = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    Opt = mechanize(torch.optim.AdamW, store_delta=True, ref_dtype="float32")
    opt = Opt([w], lr=1e-2)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    sd = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = Opt([w2], lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[w2]["mechanic_x_ref"].dtype == torch.float32
    assert torch.equal(opt2.state[w2]["mechanic_x_ref"], opt.state[w]["mechanic_x_ref"])
    assert opt2.state[w2]["exp_avg"].dtype == torch.bfloat16  # the base's own state: torch's rule
    assert opt2.param_groups[0]["mechanic"]["s"].dtype == torch.float32


def test_resume_in_a_new_process_on_the_parameters_device(tmp_path):
    problem = make_problem(torch.float32)
    x = problem.params()
    opt = mechanize(torch.optim.AdamW)(x, lr=0.02)
    _train(problem, x, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0), 5, 0)
    torch.save({"params": [p.detach() for p in x], "opt": opt.state_dict()}, tmp_path / "c.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from mechanic_fast import mechanize
        ck = torch.load({str(tmp_path / "c.pt")!r}, weights_only=True, map_location="cpu")
        ps = [torch.nn.Parameter(p) for p in ck["params"]]
        opt = mechanize(torch.optim.AdamW)(ps, lr=0.02)
        opt.load_state_dict(ck["opt"])
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        torch.save([p.detach() for p in ps] + [opt.mechanic_scale], {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=HANG_LIMIT_S)
    for p in x:
        p.grad = torch.ones_like(p)
    opt.step()
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for a, b in zip(x, out[:-1]):
        assert torch.equal(a.detach(), b)
    assert torch.equal(opt.mechanic_scale, out[-1])


def test_plain_base_checkpoint_starts_mechanic_from_there():
    problem = make_problem(torch.float32)
    x = problem.params()
    base = torch.optim.Adam(x, lr=0.01)
    for t in range(5):
        problem.grad_step(x, t)
        base.step()
    at_switch = [p.detach().clone() for p in x]
    opt = mechanize(torch.optim.Adam)(x, lr=0.01)
    opt.load_state_dict(base.state_dict())
    assert opt.state[x[0]]["step"].item() == 5  # the base's moments carried over
    problem.grad_step(x, 5)
    opt.step()
    for p, p0 in zip(x, at_switch):
        # Mechanic starts at the switch point: Delta is the one base update since (at lr * factor), x
        # moved S of the update at lr (the default's first effective lr 1e-5 at lr 0.01: S = 1e-3)
        factor = opt.param_groups[0]["mechanic"]["base_lr_factor"]
        moved, delta = p.detach() - p0, opt.state[p]["mechanic_delta"]
        torch.testing.assert_close(moved, 1e-3 / factor * delta, rtol=1e-3, atol=1.2e-7)  # x's ulp, |x| < 2
        assert delta.abs().max() > 1e-3


@pytest.mark.parametrize("Base", [torch.optim.Adagrad, torch.optim.AdamW, torch.optim.SGD])
def test_a_fresh_optimizer_loads_its_own_state_dict(Base):
    """Adagrad makes its state when it is made, before Mechanic has any: that is not a checkpoint with
    x_ref missing."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = mechanize(Base)(params, lr=0.1)
    before = opt.state_dict()
    opt.load_state_dict(before)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all("mechanic_delta" in opt.state[p] for p in params)


def _least_squares(params, targets):
    for p in params:
        p.grad = None
    sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()


def test_an_x_ref_checkpoint_resumes_with_delta():
    """An x_ref-only checkpoint (store_delta=False; the float64 default of earlier versions) loaded with
    the layout left to Mechanic becomes Delta alone, so that x = x_ref + S * Delta holds as loaded, and
    in float32 the scale is not stalled by S * Delta below half an ulp of the weights."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=gen, dtype=torch.float64)
    targets = [torch.randn(64, generator=gen, dtype=torch.float64)]
    wide = [torch.nn.Parameter(start.clone())]
    opt = mechanize(torch.optim.Adam, store_delta=False)(wide, lr=1e-3)
    for _ in range(3):
        _least_squares(wide, targets)
        opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["mechanic"]["store_delta"] is False

    narrow = [torch.nn.Parameter(wide[0].detach().float())]
    resumed = mechanize(torch.optim.Adam)(narrow, lr=1e-3)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["mechanic"]["store_delta"] is True
    state = resumed.state[narrow[0]]
    assert "mechanic_x_ref" not in state and state["mechanic_delta"].dtype == torch.float32
    # S * Delta = x - x_ref as loaded
    tuner = saved["param_groups"][0]["mechanic"]
    # the default's S~, in the units of Delta: the base's updates at lr * base_lr_factor
    scale = tuner["s"].sum() / (tuner["lr_ref"] * tuner["base_lr_factor"])
    x_ref = saved["state"][0]["mechanic_x_ref"]
    rebuilt = x_ref + scale * state["mechanic_delta"].double()
    torch.testing.assert_close(rebuilt.float(), narrow[0].detach(), rtol=0, atol=1e-6)
    narrow_targets = [t.float() for t in targets]
    for _ in range(300):
        _least_squares(narrow, narrow_targets)
        resumed.step()
    assert resumed.mechanic_scale > 1e-3, resumed.mechanic_scale  # recomputed, S stays near 1e-6
    # an explicit store_delta=False keeps the checkpoint's layout
    again = mechanize(torch.optim.Adam, store_delta=False)([torch.nn.Parameter(wide[0].detach().clone())])
    again.load_state_dict(saved)
    assert again.param_groups[0]["mechanic"]["store_delta"] is False


def _round_trip_and_resume(opt, params, skip):
    """The optimizer loads its own checkpoint, and a copy resumed from it steps as the original does."""
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = type(opt)(twin_params, **{k: v for k, v in opt.defaults.items() if k in ("lr",)})
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(opt.state_dict())
    twin.load_state_dict(sd)
    random_grad_steps(opt, params, 3, seed=7, skip=skip)
    random_grad_steps(twin, twin_params, 3, seed=7, skip=skip)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_adagrad_with_a_parameter_that_never_gets_a_gradient_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = mechanize(torch.optim.Adagrad)([a, b], lr=0.1)  # Adagrad makes state for both when made
    random_grad_steps(opt, [a, b], 3, skip=(1,))
    _round_trip_and_resume(opt, [a, b], skip=(1,))


def test_mechanized_mid_training_then_a_frozen_layer_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    random_grad_steps(opt, [a, b], 2)  # base state for both
    mechanize(opt)
    random_grad_steps(opt, [a, b], 3, skip=(1,))  # b frozen since: base state, no Mechanic state
    _round_trip_and_resume(opt, [a, b], skip=(1,))


def test_plain_checkpoint_loaded_then_a_frozen_layer_resumes():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    plain = torch.optim.AdamW([a, b], lr=0.1)
    random_grad_steps(plain, [a, b], 2)
    opt = mechanize(torch.optim.AdamW)([a, b], lr=0.1)
    opt.load_state_dict(plain.state_dict())
    random_grad_steps(opt, [a, b], 3, skip=(1,))
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
