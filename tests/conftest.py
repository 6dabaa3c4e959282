"""Session settings and fixtures: Triton's interpreter without a GPU, the check that no test leaves global
settings changed, a fresh seed per test, and a small problem on it. Helpers tests import are in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import Problem, make_problem

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


@pytest.fixture
def problem(seed) -> Problem:
    return make_problem()
