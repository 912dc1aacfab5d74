"""Preemption end to end under mpiexec (sync, CPU): SIGTERM to every rank mid-run -> a checkpoint and exit
75, and the same command with ``--resume auto`` ends with parameters bitwise equal to an uninterrupted
run's; a signal on one rank only stops all of them at the same step; ``--resume auto`` falls back past a
damaged checkpoint, and refuses one of another world layout on every rank."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import uuid

import pytest
import torch
from helpers import ROOT, launcher_environment, launcher_flags, mpi_library, mpiexec, mpisgd_command, run_mpi

from mpisgd.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from mpisgd.faults import MARKER_VARIABLE, pid_of_rank
from mpisgd.training.preemption import EXIT_PREEMPTED

logger = logging.getLogger(__name__)
TIMEOUT = 240
RANKS = 2
EPOCHS = 30  # 256 samples / (2 ranks x batch 8) = 16 steps per epoch: 480 steps, long enough to interrupt


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    path = folder / "train.h5"
    result = run_mpi(1, [mpisgd_command(), "make-data", str(path), "--samples", "256", "--features", "6",
                         "--classes", "3", "--seed", "5", "--sample-seed", "1"], timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    return path


def command(data, checkpoint_dir, *flags):
    """The one command that starts and continues the job."""
    return [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--batch-size", "8",
            "--hidden", "16", "--no-progress", "--epochs", str(EPOCHS), "--optimizer", "lars",
            "--warmup-epochs", "2", "--schedule", "cosine", "--checkpoint-dir", str(checkpoint_dir),
            "--checkpoint-every", "4", "--resume", "auto", *flags]


def final_parameters(checkpoint_dir):
    return load_checkpoint(checkpoint_dir / "final.h5")["model_state"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_mpi(RANKS, command(data, folder), timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert f"finished after {EPOCHS * 16} steps (epochs)" in result.stdout, result.stdout
    return final_parameters(folder)


def assert_bitwise_equal(expected, actual):
    assert list(expected) == list(actual)
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), f"{name} differs from the uninterrupted run"


@pytest.mark.timeout(3 * TIMEOUT)
def test_sigterm_to_every_rank_checkpoints_and_resume_auto_is_bitwise_equal(tmp_path, data, uninterrupted):
    marker = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment(), MARKER_VARIABLE: marker}
    job = subprocess.Popen([mpiexec(), *launcher_flags(), "-n", str(RANKS), *command(data, tmp_path)], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        pids = [pid_of_rank(marker, rank, timeout=TIMEOUT) for rank in range(RANKS)]
        deadline = time.monotonic() + TIMEOUT  # the event: the checkpoint of step 8 exists (a hang fails)
        while not checkpoint_path(tmp_path, 8).exists():
            assert job.poll() is None and time.monotonic() < deadline, "the job never reached step 8"
            time.sleep(0.05)
        for pid in pids:  # freeze the ranks so that the signals surely arrive mid-run, then deliver them
            os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        sent = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        out, _ = job.communicate(timeout=TIMEOUT)
        seconds = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    logger.warning("SIGTERM to every rank -> checkpoint written and mpiexec exited after %.2f s", seconds)
    assert job.returncode == EXIT_PREEMPTED, out
    assert "SIGTERM received: stopping after step" in out and "(preempted)" in out, out
    stopped_at = load_checkpoint(list_checkpoints(tmp_path)[-1])["extra"]["step"]
    assert 8 <= stopped_at < EPOCHS * 16 and not (tmp_path / "final.h5").exists(), out
    again = run_mpi(RANKS, command(data, tmp_path), timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout
    # a deterministic run started afresh would end equal too: the second run must have resumed
    assert f"resumed from {checkpoint_path(tmp_path, stopped_at)}" in again.stdout, again.stdout
    assert_bitwise_equal(uninterrupted, final_parameters(tmp_path))


@pytest.mark.timeout(3 * TIMEOUT)
def test_a_signal_on_one_rank_stops_all_and_resume_auto_falls_back_past_damage(tmp_path, data, uninterrupted):
    """Rank 1 alone gets SIGUSR1 after step 5 (a fault hook): both ranks stop after step 6 and exit 75.
    Then the newest checkpoint is damaged: ``--resume`` refuses it on every rank naming it, ``--resume
    auto`` falls back to step 4, says so, and still ends bitwise equal to the uninterrupted run."""
    first = run_mpi(RANKS, command(data, tmp_path), env={"MPISGD_TEST_SIGNAL_AT": "5:SIGUSR1:1"}, timeout=TIMEOUT)
    assert first.returncode == EXIT_PREEMPTED, first.stdout
    assert "SIGUSR1 received: stopping after step 6" in first.stdout, first.stdout
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000000004.h5", "checkpoint-000000006.h5"]
    newest = checkpoint_path(tmp_path, 6)
    damaged = bytearray(newest.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    newest.write_bytes(bytes(damaged))
    strict = run_mpi(RANKS, [*command(data, tmp_path)[:-2], "--resume"], timeout=TIMEOUT)
    assert strict.returncode == 2 and strict.stdout.count(f"{newest}' does not match its checksum") == RANKS, \
        strict.stdout
    resumed = run_mpi(RANKS, command(data, tmp_path), timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout
    assert "falling back to the previous checkpoint" in resumed.stdout, resumed.stdout
    assert f"resumed from {checkpoint_path(tmp_path, 4)}, the previous valid checkpoint" in resumed.stdout
    assert_bitwise_equal(uninterrupted, final_parameters(tmp_path))


@pytest.mark.timeout(2 * TIMEOUT)
def test_resume_at_another_world_layout_is_refused_on_every_rank(tmp_path, data):
    first = run_mpi(RANKS, command(data, tmp_path, "--max-steps", "4"), timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout
    other = run_mpi(3, command(data, tmp_path), timeout=TIMEOUT)
    assert other.returncode == 2, other.stdout
    assert other.stdout.count("written by a job of 2 ranks and this one has 3") == 3, other.stdout


@pytest.mark.timeout(2 * TIMEOUT)
def test_resume_auto_with_only_damaged_checkpoints_is_an_error(tmp_path, data):
    first = run_mpi(RANKS, command(data, tmp_path, "--max-steps", "4"), timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout
    for path in list_checkpoints(tmp_path):
        path.write_bytes(path.read_bytes()[:-100])  # truncated
    again = run_mpi(RANKS, command(data, tmp_path), timeout=TIMEOUT)
    assert again.returncode == 2 and "no valid checkpoint in" in again.stdout, again.stdout
    assert "is truncated" in again.stdout, again.stdout


@pytest.mark.timeout(3 * TIMEOUT)
def test_preempting_mpiexec_stops_a_downpour_job_with_a_checkpoint_of_the_servers(tmp_path, data):
    """mpiexec forwards the signal to the ranks; server 0 stops the workers, the servers drain and write
    their state (no final.h5), exit 75; ``--resume auto`` continues from the shards' saved state.
    MPICH's hydra forwards SIGTERM; Open MPI's mpirun aborts the job on SIGTERM and forwards SIGUSR1,
    the signal its users preempt with (docs/cluster.rst)."""
    preemption = signal.SIGUSR1 if mpi_library() == "openmpi" else signal.SIGTERM
    flags = ["--strategy", "downpour", "--data", str(data), "--batch-size", "8", "--hidden", "16", "--no-progress",
             "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "20", "--worker-timeout", "300",
             "--resume", "auto"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment()}
    job = subprocess.Popen([mpiexec(), *launcher_flags(), "-n", "3", mpisgd_command(), "train", *flags,
                            "--epochs", "500"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list_checkpoints(tmp_path):
            assert job.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint"
            time.sleep(0.05)
        job.send_signal(preemption)
        out, _ = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode == EXIT_PREEMPTED and "(preempted)" in out, out
    assert not (tmp_path / "final.h5").exists()
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert saved["writer"]["layout"] == {"ranks": 3, "servers": 1, "workers": 2}, saved["writer"]
    accumulated = saved["optimizer_state"]["state"]["sum_sq"] if "sum_sq" in saved["optimizer_state"]["state"] \
        else next(iter(saved["optimizer_state"]["state"].values()))
    again = run_mpi(3, [mpisgd_command(), "train", *flags, "--epochs", "1"], timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout
    final = load_checkpoint(tmp_path / "final.h5")
    assert final["extra"]["step"] >= saved["extra"]["step"]
    resumed = next(iter(final["optimizer_state"]["state"].values()))
    assert torch.all(resumed >= accumulated), "Adagrad's sums restarted instead of continuing"
