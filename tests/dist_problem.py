"""The model and data shared by the distributed tests and their single-process reference."""

from __future__ import annotations

import torch

from mechanic_fast import mechanize

STEPS = 25


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def make_opt(params):
    return mechanize(torch.optim.AdamW)(params, lr=3e-3, weight_decay=0.01)


def batch(t: int):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(32, 12, generator=gen)
    return x, torch.sin(x[:, :5] * 2)
