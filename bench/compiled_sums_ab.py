"""A/B of the compiled step on one shape set: the sums of many small tensors through the custom op
(`mechanic_fast::inner_products`, the default) or traced tensor by tensor, each against bare AdamW
compiled, stepping in turn in one process (medians of 40 steps, ms).

    python bench/compiled_sums_ab.py opaque 200x64x64 && python bench/compiled_sums_ab.py traced 200x64x64
"""

import statistics
import sys
import time

import torch

from mechanic_fast import functional, mechanize
from mechanic_fast.tools import sweep as benchmark

mode, name = sys.argv[1], sys.argv[2]
if mode == "traced":
    functional.PER_TENSOR_OPAQUE_SUMS = functional.PER_TENSOR  # what select_impl picks instead
shapes = benchmark.shape_sets(False)[name]
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
grads = [torch.randn(s, generator=gen) for s in shapes]
opt = mechanize(torch.optim.AdamW)(params, lr=1e-3, weight_decay=0.01, foreach=True)
bare = torch.optim.AdamW(
    [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, weight_decay=0.01, foreach=True
)
s1, s2 = torch.compile(opt.step), torch.compile(bare.step)


def setg():
    for p, g in zip(params, grads):
        p.grad = g
    for p, g in zip(bare.param_groups[0]["params"], grads):
        p.grad = g


for _ in range(5):
    setg()
    s1()
    s2()
a, b = [], []
for _ in range(40):
    setg()
    t = time.perf_counter()
    s1()
    a.append(time.perf_counter() - t)
    t = time.perf_counter()
    s2()
    b.append(time.perf_counter() - t)
m, n = statistics.median(a) * 1e3, statistics.median(b) * 1e3
print(f"{mode} {name} mech {m:.2f} bare {n:.2f} overhead {m - n:.2f} ms")
