"""torch.compile: the whole mechanized step is captured in few graphs without recompiles, and the
opt-in compile=True gives the eager result."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mechanic_fast import mechanize

pytestmark = pytest.mark.slow
STEPS = 30


def _train(opt_factory, compile_whole=False, device="cpu", steps=STEPS, dtype=torch.float64, graphs=None):
    """float64: while S is tiny, x_t - x_ref sits at the parameters' rounding level in float32, so
    compiled and eager kernels (which round differently) would drift apart for reasons not their own."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (5, 3, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in shapes]
    targets = [torch.randn(p.shape, generator=gen, dtype=dtype).to(device) for p in params]
    opt = opt_factory(params)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(opt.step, backend=counter) if compile_whole else opt.step
    frames = []
    for _ in range(steps):
        for p, t in zip(params, targets):  # a stationary quadratic: the scale grows steadily
            p.grad = (p.detach() - t) * 0.5
        step()
        frames.append(counter.frame_count)
    if graphs is not None:
        graphs.extend(counter.graphs)
    return params, opt, frames


def test_whole_step_compiles_to_at_most_two_graphs_without_recompiles():
    factory = lambda ps: mechanize(torch.optim.AdamW)(ps, lr=1e-3, foreach=True)  # noqa: E731
    eager, eager_opt, _ = _train(factory)
    compiled, compiled_opt, frames = _train(factory, compile_whole=True)
    _, _, bare_frames = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), compile_whole=True)
    assert bare_frames[-1] == 1
    # one graph for the first step (it creates Mechanic's state), one for every later step
    assert frames[-1] <= 2 and frames[1] == frames[-1], frames
    assert eager_opt.mechanic_scale > 1  # the tuner moved far from its first S, 1e-2 (s_init / lr)
    torch.testing.assert_close(compiled_opt.mechanic_scale, eager_opt.mechanic_scale, rtol=1e-5, atol=0)
    # torch's compiled AdamW rounds differently from its eager one (its float32 step count), and the
    # tuner's feedback carries that into every weight: within 1e-5 of the weights' size (about 1)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["paper", "mechanic_pytorch"])
