"""The model and data shared by the distributed tests and their single-process reference."""

from __future__ import annotations

import torch

from mechanic_fast import mechanize

STEPS = 25


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def make_opt(params, base: str = "adamw"):
    if base == "sgd":  # keeps no state of its own: everything in its checkpoint is Mechanic's
        return mechanize(torch.optim.SGD, lr_invariant=False)(params, lr=3e-2)
    return mechanize(torch.optim.AdamW, lr_invariant=False)(params, lr=3e-3, weight_decay=0.01)


def batch(t: int):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(32, 12, generator=gen)
    return x, torch.sin(x[:, :5] * 2)


def train(model, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        x, y = batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def result(model, opt) -> dict:
    """Full parameters (gathered from shards) and the scale."""
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in params], "scale": opt.mechanic_scale.clone()}
