"""Synchronous data parallelism equals single-process training with the global batch.

P ranks x per-rank batch b, plain SGD with momentum and weight decay, a model without batch norm:
after tens of steps the parameters must equal a single-process torch run with batch P*b, which
every rank also computes locally as the independent reference.
"""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpisgd
from mpisgd import ConfigError, DistributedOptimizer

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
PER_RANK_BATCH, STEPS, FEATURES, CLASSES = 8, 30, 12, 4


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES))


def dataset():
    rng = np.random.default_rng(0)
    n = STEPS * PER_RANK_BATCH * P
    x = torch.from_numpy(rng.standard_normal((n, FEATURES)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, CLASSES, n))
    return x, y


def digest(model):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_data_parallel_sgd_equals_single_process_global_batch(accumulate, overlap):
    x, y = dataset()
    global_batch = PER_RANK_BATCH * P

    # independent reference: one process, batch P*b, plain torch
    reference = make_model(seed=1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(STEPS):
        rows = slice(step * global_batch, (step + 1) * global_batch)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x[rows]), y[rows]).backward()
        ref_opt.step()

    # distributed: different initial weights on every rank until broadcast makes them rank 0's
    model = make_model(seed=1 if RANK == 0 else 100 + RANK)
    mpisgd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
                               model.named_parameters(), backward_passes_per_step=accumulate,
                               overlap=overlap, bucket_bytes=600)  # small buckets: several per step
    micro = PER_RANK_BATCH // accumulate
    for step in range(STEPS):
        start = step * global_batch + RANK * PER_RANK_BATCH
        opt.zero_grad()
        for k in range(accumulate):  # gradient accumulation: sum of micro-batch mean losses / accumulate
            rows = slice(start + k * micro, start + (k + 1) * micro)
            (F.cross_entropy(model(x[rows]), y[rows]) / accumulate).backward()
        opt.step()

    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
    assert len(set(WORLD.allgather(digest(model)))) == 1, "replicas drifted apart"


def test_overlap_with_an_unused_parameter():
    # the second head is never used: its bucket is completed at step() with zero gradients
    model = torch.nn.ModuleDict({"body": make_model(seed=2), "unused": torch.nn.Linear(3, 3)})
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                               overlap=True, bucket_bytes=64)
    before = model["unused"].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model["body"](torch.ones(2, FEATURES) * (RANK + 1)).sum().backward()
        opt.step()
    assert torch.equal(model["unused"].weight, before)
    assert len(set(WORLD.allgather(digest(model["body"])))) == 1


def test_broadcast_optimizer_state_makes_momentum_equal():
    model = make_model(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, FEATURES) * (RANK + 1)).sum().backward()
    opt.step()  # momentum buffers now differ by rank
    mpisgd.broadcast_optimizer_state(opt, root_rank=0)
    buffers = [opt.state[p]["momentum_buffer"].numpy().tobytes() for p in model.parameters()]
    assert len(set(WORLD.allgather(hashlib.sha256(b"".join(buffers)).hexdigest()))) == 1


def test_distributed_optimizer_validates_eagerly():
    model = make_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        DistributedOptimizer(object(), model.named_parameters())
    with pytest.raises(ConfigError, match="not in named_parameters"):
        DistributedOptimizer(opt, list(model.named_parameters())[:1])
    with pytest.raises(ConfigError, match="duplicate names"):
        named = list(model.named_parameters())
        DistributedOptimizer(opt, named + [(named[0][0], named[1][1])])
    with pytest.raises(ConfigError, match="backward_passes_per_step"):
        DistributedOptimizer(opt, model.named_parameters(), backward_passes_per_step=0)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        DistributedOptimizer(opt, model.named_parameters(), algorithm="tree")


def test_non_finite_gradient_is_reported_on_every_rank():
    model = make_model(seed=0)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    scale = float("nan") if RANK == P - 1 else 1.0  # only the last rank produces a NaN
    (model(torch.ones(2, FEATURES)).sum() * scale).backward()
    with pytest.raises(mpisgd.NonFiniteGradientError, match="non-finite"):
        opt.step()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_element_is_found_and_its_parameter_named(value):
    model = make_model(seed=0)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    model(torch.ones(2, FEATURES)).sum().backward()
    name, param = list(model.named_parameters())[-1]
    if RANK == P - 1:
        param.grad.view(-1)[-1] = value  # one element of one parameter on one rank
    with pytest.raises(mpisgd.NonFiniteGradientError) as info:
        opt.step()
    others = [n for n, _ in model.named_parameters() if n != name]
    assert name in str(info.value) and not any(n in str(info.value) for n in others), str(info.value)
