"""Writes tests/data/round1_checkpoints.pt with round 1's code (commit 4e310e0, checkpoint layout with a
top-level "mechanic" key): for store_delta False/True, the parameters and optimizer state after 8 steps
and, as round 1 computed them, the parameters and scale after 4 more steps.

usage: git worktree add /tmp/r1 4e310e0 && PYTHONPATH=/tmp/r1 python tests/make_round1_fixture.py
"""

from __future__ import annotations

import copy
import os

import torch

import mechanic_fast

SHAPES = [(6, 4), (4,), (3, 2, 2)]


def grads(params, t):
    return [torch.sin(p.detach() * (t + 1)) + 0.1 * (i + 1) for i, p in enumerate(params)]


def params():
    gen = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def run(opt, ps, start, steps):
    for t in range(start, start + steps):
        for p, g in zip(ps, grads(ps, t)):
            p.grad = g
        opt.step()


def main() -> None:
    out = {}
    for store_delta in (False, True):
        ps = params()
        Opt = mechanic_fast.mechanize(torch.optim.AdamW, store_delta=store_delta)
        opt = Opt(ps, lr=0.02, weight_decay=0.01)
        run(opt, ps, 0, 8)
        saved = {"params": [p.detach().clone() for p in ps], "opt": copy.deepcopy(opt.state_dict())}
        assert "mechanic" in saved["opt"], "not round 1's layout"
        run(opt, ps, 8, 4)
        saved["after"] = [p.detach().clone() for p in ps]
        saved["scale_after"] = opt.mechanic_scale.clone()
        out[f"store_delta={store_delta}"] = saved
    torch.save(out, os.path.join(os.path.dirname(__file__), "data", "round1_checkpoints.pt"))


if __name__ == "__main__":
    main()
