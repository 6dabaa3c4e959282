"""Everything only a GPU can prove, in one command (run it on a machine with CUDA):

    python bench/gpu_check.py --out-dir gpu_out/          # ~5-10 minutes on one GPU
    python bench/gpu_check.py --out-dir gpu_out/ --quick  # ~1-2 minutes

1. the test suite with CUDA present: the CUDA-only tests (Triton kernels compiled for real, `auto`
   picking Triton, CUDA graphs with a capturable base) run instead of skipping;
2. the Triton backend, compiled (not the interpreter), and the foreach backend's tensor-by-tensor form,
   against the foreach backend on CUDA, over many shapes and dtypes and both variants: parameters and
   scale after 20 steps;
3. a whole mechanized step captured in a CUDA graph and replayed, against the eager run;
4. the benchmark sweep on cuda (JSON, markdown and PNG into --out-dir), with the Triton rows.

Exits non-zero when a check fails; prints one line per check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, List, Tuple

import torch

from mechanic_fast import functional, mechanize
from mechanic_fast.tools import sweep as benchmark


def _run_steps(
    opt_factory: Callable, shapes, dtype, steps: int = 20
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes] for _ in range(steps)]
    opt = opt_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().float().cpu() for p in params], opt.mechanic_scale.cpu()


def check_triton_matches_foreach() -> List[str]:
    failures = []
    shape_sets = {
        "mixed": [(4097,), (33, 65), (1,), (), (128, 256), (3, 5, 7)],
        "many": [(64, 64)] * 200,
        "large": [(1024, 1024)] * 2,
    }
    for name, shapes in shape_sets.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for variant in ("paper", "mechanic_pytorch"):
                if dtype == torch.bfloat16 and variant == "mechanic_pytorch":
                    continue
                runs = {}
                # foreach twice: as chosen on CUDA (flat buffers below 2^22 elements per tensor) and with
                # its tensor-by-tensor form forced (gradients reduced in place, x written per tensor)
                for label, backend, threshold in (
                    ("foreach", "foreach", None),
                    ("foreach per tensor", "foreach", 1),
                    ("triton", "triton", None),
                ):
                    default = functional.PER_TENSOR_MIN_NUMEL_ACCELERATOR
                    functional.PER_TENSOR_MIN_NUMEL_ACCELERATOR = threshold or default
                    try:
                        Opt = mechanize(torch.optim.AdamW, backend=backend, variant=variant)
                        runs[label] = _run_steps(lambda ps, Opt=Opt: Opt(ps, lr=1e-2), shapes, dtype)
                    finally:
                        functional.PER_TENSOR_MIN_NUMEL_ACCELERATOR = default
                pf, sf = runs["foreach"]
                tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
                for label in ("triton", "foreach per tensor"):
                    params, scale = runs[label]
                    try:
                        torch.testing.assert_close(params, pf, **tol)
                        torch.testing.assert_close(scale, sf, **tol)
                    except AssertionError as err:
                        failures.append(f"{label} vs foreach {name} {dtype} {variant}: {err}")
    return failures


def check_cuda_graph() -> List[str]:
    """A mechanized step (capturable AdamW, tensor lr) captured whole and replayed == eager steps."""
    shapes = [(256, 128), (128,), (64, 64, 3)]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(12)]

    def make(params):
        return mechanize(torch.optim.AdamW)(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)

    def fresh():
        g = torch.Generator().manual_seed(2)
        return [torch.nn.Parameter(torch.randn(s, generator=g).cuda()) for s in shapes]

    eager = fresh()
    opt = make(eager)
    for step_grads in grads:
        for p, g in zip(eager, step_grads):
            p.grad = g.clone()
        opt.step()

    graphed = fresh()
    gopt = make(graphed)
    static = [torch.zeros_like(p) for p in graphed]
    for p, g in zip(graphed, static):
        p.grad = g
    for g, new in zip(static, grads[0]):  # first steps eagerly: state creation, warm-up on a side stream
        g.copy_(new)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step_grads in grads[:3]:
            for g, new in zip(static, step_grads):
                g.copy_(new)
            gopt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gopt.step()
    for step_grads in grads[3:]:
        for g, new in zip(static, step_grads):
            g.copy_(new)
        graph.replay()
    torch.cuda.synchronize()
    try:
        torch.testing.assert_close(
            [p.detach() for p in graphed], [p.detach() for p in eager], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(gopt.mechanic_scale, opt.mechanic_scale, rtol=1e-5, atol=1e-8)
    except AssertionError as err:
        return [f"CUDA graph replay vs eager: {err}"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="directory for the sweep's JSON, markdown and PNG")
    parser.add_argument("--quick", action="store_true", help="the quick sweep (small shapes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "not integration", "tests"], check=False
    )
    results["test suite with CUDA"] = [] if tests.returncode == 0 else [f"pytest exit {tests.returncode}"]
    results["triton (compiled) == foreach"] = check_triton_matches_foreach()
    results["CUDA graph of a mechanized step"] = check_cuda_graph()
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    sweep = benchmark.run_sweep(["cuda"], args.quick, out("sweep.json"), out("sweep.md"), out("sweep.png"))
    print(benchmark.markdown_table(sweep["rows"]))
    failed = False
    for name, failures in results.items():
        print(f"{'FAIL' if failures else 'ok  '} {name}")
        for failure in failures:
            print(f"     {failure}")
        failed = failed or bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
