"""Shared test problems: small models on fresh random data, with the seed in every failure message."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List

import pytest
import torch

# A limit for subprocesses that only catches a hang: correctness tests never depend on speed (a loaded
# machine can be many times slower than a quiet one); speed is measured in bench/.
HANG_LIMIT_S = 30 * 60

_session_env = pytest.MonkeyPatch()


def pytest_configure(config: pytest.Config) -> None:
    """Without a GPU, Triton kernels run in Triton's interpreter. The switch is read when triton.language
    is first imported (torch.compile imports it too), so it is set before any test module loads, for the
    session only (undone in pytest_unconfigure)."""
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        _session_env.setenv("TRITON_INTERPRET", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    _session_env.undo()


def _global_settings() -> dict:
    """The process-wide settings a test could leave changed for the tests after it."""
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    return {
        "inductor config": inductor_config.get_config_copy(),
        "dynamo config": dynamo_config.get_config_copy(),
        "default dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "grad mode": torch.is_grad_enabled(),
        # not settings: pytest's PYTEST_CURRENT_TEST names the test phase, and inductor keeps private
        # bookkeeping in _TORCHINDUCTOR_* variables of its own (and, in older torch, records the cache
        # directory it chose in TORCHINDUCTOR_CACHE_DIR)
        "environment": {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")
            and not k.startswith("_TORCHINDUCTOR")
        },
    }


@pytest.fixture(autouse=True)
def _no_leaked_global_state():
    """Every test leaves global settings as it found them: a test changes them only through scoped
    mechanisms (`torch._inductor.config.patch`, `monkeypatch`, context managers), so the suite passes
    in any order. Checked after each test, naming what changed."""
    before = _global_settings()
    yield
    after = _global_settings()
    changed = []
    for name, value in before.items():
        if isinstance(value, dict):
            keys = sorted(k for k in value.keys() | after[name].keys() if value.get(k) != after[name].get(k))
            changed += [f"{name}: {k} {value.get(k)!r} -> {after[name].get(k)!r}" for k in keys]
        elif after[name] != value:
            changed.append(f"{name}: {value!r} -> {after[name]!r}")
    assert not changed, "the test left global settings changed:\n" + "\n".join(changed)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure via the assertion messages that use it)."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


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


@pytest.fixture
def problem(seed) -> Problem:
    return make_problem()


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
