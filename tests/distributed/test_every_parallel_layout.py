"""One scale for the whole model under every torch parallelism: each layout on 2 or 4 gloo ranks against
one process training the whole model on the same global batch (float64), after every one of 20 steps:
every rank's scale, and the full parameters' displacement from their start, within 1e-9 relative."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from dist_layouts import STEPS, reference
from helpers import launch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
]
RTOL = 1e-9

# layout -> ranks it runs on (the layouts of one rank count run in one launch, one after another)
LAYOUTS = {
    "ddp": 2,
    "tp": 2,
    "tp_sequence_parallel": 2,
    "fsdp2_bias_of_one": 2,
    "fsdp1_flat": 2,
    "fsdp1_orig_params": 2,
    "zero": 2,
    "zero_naive": 2,
    "partition": 2,
    "fsdp2_rank_holds_nothing": 2,
    "fsdp2_gaps": 2,
    "fsdp2_empty_shards": 4,
    "fsdp2_tp": 4,
    "hsdp": 4,
    "fsdp1_hybrid": 4,
}
# the model each layout trains, as reference()'s arguments (out, hidden); the 12-16-5 MLP otherwise
MODELS = {
    "fsdp2_bias_of_one": (1, True),
    "fsdp2_rank_holds_nothing": (1, False),
    "fsdp2_gaps": (5, True, True),  # the first layer skips some steps (dist_layouts.in_gap)
}
CHECKPOINT_LAYOUTS = {"fsdp2_tp_dcp": 4}


@functools.cache
def _run(world: int, out_dir: str) -> list:
    names = [name for name, w in {**LAYOUTS, **CHECKPOINT_LAYOUTS}.items() if w == world]
    launch("dist_layouts.py", world, [out_dir, *names])
    return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return lambda world: _run(world, str(tmp_path_factory.mktemp(f"layouts{world}")))


@functools.cache
def _reference(model: tuple) -> dict:
    return reference(*model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_has_the_scale_and_parameters_of_one_process(layout, results):
    ranks = [r[layout] for r in results(LAYOUTS[layout])]
    for rank, got in enumerate(ranks):
        assert "error" not in got, f"rank {rank}:\n{got['error']}"
    ref = _reference(MODELS.get(layout, (5, True)))
    assert ref["scale"][-1] > 5e-5  # the tuner moved far from s_init = 1e-6
    for rank, got in enumerate(ranks):
        for t in range(STEPS):
            want = ref["scale"][t]
            assert abs(got["scale"][t] - want) <= RTOL * want, (rank, t, got["scale"][t], want)
        for t in range(STEPS):  # parameters: gathered by every rank, checked on every rank
            assert got["params"][t].keys() == ref["params"][t].keys(), (rank, t)
            for name, want in ref["params"][t].items():
                start = ref["init"][name]  # a wrong scale moves parameters by a fraction of their steps
                assert _rel(got["params"][t][name] - start, want - start) <= RTOL, (rank, t, name)


@pytest.mark.parametrize("layout", list(CHECKPOINT_LAYOUTS))
def test_dcp_checkpoint_resumes_bit_identically(layout, results):
    for rank, got in enumerate(r[layout] for r in results(CHECKPOINT_LAYOUTS[layout])):
        assert "error" not in got, f"rank {rank}:\n{got['error']}"
        want, resumed = got["uninterrupted"], got["resumed"]
        assert want["scale"] > 5e-5 and resumed["scale"] == want["scale"], (rank, resumed, want)
        for name, value in want["params"].items():
            assert torch.equal(resumed["params"][name], value), (rank, name)


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of one rank in this process, for the API's own checks."""
    import os
    from unittest import mock

    from helpers import free_port

    with mock.patch.dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()):
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def test_a_partition_group_is_shared_by_deepcopy_and_refused_by_pickle(one_rank_group):
    import copy
    import pickle

    from mechanic_fast import mechanize

    model = torch.nn.Linear(4, 2)
    opt = mechanize(torch.optim.AdamW, partition_group=one_rank_group)(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin._mechanic_partition_group.group is one_rank_group
    twin.step()
    with pytest.raises(TypeError, match="partition_group cannot be pickled.*state_dict"):
        pickle.dumps(opt)
    restored = mechanize(torch.optim.AdamW, partition_group=one_rank_group)(model.parameters(), lr=1e-2)
    restored.load_state_dict(opt.state_dict())  # the documented way across processes
    assert torch.equal(restored.mechanic_scale, opt.mechanic_scale)


def test_zero_redundancy_optimizer_is_reached_through_either_route(one_rank_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from mechanic_fast import is_mechanized, mechanic_scale, mechanize

    model = torch.nn.Linear(4, 2)
    documented = mechanize(
        ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    )
    naive = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=mechanize(torch.optim.SGD), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    for zero in (documented, naive):
        zero.step()  # the naive route's partition is joined before the mechanized optimizer's first step
        assert is_mechanized(zero) and zero.optim._mechanic_partition_group.group is zero.process_group
        assert mechanic_scale(zero).shape == ()
    with pytest.raises(TypeError, match="already mechanized"):
        mechanize(documented)
