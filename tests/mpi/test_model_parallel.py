"""Model parallelism equals the unsplit model in one process, and fails on every rank together.

Runs inside an MPI job at any size: each configuration (stages K, tensor splits T, micro-batches M,
schedule, dtype) that fits COMM_WORLD's size runs, with R = size/(K*T) replicas. The reference is plain
torch in this process: the unsplit model, the same seed, the same global batch.
"""

import itertools
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpisgd import checkpoint as ckpt
from mpisgd.comm import block_bounds
from mpisgd.errors import JobFailedError, SharedConfigError
from mpisgd.modelparallel import ModelParallel, unsplit_optimizer_state

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
FEATURES, CLASSES, STEPS = 10, 5, 3
BATCH = max(16, 8 * P)  # 4 micro-batches of at least 2 rows on every replica
TOLERANCE = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-6}}


def make_model(dtype=torch.float64, *, batch_norm=False):
    """Four layers, so K = 4 is one layer per stage; the Tanh alone is a stage without parameters."""
    torch.manual_seed(3)
    middle = nn.BatchNorm1d(24) if batch_norm else nn.Tanh()
    return nn.Sequential(nn.Linear(FEATURES, 24), middle, nn.Linear(24, 16), nn.Linear(16, CLASSES)).to(dtype)


def batches(dtype, steps=STEPS, batch=BATCH):
    generator = torch.Generator().manual_seed(11)
    return [(torch.randn(batch, FEATURES, generator=generator, dtype=dtype),
             torch.randint(0, CLASSES, (batch,), generator=generator)) for _ in range(steps)]


def rows_of(mp, name, full):
    """The part of the unsplit tensor ``full`` (named ``name``) that this rank holds."""
    local = dict(mp.module.named_parameters())[name]
    if local.shape == full.shape:
        return full
    edges = block_bounds(full.shape[0], mp.splits)
    return full[edges[mp.split]:edges[mp.split + 1]]


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=1e-3)


def fits(stages, splits, micro_batches):
    return P % (stages * splits) == 0 and micro_batches >= stages


CONFIGS = [
    (stages, splits, micro_batches, schedule, dtype, balance)
    for stages, splits, micro_batches, schedule, dtype in itertools.product(
        (1, 2, 3, 4), (1, 2), (1, 2, 4), ("gpipe", "1f1b"), (torch.float64, torch.float32))
    if fits(stages, splits, micro_batches) and (dtype == torch.float64 or micro_batches == 4)
    for balance in (["uniform", [1, 3]] if stages == 2 else ["params", [1, 1, 2]] if stages == 3 else ["uniform"])
]


def configuration_id(config):
    stages, splits, micro_batches, schedule, dtype, balance = config
    return f"K{stages}-T{splits}-M{micro_batches}-{schedule}-{str(dtype)[6:]}-{balance}"


