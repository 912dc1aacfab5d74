"""`mpisgd train --strategy downpour|dcasgd --stages K` end to end: split replicas on a parameter server.

Equivalence: one replica, ``--server-rule sgd``, ``--n-fetch 1 --n-push 1`` is plain SGD step for step (each
partition reads its own pushes), so its ``final.h5`` equals the unsplit model trained by plain SGD in one
process (the 1-rank sync run with momentum 0, the same data order). Faults: a partition that raises (the
test-only MPISGD_TEST_WORKER_FAULT hook, inside its step) takes its replica out; the other replica trains
on to the end of the job's budget. Resume: half the steps, then the rest resumed at another split,
equals the same plain SGD run; unsplit and split Downpour resume each other's checkpoints. Also: a world that does not factor, and `mpisgd info --stages K`.
"""

import re

import pytest
import torch
from helpers import mpisgd_command, run_mpi

from mpisgd.checkpoint import load_checkpoint
from mpisgd.data import make_classification_h5
from mpisgd.metrics import read_metrics

TIMEOUT = 240
STEPS, BATCH = 10, 16
COMMON = ["--batch-size", str(BATCH), "--hidden", "16,8", "--lr", "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, sample_seed in (("train", 1), ("val", 2)):
        make_classification_h5(folder / f"{name}.h5", n_samples=256, n_features=6, n_classes=3, seed=5,
                               sample_seed=sample_seed)
    return ["--data", str(folder / "train.h5"), "--val", str(folder / "val.h5")]


def final_parameters(folder):
    return load_checkpoint(folder / "final.h5")["model_state"]


@pytest.fixture(scope="module")
def plain_sgd(tmp_path_factory, data):
    """The unsplit model trained by plain SGD in one process: sync at 1 rank, momentum 0, lr unscaled."""
    folder = tmp_path_factory.mktemp("plain")
    result = run_mpi(1, [mpisgd_command(), "train", "--strategy", "sync", *data, *COMMON, "--momentum", "0",
                         "--reference-batch", str(BATCH), "--max-steps", str(STEPS), "--checkpoint-dir", str(folder)],
                     timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    return final_parameters(folder)


@pytest.mark.parametrize("nprocs, flags", [
    (3, ["--servers", "1", "--stages", "2", "--micro-batches", "2"]),
    (4, ["--servers", "2", "--stages", "2", "--micro-batches", "4", "--pipeline-schedule", "1f1b"]),
    (3, ["--servers", "1", "--tensor-parallel", "2"]),
    (3, ["--servers", "1", "--stages", "2", "--micro-batches", "2", "--strategy", "dcasgd"]),
], ids=["S1-K2", "S2-K2-1f1b", "S1-T2", "dcasgd-S1-K2"])
def test_one_split_replica_equals_plain_sgd_on_the_unsplit_model(tmp_path, data, plain_sgd, nprocs, flags):
    strategy = ["--strategy", "downpour", "--server-rule", "sgd"] if "dcasgd" not in flags else []
    result = run_mpi(nprocs, [mpisgd_command(), "train", *strategy, *data, *COMMON, "--n-fetch", "1", "--n-push", "1",
                              "--max-steps", str(STEPS), "--checkpoint-dir", str(tmp_path), *flags], timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    split = final_parameters(tmp_path)
    assert sorted(split) == sorted(plain_sgd)  # the unsplit model's names: final.h5 loads unsplit
    for name, reference in plain_sgd.items():
        torch.testing.assert_close(torch.as_tensor(split[name]), torch.as_tensor(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first, second", [
    ((3, ["--stages", "2", "--micro-batches", "2"]), (3, ["--tensor-parallel", "2"])),
    ((4, ["--stages", "3", "--micro-batches", "4"]), (3, ["--stages", "2", "--micro-batches", "2",
                                                           "--pipeline-schedule", "1f1b"])),
], ids=["K2-then-T2", "K3-then-K2-1f1b"])
def test_a_job_resumed_at_another_split_equals_plain_sgd_straight_through(tmp_path, data, plain_sgd, first, second):
    """Half the steps, then --resume from its checkpoint at another split: the shards' vector, the replica's
    step and its data position carry over, so the two halves are the plain SGD run."""
    runs = []
    for (nprocs, flags), steps, resume in ((first, STEPS // 2, []), (second, STEPS, ["--resume"])):
        runs.append(run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", "downpour", "--server-rule", "sgd", *data,
                                     *COMMON, "--servers", "1", "--n-fetch", "1", "--n-push", "1", "--max-steps",
                                     str(steps), "--checkpoint-dir", str(tmp_path), *flags, *resume], timeout=TIMEOUT))
        assert runs[-1].returncode == 0, runs[-1].stdout
    assert f"(workers at steps [{STEPS // 2}, {STEPS // 2}" in runs[1].stdout, runs[1].stdout  # resumed there
    resumed = final_parameters(tmp_path)
    for name, reference in plain_sgd.items():
        torch.testing.assert_close(torch.as_tensor(resumed[name]), torch.as_tensor(reference), rtol=1e-5, atol=1e-6)


def test_unsplit_and_split_downpour_resume_each_other(tmp_path, data):
    """One epoch of unsplit Downpour (Adagrad, --n-fetch 3): 4 steps, resumed split at K=2 to step 8, resumed
    unsplit again to the end of the epoch. The steps go on from the saved ones (a split checkpoint lists each
    partition), the step claims from the saved total (so the last run ends the epoch exactly), and Adagrad's
    sums from the saved sums. Unsplit Downpour does not wait for its own push before the next pull, so no
    run here is plain SGD."""
    def train(nprocs, *flags):
        result = run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", "downpour", *data, *COMMON, "--servers",
                                  "1", "--epochs", "1", "--n-fetch", "3", "--checkpoint-dir", str(tmp_path), *flags],
                         timeout=TIMEOUT)
        assert result.returncode == 0, result.stdout
        return load_checkpoint(tmp_path / "final.h5")

    saved = [train(2, "--max-steps", "4")]
    saved.append(train(3, "--stages", "2", "--micro-batches", "2", "--max-steps", "8", "--resume"))
    assert saved[-1]["extra"]["worker_steps"] == [8, 8]
    assert saved[-1]["extra"]["model_parallel"] == {"stages": 2, "tensor_parallel": 1, "replicas": 1}
    saved.append(train(2, "--resume"))
    assert saved[-1]["extra"]["worker_steps"] == [256 // BATCH]  # one epoch: 8 more steps, no more, no fewer
    squares = [s["optimizer_state"]["state"]["sum_of_squares"] for s in saved]
    for before, after in zip(squares, squares[1:]):  # the resumed shards started from the saved sums
        assert (after >= before).all() and (after > before).any()


def test_a_dead_partition_takes_its_replica_out_and_the_other_finishes(tmp_path, data):
    # world ranks: 0 server; replica 0 = ranks 1, 2 (stages 0, 1); replica 1 = ranks 3, 4
    metrics = tmp_path / "metrics.jsonl"
    result = run_mpi(5, [mpisgd_command(), "train", "--strategy", "downpour", *data, *COMMON, "--servers", "1",
                         "--stages", "2", "--micro-batches", "2", "--epochs", "2", "--checkpoint-dir", str(tmp_path),
                         "--metrics", str(metrics), "--log-every", "5"],
                     timeout=TIMEOUT, env={"MPISGD_TEST_WORKER_FAULT": "2:3:raise"})
    assert result.returncode == 0, result.stdout
    assert "worker rank 1 failed" in result.stdout and "worker rank 2 failed" in result.stdout, result.stdout
    assert "test fault at step 3" in result.stdout
    last = [r for r in read_metrics(metrics) if "worker_steps" in r][-1]
    failed_steps, survivor_steps = last["worker_steps"][:2], last["worker_steps"][2:]
    assert failed_steps == [2, 2]  # both partitions of the failed replica stopped at its step 3
    batches_per_replica_epoch = 256 // 2 // BATCH
    # the survivor took every step of the 2 epochs' budget the failed replica did not (one claim of the
    # failed step is spent)
    assert survivor_steps[0] == survivor_steps[1] == 2 * 2 * batches_per_replica_epoch - 2 - 1
    assert last["dead_workers"] == []
    # per-partition staleness: one histogram entry per push of that partition
    assert [sum(h) for h in last["partition_staleness_hist"]] == last["pushes_per_worker"]
    assert last["partitions"][3] == "replica 1/stage 1/split 0"
    final = load_checkpoint(tmp_path / "final.h5")["model_state"]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in final.values())


def test_a_world_that_does_not_factor_is_refused_on_every_rank(tmp_path, data):
    result = run_mpi(4, [mpisgd_command(), "train", "--strategy", "downpour", *data, *COMMON, "--servers", "1",
                         "--stages", "2", "--micro-batches", "2", "--max-steps", "2"], timeout=TIMEOUT)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count("mpisgd: error:") == 4 and result.stdout.count("launch 3, 5, 7, 9") == 4, result.stdout


def grid_lines(stdout, kind):
    """{(first index, second index): [world ranks]} of the `kind` communicator lines of `mpisgd info`."""
    found = {}
    for match in re.finditer(rf"{kind} communicator of \w+ (\d+), \w+ (\d+).*: world ranks ([\d ]+)", stdout):
        found[(int(match[1]), int(match[2]))] = [int(r) for r in match[3].split()]
    return found


@pytest.mark.parametrize("nprocs, flags, servers, K, T", [
    (4, ["--stages", "2"], 0, 2, 1),
    (5, ["--stages", "2", "--servers", "1"], 1, 2, 1),
    (4, ["--stages", "1", "--tensor-parallel", "2"], 0, 1, 2),
])
def test_info_names_the_ranks_of_every_pipeline_stage_and_split_communicator(nprocs, flags, servers, K, T):
    result = run_mpi(nprocs, [mpisgd_command(), "info", *flags], timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    R = (nprocs - servers) // (K * T)

    def rank(a, s, t):  # the layout docs/model_parallel.rst states
        return servers + (a * K + s) * T + t
    assert grid_lines(result.stdout, "pipeline") == {(a, t): [rank(a, s, t) for s in range(K)]
                                                     for a in range(R) for t in range(T)}
    assert grid_lines(result.stdout, "stage") == {(s, t): [rank(a, s, t) for a in range(R)]
                                                  for s in range(K) for t in range(T)}
    if T > 1:
        assert grid_lines(result.stdout, "split") == {(a, s): [rank(a, s, t) for t in range(T)]
                                                      for a in range(R) for s in range(K)}


def test_info_refuses_a_grid_that_does_not_factor_on_every_rank():
    result = run_mpi(3, [mpisgd_command(), "info", "--stages", "2"], timeout=TIMEOUT)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count("do not factor") == 3, result.stdout


def test_a_synchronous_split_job_refuses_a_parameter_server_checkpoint_on_every_rank(tmp_path, data):
    """A Downpour checkpoint keeps the workers' rows, not one data position: sync --stages says so and exits 2."""
    first = run_mpi(3, [mpisgd_command(), "train", "--strategy", "downpour", *data, *COMMON, "--servers", "1",
                        "--max-steps", "4", "--checkpoint-dir", str(tmp_path)], timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout
    second = run_mpi(2, [mpisgd_command(), "train", "--strategy", "sync", *data, *COMMON, "--stages", "2",
                         "--micro-batches", "2", "--max-steps", "8", "--checkpoint-dir", str(tmp_path), "--resume"],
                     timeout=TIMEOUT)
    assert second.returncode == 2, second.stdout
    assert "written by strategy 'downpour'" in second.stdout and "KeyError" not in second.stdout
    assert len(re.findall(r"rank [01]\b.*written by strategy 'downpour'", second.stdout)) >= 1
