"""What tests share: small problems on fresh random data, a training loop, comparisons of state
snapshots, and the hang limit of subprocesses. One place: test modules import from here."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List

import torch

# A limit for subprocesses that only catches a hang: correctness tests never depend on speed (a loaded
# machine can be many times slower than a quiet one); speed is measured in bench/.
HANG_LIMIT_S = 30 * 60


@dataclass
class Problem:
    """A least-squares-plus-tanh objective over a handful of parameter tensors."""

    shapes: List[tuple]
    data: List[torch.Tensor]
    dtype: torch.dtype
    stationary: bool = False  # False: the target moves every step (a harder, non-stationary problem)

    def params(self) -> List[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(1234)
        return [
            torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(self.dtype))
            for s in self.shapes
        ]

    def loss(self, params: List[torch.Tensor], step: int) -> torch.Tensor:
        total = torch.zeros((), dtype=self.dtype)
        for p, a in zip(params, self.data):
            shift = torch.sin(a.to(self.dtype) * (1 if self.stationary else step + 1))
            total = total + ((torch.tanh(p) - shift) ** 2).sum() + 0.1 * (p * a.to(self.dtype)).sum()
        return total

    def grad_step(self, params: List[torch.Tensor], step: int) -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = self.loss(params, step)
        loss.backward()
        return loss


def make_problem(
    dtype: torch.dtype = torch.float64, shapes=((7, 5), (5,), (3, 4, 2), (11,)), stationary: bool = False
) -> Problem:
    data = [torch.randn(s, dtype=torch.float64) for s in shapes]
    return Problem(list(shapes), data, dtype, stationary)


def run(opt_factory: Callable, problem: Problem, steps: int, params=None):
    params = problem.params() if params is None else params
    opt = opt_factory(params)
    for t in range(steps):
        problem.grad_step(params, t)
        opt.step()
    return params, opt


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def flatten(obj, prefix: str = "") -> dict:
    """Every value of a nested state dict, tensors cloned, keyed by its path: a comparable snapshot."""
    flat = {}
    if torch.is_tensor(obj):
        flat[prefix] = obj.detach().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flat.update(flatten(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flat.update(flatten(v, f"{prefix}/{i}"))
    else:
        flat[prefix] = obj
    return flat


def assert_same_snapshot(a: dict, b: dict) -> None:
    """Two `flatten` snapshots hold the same keys, dtypes and bits."""
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


DISTRIBUTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed")  # the rank scripts


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(script: str, world: int, args, attempts: int = 3) -> None:
    """Run `script RANK WORLD PORT *args` as every rank; if one fails, stop the others at once (no
    waiting on a dead peer) and show all logs. A port taken between choosing it and binding it is
    retried with a new one; so, once, is a rank that segfaults (a gloo rank of a 4-rank run on 2 cores
    did, with no Python error, in one fresh-clone CI run): a second segfault fails."""
    segfaulted = False
    for attempt in range(attempts):
        port = free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.join(DISTRIBUTED, script), str(r), str(world), port, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        deadline = time.monotonic() + HANG_LIMIT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = "\n".join(
            f"--- rank {r} (exit {p.wait()})\n{p.stdout.read().decode()}" for r, p in enumerate(procs)
        )
        if all(p.returncode == 0 for p in procs):
            return
        crashed = any(p.returncode == -signal.SIGSEGV for p in procs)
        retry = "address already in use" in logs.lower() or (crashed and not segfaulted)
        segfaulted |= crashed
        if not retry or attempt == attempts - 1:
            raise AssertionError(logs)


def regression_data(n=64, seed=0):
    """(x, y): 8 inputs, 3 smooth targets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return x, torch.tanh(x[:, :3] * 1.5)


def small_mlp():
    """8 -> 16 -> 3, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)  # the paper's, written out


def default_mode(Base, lr):
    """`reference_trajectory`'s arguments for mechanize(Base)'s lr-invariant default at base lr `lr` (its
    reference lr), in the paper's units: S = S~ / lr, so s_init / lr; the lambda term at S = 1; Delta
    recomputed without eps; its betas. The tuner's eps stays in other units, so the two agree to about
    1e-5."""
    from mechanic_fast import mechanize

    cfg = mechanize(Base)._mechanic_spec.config.resolved(True)
    return dict(s_init=cfg.s_init / lr, unit_decay=True, recompute_eps=0.0, betas=cfg.betas)


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
    betas=BETAS,
):
    """Obviously-correct float64 Mechanic: Python loops, one tensor at a time, Python floats for the tuner.

    `make_base(params)` builds the base optimizer (default `Base(params, **kwargs)`); parameters whose
    index is in `frozen` never get a gradient, nor, at step t, those in `gaps(t)`. A parameter takes part
    only in the steps where it has a gradient, and then x = x_ref + S * Delta (Delta not stored:
    (x_t - x_ref) / (S_p + `recompute_eps`, default eps), S_p the S its x was last made with).
    `unit_decay`: the lambda term at S = 1, as the lr-invariant default has it (`default_mode`).
    `betas`: one tuner per value, the paper's six by default.
    """
    all_x = problem.params()
    base = make_base(all_x) if make_base else Base(all_x, **kwargs)
    x = [p for i, p in enumerate(all_x) if i not in frozen]
    index = [i for i in range(len(all_x)) if i not in frozen]
    n = len(betas)
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
            for j, beta in enumerate(betas):
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


def small_linear(seed=1, dtype=torch.float32):
    """A seeded Linear(4, 3)."""
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(dtype)


def random_grad_steps(opt, params, steps, seed=0, skip=()):
    """`steps` steps on fresh gradients, none for the parameters at the indices in `skip`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = None if i in skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