def test_compile_option_gives_the_eager_result(variant):
    eager, eager_opt, _ = _train(lambda ps: mechanize(torch.optim.AdamW, variant=variant)(ps, lr=1e-3))
    comp, comp_opt, _ = _train(
        lambda ps: mechanize(torch.optim.AdamW, variant=variant, compile=True)(ps, lr=1e-3)
    )
    assert comp_opt._mechanic_compiled is not None  # the whole step, base included, compiled
    assert eager_opt.mechanic_scale > (1 if variant == "paper" else 1e-4)  # far from its first S
    torch.testing.assert_close(comp_opt.mechanic_scale, eager_opt.mechanic_scale, rtol=1e-5, atol=0)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # as above


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_with_a_capturable_base():
    def factory(ps):
        return mechanize(torch.optim.AdamW)(ps, lr=torch.tensor(1e-3, device="cuda"), capturable=True)

    eager, eager_opt, _ = _train(factory, device="cuda", dtype=torch.float32)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in [(16, 8), (8,), (5, 3, 2)]]
    targets = [torch.randn(p.shape, generator=gen).cuda() for p in params]
    opt = factory(params)
    step = torch.compile(opt.step, mode="reduce-overhead")
    for _ in range(STEPS):
        for p, t in zip(params, targets):
            p.grad = (p.detach() - t) * 0.5
        step()
    for a, b in zip(params, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inductor_foreach_copy_hazard_that_the_commit_avoids():
    """Why Mechanic commits its tuner state with one copy_ per vector: inductor orders a
    _foreach_copy_ whose sources read one of its destinations wrongly. If this starts passing with
    equal results, the workaround can go."""

    def commit(s, r, h):
        s_new, r_new = s * 2 + h, r - s * h
        torch._foreach_copy_([s, r], [s_new, r_new])

    results = []
    for fn in (commit, torch.compile(commit)):
        s, r = torch.ones(3), torch.zeros(3)
        fn(s, r, torch.tensor(0.5))
        results.append(r.clone())
    if torch.equal(results[0], results[1]):
        pytest.skip("inductor orders _foreach_copy_ correctly in this torch version")
    assert results[0].tolist() == [-0.5] * 3  # eager is right; the compiled commit would be wrong


def test_compiled_step_traces_the_foreach_code_even_with_backend_triton():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or its interpreter")
    eager, eager_opt, _ = _train(
        lambda ps: mechanize(torch.optim.AdamW, backend="foreach")(ps, lr=1e-3), steps=8
    )
    comp, comp_opt, frames = _train(
        lambda ps: mechanize(torch.optim.AdamW, backend="triton")(ps, lr=1e-3), compile_whole=True, steps=8
    )
    assert frames[-1] <= 2
    torch.testing.assert_close(comp_opt.mechanic_scale, eager_opt.mechanic_scale, rtol=1e-5, atol=0)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("whole", [True, False], ids=["compile(opt.step)", "compile=True"])
def test_both_compiled_forms_trace_the_per_tensor_code(whole, monkeypatch):
    """Inductor gets the per-tensor code in both forms (compile=True compiles the same whole step)."""
    from mechanic_fast import _layout, functional

    traced = []
    original = functional.select_impl

    def spy(*args, **kwargs):
        impl = original(*args, **kwargs)
        if torch.compiler.is_compiling():
            traced.append(impl.name)
        return impl

    monkeypatch.setattr(_layout, "select_impl", spy)
    factory = lambda ps: mechanize(torch.optim.AdamW, compile=not whole)(ps, lr=1e-3)  # noqa: E731
    _train(factory, compile_whole=whole, steps=3)
    assert traced and set(traced) <= {"per_tensor", "per_tensor_opaque_sums"}, traced


@pytest.mark.parametrize("sums", ["custom_op", "traced"])
def test_compiled_sums_through_the_custom_op_or_traced_give_the_eager_result(sums, monkeypatch):
    """Many small tensors on CPU (these) take their sums through `mechanic_fast::inner_products`, one node
    of the graph; few large ones (emulated by a threshold of 1 element) are traced tensor by tensor."""
    from mechanic_fast import functional

    if sums == "traced":
        monkeypatch.setattr(functional, "PER_TENSOR_MIN_NUMEL", 1)
    factory = lambda ps: mechanize(torch.optim.AdamW)(ps, lr=1e-3, foreach=True)  # noqa: E731
    eager, eager_opt, _ = _train(factory, steps=12)
    graphs = []
    compiled, compiled_opt, frames = _train(factory, compile_whole=True, steps=12, graphs=graphs)
    ops = [n for gm in graphs for n in gm.graph.nodes if "mechanic_fast.inner_products" in str(n.target)]
    assert len(ops) == (1 if sums == "custom_op" else 0), [gm.graph for gm in graphs]
    assert frames[-1] <= 2
    torch.testing.assert_close(compiled_opt.mechanic_scale, eager_opt.mechanic_scale, rtol=1e-5, atol=0)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_inductor_options_give_the_same_code_in_a_smaller_fusion_search(monkeypatch):
    """`torch.compile(opt.step, options=mechanic_fast.INDUCTOR_OPTIONS)`: inductor's fusion search runs
    with fewer neighbours per shared buffer (the options reach it, and only that compile), and writes the
    same code as with its defaults, over enough tensors (12: groups of up to 24 nodes) that the smaller
    search skips pairs."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor import scheduler
    from torch._inductor.utils import run_and_get_code

    from mechanic_fast import INDUCTOR_OPTIONS

    default = inductor_config.max_fusion_buffer_group_pairwise_attempts
    searched = []
    original = scheduler.Scheduler.get_possible_fusions

    def spy(self, *args, **kwargs):
        searched.append(inductor_config.max_fusion_buffer_group_pairwise_attempts)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(scheduler.Scheduler, "get_possible_fusions", spy)
    codes, results = [], []
    # a cached graph would skip the search; patch() scopes the setting to this block
    with inductor_config.patch(fx_graph_cache=False):
        for options in (None, INDUCTOR_OPTIONS):
            torch._dynamo.reset()
            searched.clear()
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(4, 4, generator=gen)) for _ in range(12)]
            opt = mechanize(torch.optim.AdamW)(params, lr=1e-2, foreach=True)
            step = torch.compile(opt.step, options=options)
            for _ in range(2):  # the first step creates Mechanic's state (eagerly); the second is compiled
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                _, code = run_and_get_code(step)
            wanted = INDUCTOR_OPTIONS["max_fusion_buffer_group_pairwise_attempts"] if options else default
            assert searched and set(searched) == {wanted}, searched
            codes.append([re.sub(r"/tmp/\S+|# kernel path: .*|# AOT ID: .*", "", c) for c in code])
            results.append([p.detach().clone() for p in params])
    assert inductor_config.max_fusion_buffer_group_pairwise_attempts == default
    assert codes[0] == codes[1]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
