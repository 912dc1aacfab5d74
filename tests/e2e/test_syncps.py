"""`mpisgd train --strategy sync-ps` (synchronous SGD on the parameter server, Chen et al.'s backup
workers) end to end under mpiexec: with no backup worker it takes the steps of `--strategy sync` (the
all-reduce, an independent implementation) on the same data; with one backup worker and one worker
frozen for good (the test-only fault hook: it sleeps without entering MPI), every step applies exactly
N-1 gradients and the job does not wait for it; bad input is a clear error."""

import pytest
import torch
from helpers import mpisgd_command, run_mpi

from mpisgd.checkpoint import load_checkpoint
from mpisgd.metrics import read_metrics
from mpisgd.models import build_model

TIMEOUT = 180
FAULT_TIMEOUT = 300
WORKER_TIMEOUT = 20  # far beyond any pause of a live worker (as in test_downpour.py)




def train(nprocs, data, strategy, *flags, env=None, timeout=TIMEOUT):
    train_path, val_path = data
    return run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", strategy, "--data", str(train_path),
                            "--val", str(val_path), "--batch-size", "8", "--hidden", "16", "--no-progress",
                            *map(str, flags)], timeout=timeout, env=env)


def parameters(checkpoint_dir):
    return load_checkpoint(checkpoint_dir / "final.h5")["model_state"]


@pytest.mark.parametrize("servers", [1, 2])
def test_without_backup_workers_it_takes_the_steps_of_sync(tmp_path, data, servers):
    """3 workers (+ servers) against `--strategy sync` on 3 ranks: same batches, same momentum SGD at the
    same scaled lr; only the order of the float additions differs."""
    flags = ["--epochs", "2", "--lr", "0.2"]
    ps = train(3 + servers, data, "sync-ps", "--servers", servers, "--checkpoint-dir", tmp_path / "ps", *flags)
    assert ps.returncode == 0, ps.stdout
    sync = train(3, data, "sync", "--checkpoint-dir", tmp_path / "sync", *flags)
    assert sync.returncode == 0, sync.stdout
    assert "sync-ps finished after 44 steps" in ps.stdout  # 2 epochs x 22 batches per worker
    ours, theirs = parameters(tmp_path / "ps"), parameters(tmp_path / "sync")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    initial = build_model("mlp", (6,), 3, (16,), seed=0).state_dict()  # the runs moved the model
    assert max(float((ours[name] - initial[name]).abs().max()) for name in ours) > 1e-2


def test_one_backup_worker_and_one_frozen_worker(tmp_path, data):
    """Rank 3 freezes at its 4th step for good; each of the 44 steps applies exactly 2 of 3 gradients
    without waiting for it, the job counts it dead at the end and ends with exit 0."""
    metrics = tmp_path / "run.jsonl"
    result = train(4, data, "sync-ps", "--servers", "1", "--backup-workers", "1", "--epochs", "2",
                   "--metrics", metrics, "--log-every", "4", "--worker-timeout", WORKER_TIMEOUT,
                   "--checkpoint-dir", tmp_path, env={"MPISGD_TEST_WORKER_FAULT": "3:4:sleep:600"},
                   timeout=FAULT_TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert "sync-ps finished after 44 steps" in result.stdout, result.stdout
    last = read_metrics(metrics)[-1]
    assert last["fewest_gradients_per_update"] == last["most_gradients_per_update"] == 2, last
    assert last["gradients_applied"] == 44 * 2, last
    # every gradient pushed was applied or counted late
    assert sum(last["pushes_per_worker"]) == last["gradients_applied"] + last["late_gradients"], last
    assert last["worker_steps"][2] == 4 and last["dead_workers"] == [3], last


def test_without_backup_workers_a_dead_worker_stalls_only_until_it_is_counted_dead(tmp_path, data):
    """b = 0 and rank 3 hung for good at its 4th step: the steps wait for it until --worker-timeout, then
    go on with the 2 live workers; the job finishes with exit 0 (on MPICH's network path too)."""
    metrics = tmp_path / "run.jsonl"
    result = train(4, data, "sync-ps", "--servers", "1", "--epochs", "1", "--metrics", metrics,
                   "--worker-timeout", WORKER_TIMEOUT, env={"MPISGD_TEST_WORKER_FAULT": "3:4:sleep:600",
                                                            "MPIR_CVAR_NOLOCAL": "1"}, timeout=FAULT_TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert "worker rank 3: no heartbeat" in result.stdout and "sync-ps finished after 22 steps" in result.stdout
    last = read_metrics(metrics)[-1]
    # 4 steps (the hung worker's) with all 3 gradients, then 18 with the 2 live ones
    assert last["gradients_applied"] == 4 * 3 + 18 * 2, last
    assert (last["fewest_gradients_per_update"], last["most_gradients_per_update"]) == (2, 3), last


def test_backup_workers_must_leave_a_gradient(data):
    result = train(4, data, "sync-ps", "--backup-workers", "3")
    assert result.returncode == 2, result.stdout
    assert result.stdout.count("--backup-workers 3 leaves no gradient to apply") >= 4, result.stdout
