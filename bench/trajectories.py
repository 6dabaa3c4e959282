"""Fingerprints of mechanized trajectories, to check that a refactor changes no bit of any of them.

Every layout, implementation route and variant a step can take (Delta stored or recomputed, x_ref kept
for bfloat16, ref_dtype float32, many small or few large tensors, Triton under its interpreter, maximize,
a parameter that skips steps, a 0-d parameter, mixed dtypes in one optimizer, eager and compiled) runs
a few steps on fixed gradients; the SHA-256 of the final parameters and all optimizer state is printed.

    python bench/trajectories.py --save /tmp/before.json      # before the change
    python bench/trajectories.py --compare /tmp/before.json   # after it: exits 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, List

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

import torch  # noqa: E402

from mechanic_fast import mechanize  # noqa: E402
from mechanic_fast.functional import triton_runnable  # noqa: E402

SMALL = [(7,), (33, 5), (), (300,), (4, 4)]
LARGE = [(1 << 17,), (512, 300)]


def _digest(opt: torch.optim.Optimizer, params: List[torch.Tensor]) -> str:
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if torch.is_tensor(value):
            h.update(str(value.dtype).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    feed(params)
    state = opt.state_dict()
    feed(state["state"])
    feed([{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]])
    return h.hexdigest()[:16]


def run(
    shapes: List[Any],
    dtype: torch.dtype,
    base: str = "adamw",
    steps: int = 8,
    skip: bool = False,
    maximize: bool = False,
    mixed: bool = False,
    **options: Any,
) -> str:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    if mixed:  # a float64 and a float32 group in one optimizer
        params.append(torch.randn(40, generator=gen, dtype=torch.float64).float().requires_grad_())
    groups: List[Dict[str, Any]] = [{"params": params[:-1]}, {"params": params[-1:], "maximize": maximize}]
    if base == "adamw":
        opt = mechanize(torch.optim.AdamW, **options)(groups, lr=1e-2, weight_decay=0.1)
    else:
        opt = mechanize(torch.optim.SGD, **options)(groups, lr=0.1, momentum=0.9)
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            idle = skip and i == 0 and step in (2, 3, 4)
            p.grad = None if idle else g
        opt.step()
    return _digest(opt, params)


def cases() -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    dtypes = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
    for dname, dtype in dtypes.items():
        for sname, shapes in (("small", SMALL), ("large", LARGE)):
            for base in ("adamw", "sgdm"):
                for variant in ("invariant", "paper", "mechanic_pytorch"):
                    opts: Dict[str, Any] = {"backend": "foreach"}
                    if variant == "paper":
                        opts["lr_invariant"] = False
                    elif variant == "mechanic_pytorch":
                        opts["variant"] = "mechanic_pytorch"
                    out[f"{dname}/{sname}/{base}/{variant}"] = dict(
                        shapes=shapes, dtype=dtype, base=base, **opts
                    )
            out[f"{dname}/{sname}/skip+maximize"] = dict(shapes=shapes, dtype=dtype, skip=True, maximize=True)
            if dtype != torch.bfloat16:
                out[f"{dname}/{sname}/recomputed"] = dict(shapes=shapes, dtype=dtype, store_delta=False)
                out[f"{dname}/{sname}/recomputed/mp"] = dict(
                    shapes=shapes, dtype=dtype, store_delta=False, variant="mechanic_pytorch"
                )
            else:
                out[f"{dname}/{sname}/ref_f32"] = dict(shapes=shapes, dtype=dtype, ref_dtype="float32")
            out[f"{dname}/{sname}/fresh_workspace"] = dict(shapes=shapes, dtype=dtype, keep_workspace=False)
            out[f"{dname}/{sname}/mixed"] = dict(shapes=shapes, dtype=dtype, mixed=True, skip=True)
            if sname == "small" and triton_runnable(torch.device("cpu")):
                for layout in ({}, {"store_delta": False}) if dtype != torch.bfloat16 else ({},):
                    name = f"{dname}/{sname}/triton" + ("/recomputed" if layout else "")
                    out[name] = dict(shapes=shapes, dtype=dtype, backend="triton", steps=4, **layout)
    for sname, shapes in (("small", SMALL), ("large", [(1 << 16,), (256, 300)])):
        out[f"compiled/f32/{sname}"] = dict(shapes=shapes, dtype=torch.float32, compile=True, steps=4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--save")
    parser.add_argument("--compare")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    results = {}
    for name, kwargs in cases().items():
        if args.no_compile and kwargs.get("compile"):
            continue
        results[name] = run(**kwargs)
        print(f"{name:40s} {results[name]}", flush=True)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [k for k in results if k in before and before[k] != results[k]]
        missing = [k for k in before if k not in results]
        print(f"{len(results)} cases; {len(differ)} differ: {differ}; not run: {missing}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
