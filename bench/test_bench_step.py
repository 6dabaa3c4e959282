"""pytest-benchmark suite: one optimizer step per round, implementations side by side per shape set.

    python -m pytest bench/ --benchmark-only --benchmark-group-by=param:shapes

Gradients are set in the (untimed) setup of every round; the first steps (state creation, compile)
run before timing. Compare rows within one group: they ran in the same session on the same machine.
"""

from __future__ import annotations

import pytest
import torch

from mechanic_fast.tools.sweep import MAX_COMPILED_TENSORS, Unavailable, _make_optimizer, shape_sets

SHAPES = shape_sets(quick=False)
IMPLS = ["base", "mechanic_pytorch", "foreach", "base_compiled", "compiled"] + (
    ["triton"] if torch.cuda.is_available() else []
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shapes", sorted(SHAPES))
def test_step(benchmark, shapes, impl):
    if impl.endswith("compiled") and len(SHAPES[shapes]) > MAX_COMPILED_TENSORS:
        pytest.skip("compiling over this many tensors takes minutes")
    if impl.endswith("compiled"):  # fresh dynamo caches: every compiled step traces the same code objects,
        torch._dynamo.reset()  # and past the recompile limit (8 per code object) they would run eagerly
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES[shapes]]
    grads = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES[shapes]]
    try:
        step = _make_optimizer(impl, params)
    except Unavailable as why:
        pytest.skip(f"{impl}: {why}")

    def setup():
        for p, g in zip(params, grads):
            p.grad = g

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # state creation, compilation
        setup()
        timed()
    benchmark.group = shapes
    benchmark.pedantic(timed, setup=setup, rounds=20, warmup_rounds=2)