@pytest.mark.parametrize("config", CONFIGS, ids=[configuration_id(c) for c in CONFIGS])
def test_equals_the_unsplit_model(config):
    stages, splits, micro_batches, schedule, dtype, balance = config
    reference = make_model(dtype)
    reference_optimizer = sgd(reference.parameters())
    with ModelParallel(make_model(dtype), stages=stages, micro_batches=micro_batches, schedule=schedule,
                       balance=balance, tensor_parallel=splits) as mp:
        assert mp.replicas == P // (stages * splits)
        assert WORLD.allgather(tuple(mp.coordinates)) == [
            (r // (stages * splits), r // splits % stages, r % splits) for r in range(P)]
        optimizer = sgd(mp.module.parameters()) if mp.has_parameters else None
        for x, y in batches(dtype):
            reference_optimizer.zero_grad()
            expected = F.cross_entropy(reference(x), y)
            expected.backward()
            if optimizer is not None:
                optimizer.zero_grad()
            loss = mp.train_step(x, y, F.cross_entropy)
            assert loss == pytest.approx(expected.item(), rel=1e-12 if dtype == torch.float64 else 1e-5)
            full = dict(reference.named_parameters())
            for name, p in mp.module.named_parameters():
                torch.testing.assert_close(p.grad, rows_of(mp, name, full[name].grad), **TOLERANCE[dtype])
            reference_optimizer.step()
            if optimizer is not None:
                optimizer.step()
        full = dict(reference.named_parameters())
        for name, p in mp.module.named_parameters():
            torch.testing.assert_close(p, rows_of(mp, name, full[name]), **TOLERANCE[dtype])
        held = micro_batches if schedule == "gpipe" else min(stages - mp.stage, micro_batches)
        assert mp.most_micro_batches_held == held
        gathered = mp.state_dict(optimizer)
        if RANK == 0:
            assert list(gathered["model"]) == list(reference.state_dict())
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(gathered["model"][key], value, **TOLERANCE[dtype])
        else:
            assert gathered is None


def test_a_stage_without_parameters_has_none():
    stages = P if P <= 4 else 1
    with ModelParallel(make_model(), stages=stages, micro_batches=4, balance="uniform") as mp:
        counts = WORLD.allgather(len(mp.layers))
        assert sum(counts) == 4 and min(counts) >= 1
        assert mp.has_parameters == any(i in mp.layers for i in (0, 2, 3))
        if stages == 4:
            assert mp.layers == range(RANK, RANK + 1) and mp.has_parameters == (RANK != 1)


def test_batch_norm_statistics_per_micro_batch_and_running_over_all():
    """Training normalizes each micro-batch by its own statistics; the running statistics take every
    micro-batch in turn (M momentum updates per step), then the replicas' copies are averaged."""
    stages = 2 if P % 2 == 0 else 1
    replicas, micro_batches = P // stages, 4
    references = [make_model(batch_norm=True) for _ in range(replicas)]
    with ModelParallel(make_model(batch_norm=True), stages=stages, micro_batches=micro_batches) as mp:
        for x, y in batches(torch.float64, steps=2):
            grads, buffers = [], []
            share = len(x) // replicas
            for a, reference in enumerate(references):
                reference.zero_grad()
                for xm, ym in zip(torch.split(x[a * share:(a + 1) * share], share // micro_batches),
                                  torch.split(y[a * share:(a + 1) * share], share // micro_batches)):
                    (F.cross_entropy(reference(xm), ym) / micro_batches).backward()
                grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
                buffers.append({n: b.clone() for n, b in reference.named_buffers()})
            mean_grad = {n: sum(g[n] for g in grads) / replicas for n in grads[0]}
            mean_buffer = {n: sum(b[n] for b in buffers) / replicas if b.is_floating_point() else b
                           for n, b in buffers[0].items()}
            for reference in references:  # the replicas stay identical, as mp's do
                for n, b in reference.named_buffers():
                    b.copy_(mean_buffer[n])
            mp.module.zero_grad()
            mp.train_step(x, y, F.cross_entropy)
            for name, p in mp.module.named_parameters():
                torch.testing.assert_close(p.grad, mean_grad[name], **TOLERANCE[torch.float64])
            for name, b in mp.module.named_buffers():
                torch.testing.assert_close(b, mean_buffer[name], **TOLERANCE[torch.float64])


_DIRECTORIES = []


def shared_directory():
    """A directory every rank sees (rank 0 makes it; removed after the module's tests)."""
    path = tempfile.mkdtemp(prefix="mpisgd-mp-") if RANK == 0 else None
    path = WORLD.bcast(path, root=0)
    _DIRECTORIES.append(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def remove_shared_directories():
    yield
    WORLD.Barrier()
    if RANK == 0:
        for path in _DIRECTORIES:
            shutil.rmtree(path, ignore_errors=True)


def test_checkpoint_loads_unsplit_and_resumes_at_another_stage_count():
    stages = P if P <= 4 else 1
    data = batches(torch.float64, steps=4)
    reference = make_model()
    reference_optimizer = sgd(reference.parameters())
    for x, y in data:
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        reference_optimizer.step()
    path = f"{shared_directory()}/split.h5"
    with ModelParallel(make_model(), stages=stages, micro_batches=4, balance="uniform") as mp:
        optimizer = sgd(mp.module.parameters()) if mp.has_parameters else None
        for x, y in data[:2]:
            if optimizer is not None:
                optimizer.zero_grad()
            mp.train_step(x, y, F.cross_entropy)
            if optimizer is not None:
                optimizer.step()
        mp.save_checkpoint(path, optimizer, extra={"step": 2})
    WORLD.Barrier()
    # unsplit, in this process, continues exactly
    state = ckpt.load_checkpoint(path)
    unsplit = make_model()
    unsplit.load_state_dict(state["model_state"])
    unsplit_optimizer = sgd(unsplit.parameters())
    unsplit_optimizer.load_state_dict(unsplit_optimizer_state(state["optimizer_state"], unsplit))
    for x, y in data[2:]:
        unsplit_optimizer.zero_grad()
        F.cross_entropy(unsplit(x), y).backward()
        unsplit_optimizer.step()
    for ours, theirs in zip(unsplit.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[torch.float64])
    # and at another number of stages (1 where the first run had several, else as many as fit)
    other = 1 if stages > 1 else (2 if P % 2 == 0 else 1)
    with ModelParallel(make_model(dtype=torch.float64), stages=other, micro_batches=4) as mp:
        optimizer = sgd(mp.module.parameters()) if mp.has_parameters else None
        sections = mp.load_checkpoint(path, optimizer)
        assert sections["extra"]["step"] == 2
        for x, y in data[2:]:
            if optimizer is not None:
                optimizer.zero_grad()
            mp.train_step(x, y, F.cross_entropy)
            if optimizer is not None:
                optimizer.step()
        full = dict(reference.named_parameters())
        for name, p in mp.module.named_parameters():
            torch.testing.assert_close(p, rows_of(mp, name, full[name]), **TOLERANCE[torch.float64])


# ---- failures end on every rank, with the same message, within seconds ---------------------------

class FailsAt(nn.Module):
    """Identity until forward call ``at``, then ``change`` applied to its input (or raises)."""

    def __init__(self, at, change):
        super().__init__()
        self.calls, self.at, self.change = 0, at, change

    def forward(self, x):
        self.calls += 1
        return self.change(x) if self.calls > self.at else x


def boom(x):
    raise ValueError("boom in the user's layer")


def failing_model(change, at):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(FEATURES, 16), FailsAt(at, change), nn.Linear(16, 16), nn.Linear(16, CLASSES))


def expect_failure_everywhere(mp, x, y, *patterns):
    """Steps until the failure; every rank raises the same JobFailedError (a hang is caught by the test's
    timeout, not by a wall-clock assertion)."""
    with pytest.raises(JobFailedError) as caught:
        for _ in range(3):
            mp.train_step(x, y, F.cross_entropy)
    text = str(caught.value)
    assert len(set(WORLD.allgather(text))) == 1, text
    for pattern in patterns:
        assert pattern in text, text
    with pytest.raises(JobFailedError, match="earlier model-parallel step failed"):
        mp.train_step(x, y, F.cross_entropy)
    mp.free()


def boundary_stages():
    return P if 2 <= P <= 4 else None


def stage_of_the_failing_layer(stages):
    """The failing layer is layer 1: on stage 0 with the balances below, on stage 1 at K = 4."""
    return 1 if stages == 4 else 0


def balance_with_layer_one_on_stage_zero(stages):
    return {2: [2, 2], 3: [2, 1, 1], 4: "uniform"}[stages]


@pytest.mark.skipif(boundary_stages() is None, reason="needs a stage boundary (2..4 ranks)")
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_shape_change_between_stages_fails_on_every_rank(schedule):
    x, y = batches(torch.float32, steps=1)[0]
    stages, rows = boundary_stages(), BATCH // 4
    mp = ModelParallel(failing_model(lambda t: t[:, :-1], at=4 + 2), stages=stages, micro_batches=4,
                       schedule=schedule, balance=balance_with_layer_one_on_stage_zero(stages))
    expect_failure_everywhere(mp, x, y, f"stage {stage_of_the_failing_layer(stages)} of {stages}", "micro-batch 2",
                              f"shape ({rows}, 15) instead of ({rows}, 16)")


@pytest.mark.skipif(boundary_stages() is None, reason="needs a stage boundary (2..4 ranks)")
def test_a_dtype_change_between_stages_fails_on_every_rank():
    x, y = batches(torch.float32, steps=1)[0]
    stages = boundary_stages()
    mp = ModelParallel(failing_model(lambda t: t.double(), at=4), stages=stages, micro_batches=4,
                       balance=balance_with_layer_one_on_stage_zero(stages))
    expect_failure_everywhere(mp, x, y, f"stage {stage_of_the_failing_layer(stages)} of {stages}", "micro-batch 0",
                              "dtype float64 instead of float32")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_an_exception_in_one_stage_fails_on_every_rank(schedule):
    x, y = batches(torch.float32, steps=1)[0]
    stages = P if P <= 4 else 1
    mp = ModelParallel(failing_model(boom, at=1), stages=stages, micro_batches=4, schedule=schedule,
                       balance="uniform" if stages == 1 else balance_with_layer_one_on_stage_zero(stages))
    expect_failure_everywhere(mp, x, y, f"stage {stage_of_the_failing_layer(stages)} of {stages}",
                              "micro-batch 1 forward", "ValueError: boom in the user's layer")


def test_a_batch_that_does_not_cut_into_micro_batches_is_refused_on_every_rank():
    with ModelParallel(make_model(), stages=1, micro_batches=3) as mp:
        x, y = batches(torch.float64, steps=1, batch=3 * P + 1)[0]
        with pytest.raises(SharedConfigError, match=f"multiple of {3 * P}"):
            mp.train_step(x, y, F.cross_entropy)
        x, y = batches(torch.float64, steps=1, batch=3 * P)[0]
        mp.train_step(x, y, F.cross_entropy)  # and it still works


def test_fewer_micro_batches_than_stages_is_refused():
    with pytest.raises(SharedConfigError, match=r"micro_batches \(1\) must be at least stages \(2\)"):
        ModelParallel(make_model(), stages=2, micro_batches=1)


def test_a_world_that_does_not_factor_names_sizes_that_work():
    with pytest.raises(SharedConfigError, match=f"use a multiple of {P + 1} ranks") as caught:
        ModelParallel(make_model(), tensor_parallel=P + 1, micro_batches=1)
    assert "do not factor as replicas x stages (1) x tensor_parallel" in str(caught.value)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(SharedConfigError, match="cannot cut 4 layers into 8 stages"):
        ModelParallel(make_model(), stages=8, micro_batches=8, comm=MPI.COMM_SELF)


def test_time_balance_is_measured_on_rank_zero_and_used_everywhere():
    stages = P if P <= 4 else 1
    x, _ = batches(torch.float64, steps=1)[0]
    with ModelParallel(make_model(), stages=stages, micro_batches=4, balance="time", example_input=x) as mp:
        assert len(set(WORLD.allgather(mp.layer_counts))) == 1
        assert sum(mp.layer_counts) == 4 and len(mp.layer_counts) == stages


@pytest.mark.skipif(P % 2, reason="tensor_parallel=2 needs an even number of ranks")
def test_a_checkpoint_of_split_linears_loads_unsplit():
    reference = make_model()
    with ModelParallel(make_model(), tensor_parallel=2, micro_batches=2) as mp:
        optimizer = sgd(mp.module.parameters())
        reference_optimizer = sgd(reference.parameters())
        for x, y in batches(torch.float64, steps=2):
            optimizer.zero_grad()
            reference_optimizer.zero_grad()
            mp.train_step(x, y, F.cross_entropy)
            F.cross_entropy(reference(x), y).backward()
            optimizer.step()
            reference_optimizer.step()
        path = f"{shared_directory()}/split-rows.h5"
        mp.save_checkpoint(path, optimizer)
    state = ckpt.load_checkpoint(path)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state["model_state"][key], value, **TOLERANCE[torch.float64])
    loaded = sgd(reference.parameters())
    loaded.load_state_dict(unsplit_optimizer_state(state["optimizer_state"], reference))
    for ours, theirs in zip(loaded.state_dict()["state"].values(), reference_optimizer.state_dict()["state"].values()):
        torch.testing.assert_close(ours["momentum_buffer"], theirs["momentum_buffer"], **TOLERANCE[torch.float64])


def test_the_cli_entry_point_trains_and_checkpoints():
    from mpisgd.comm import get_communicator
    from mpisgd.data.synthetic import make_classification_h5
    from mpisgd.modelparallel.trainer import train_model_parallel
    from mpisgd.training.config import TrainConfig

    directory = shared_directory()
    if RANK == 0:
        make_classification_h5(f"{directory}/train.h5", n_samples=256, n_features=12, n_classes=3, seed=0)
    WORLD.Barrier()
    stages = 2 if P % 2 == 0 else 1
    cfg = TrainConfig.from_settings(dict(
        model="mlp", hidden=(16, 16), data=f"{directory}/train.h5", val=f"{directory}/train.h5", batch_size=16,
        seed=0, lr=0.1, weight_decay=0.0, epochs=1, max_steps=3, resume=False,
        checkpoint_dir=f"{directory}/checkpoints", log_every=1, device="cpu", stages=stages, micro_batches=2,
        pipeline_schedule="1f1b", balance="params", tensor_parallel=1))
    summary = train_model_parallel(cfg, get_communicator())
    assert summary["steps"] == 3 and summary["stages"] == stages and summary["replicas"] == P // stages
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert len(set(WORLD.allgather(summary["val_accuracy"]))) == 1
    resumed = train_model_parallel(cfg.with_settings(resume=True, max_steps=4, stages=1), get_communicator())
    assert resumed["steps"] == 4


@pytest.mark.parametrize("stages, splits", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_info_names_the_ranks_the_communicators_really_hold(stages, splits):
    """`mpisgd info --stages K` (describe_grid) against the members MPI reports for each communicator."""
    from mpisgd.modelparallel.grid import GridCommunicators, GridShape, describe_grid
    if P % (stages * splits):
        pytest.skip("the world does not factor")
    grid = GridCommunicators(WORLD, GridShape(P, stages, splits))
    a, s, t = grid.where
    members = {"pipeline": (grid.pipeline.allgather(RANK), f"replica {a}, split {t} "),
               "stage": (grid.stage.mpi.allgather(RANK), f"stage {s}, split {t} "),
               "split": (grid.splits.allgather(RANK), f"replica {a}, stage {s}:")}
    lines = describe_grid(P, stages, splits)
    for kind, (ranks, label) in members.items():
        if kind == "split" and splits == 1:
            continue
        line = next(line for line in lines if f"{kind} communicator of {label}" in line)
        assert line.endswith("world ranks " + " ".join(map(str, ranks))), (line, ranks)
    grid.free()
