"""Preemption of the parameter-server strategies under mpiexec (CPU): a stop signal that reaches ONE rank
(a worker, or a server other than server 0) stops the whole job: server 0 learns it from the job board,
the workers stop, the servers drain and write a checkpoint, exit 75. For ``--strategy sync-ps`` the stop
is at a step every worker computed (the checkpoint's worker steps and shard version equal its step), and
the same command with ``--resume auto`` ends with parameters bitwise equal to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest
import torch
from helpers import ROOT, launcher_environment, launcher_flags, mpiexec, mpisgd_command, run_mpi

from mpisgd.checkpoint import list_checkpoints, load_checkpoint
from mpisgd.faults import MARKER_VARIABLE, pid_of_rank
from mpisgd.training.preemption import EXIT_PREEMPTED

TIMEOUT = 240
EPOCHS = 20  # 256 samples / (2 workers x batch 8) = 16 steps per epoch: 320 steps, long enough to interrupt
STEPS = EPOCHS * 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.h5"
    result = run_mpi(1, [mpisgd_command(), "make-data", str(path), "--samples", "256", "--features", "6",
                         "--classes", "3", "--seed", "5", "--sample-seed", "1"], timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    return path


def syncps(data, checkpoint_dir, servers=1):
    """The one command that starts and continues a sync-ps job (2 workers)."""
    return [mpisgd_command(), "train", "--strategy", "sync-ps", "--servers", str(servers), "--data", str(data),
            "--batch-size", "8", "--hidden", "16", "--no-progress", "--epochs", str(EPOCHS), "--lr", "0.05",
            "--weight-decay", "1e-4", "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", "8",
            "--worker-timeout", "300", "--resume", "auto"]


def downpour(data, checkpoint_dir, servers=1):
    return [mpisgd_command(), "train", "--strategy", "downpour", "--servers", str(servers), "--data", str(data),
            "--batch-size", "8", "--hidden", "16", "--no-progress", "--epochs", "500",
            "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", "20", "--worker-timeout", "300",
            "--resume", "auto"]


def final_parameters(checkpoint_dir):
    return load_checkpoint(checkpoint_dir / "final.h5")["model_state"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_mpi(3, syncps(data, folder), timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert f"finished after {STEPS} steps (epochs)" in result.stdout, result.stdout
    return final_parameters(folder)


def assert_bitwise_equal(expected, actual):
    assert list(expected) == list(actual)
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), f"{name} differs from the uninterrupted run"


def signal_one_rank(command, nprocs, rank, checkpoint_dir):
    """Run ``command``; once it wrote a checkpoint, SIGTERM world rank ``rank`` alone; its output."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment(), MARKER_VARIABLE: marker}
    job = subprocess.Popen([mpiexec(), *launcher_flags(), "-n", str(nprocs), *command], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        pid = pid_of_rank(marker, rank, timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT  # the event: a first checkpoint exists (a hang fails)
        while not list_checkpoints(checkpoint_dir):
            assert job.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint"
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        out, _ = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    return job.returncode, out


def assert_stopped_at_a_step(checkpoint_dir, out):
    """The newest checkpoint is of a step every worker computed and every shard applied."""
    assert not (checkpoint_dir / "final.h5").exists(), out
    extra = load_checkpoint(list_checkpoints(checkpoint_dir)[-1])["extra"]
    step = extra["step"]
    assert 0 < step < STEPS, extra
    assert extra["worker_steps"] == [step, step] and set(extra["shard_versions"]) == {step}, extra


@pytest.mark.timeout(3 * TIMEOUT)
def test_syncps_signal_on_one_worker_stops_at_a_step_and_resume_auto_is_bitwise_equal(tmp_path, data,
                                                                                      uninterrupted):
    first = run_mpi(3, syncps(data, tmp_path), env={"MPISGD_TEST_SIGNAL_AT": "5:SIGTERM:2"}, timeout=TIMEOUT)
    assert first.returncode == EXIT_PREEMPTED, first.stdout
    assert "SIGTERM received by rank 2: stopping the workers" in first.stdout, first.stdout
    assert "(preempted)" in first.stdout, first.stdout
    assert_stopped_at_a_step(tmp_path, first.stdout)
    step = load_checkpoint(list_checkpoints(tmp_path)[-1])["extra"]["step"]
    again = run_mpi(3, syncps(data, tmp_path), timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout
    assert f"resuming sync-ps at step {step} (workers at steps [{step}, {step}])" in again.stdout, again.stdout
    assert f"finished after {STEPS} steps (epochs)" in again.stdout, again.stdout
    assert_bitwise_equal(uninterrupted, final_parameters(tmp_path))


@pytest.mark.timeout(3 * TIMEOUT)
def test_syncps_signal_on_a_server_other_than_server_0_stops_the_job_and_resumes(tmp_path, data, uninterrupted):
    """2 servers + 2 workers; server 1 (world rank 1) alone gets SIGTERM. The shards of 2 servers hold the
    same numbers as one server's (element-wise rule), so the uninterrupted 1-server run is the reference."""
    code, out = signal_one_rank(syncps(data, tmp_path, servers=2), 4, 1, tmp_path)
    assert code == EXIT_PREEMPTED, out
    assert "SIGTERM received by rank 1: stopping the workers" in out, out
    extra = load_checkpoint(list_checkpoints(tmp_path)[-1])["extra"]
    assert extra["worker_steps"][0] == extra["worker_steps"][1] == extra["step"], extra
    assert extra["shard_versions"] == [extra["step"]] * 2, extra
    again = run_mpi(4, syncps(data, tmp_path, servers=2), timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout
    assert f"resuming sync-ps at step {extra['step']} " in again.stdout, again.stdout
    assert_bitwise_equal(uninterrupted, final_parameters(tmp_path))


@pytest.mark.timeout(2 * TIMEOUT)
def test_downpour_signal_on_one_worker_stops_the_whole_job(tmp_path, data):
    result = run_mpi(3, downpour(data, tmp_path), env={"MPISGD_TEST_SIGNAL_AT": "30:SIGUSR1:2"}, timeout=TIMEOUT)
    assert result.returncode == EXIT_PREEMPTED, result.stdout
    assert "SIGUSR1 received by rank 2: stopping the workers" in result.stdout, result.stdout
    assert "(preempted)" in result.stdout and not (tmp_path / "final.h5").exists(), result.stdout
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert saved["writer"]["layout"] == {"ranks": 3, "servers": 1, "workers": 2}, saved["writer"]
    assert saved["extra"]["worker_steps"][1] >= 30, saved["extra"]  # rank 2 is the second worker


@pytest.mark.timeout(2 * TIMEOUT)
def test_downpour_signal_on_a_server_other_than_server_0_stops_the_whole_job(tmp_path, data):
    code, out = signal_one_rank(downpour(data, tmp_path, servers=2), 4, 1, tmp_path)
    assert code == EXIT_PREEMPTED, out
    assert "SIGTERM received by rank 1: stopping the workers" in out and "(preempted)" in out, out
    assert not (tmp_path / "final.h5").exists()
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert saved["writer"]["layout"] == {"ranks": 4, "servers": 2, "workers": 2}, saved["writer"]


# ---- Sandblaster: the coordinator checkpoints the whole L-BFGS state, and the run continues bitwise

SANDBLASTER_RANKS = 4  # shard rank 0, coordinator rank 1, workers 2 and 3


def sandblaster(data, folder):
    return [mpisgd_command(), "train", "--strategy", "sandblaster", "--servers", "1", "--model", "linear",
            "--data", str(data), "--weight-decay", "1e-2", "--portion-size", "32", "--gradient-tolerance",
            "1e-9", "--max-iterations", "60", "--checkpoint-dir", str(folder), "--no-progress",
            "--worker-timeout", "300", "--resume", "auto"]


@pytest.fixture(scope="module")
def sandblaster_uninterrupted(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sandblaster")
    result = run_mpi(SANDBLASTER_RANKS, sandblaster(data, folder), timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    iterations = load_checkpoint(folder / "final.h5")["extra"]["iterations"]
    assert iterations > 12, result.stdout  # long enough for the stops below to come before its end
    return final_parameters(folder), iterations


@pytest.mark.timeout(3 * TIMEOUT)
@pytest.mark.parametrize("rank, at, who", [(1, 4, "SIGTERM received"),  # the coordinator, after iteration 4
                                           (0, 6, "SIGTERM received by rank 0"),  # the shard, at pass 6
                                           (3, 20, "SIGINT received by rank 3")])  # a worker, 20th portion
def test_sandblaster_stops_on_any_rank_with_its_lbfgs_state_and_resume_auto_is_bitwise_equal(
        tmp_path, data, sandblaster_uninterrupted, rank, at, who):
    expected, iterations = sandblaster_uninterrupted
    signame = who.split()[0]
    first = run_mpi(SANDBLASTER_RANKS, sandblaster(data, tmp_path),
                    env={"MPISGD_TEST_SIGNAL_AT": f"{at}:{signame}:{rank}"}, timeout=TIMEOUT)
    assert first.returncode == EXIT_PREEMPTED, first.stdout
    assert f"{who} after iteration" in first.stdout and "(preempted)" in first.stdout, first.stdout
    assert not (tmp_path / "final.h5").exists()
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])
    stopped = saved["extra"]["lbfgs"]["iteration"]
    assert 0 <= stopped < iterations and saved["extra"]["step"] == stopped, saved["extra"]
    assert saved["optimizer_state"]["state"]["x"].dtype == torch.float64  # the iterate, not the float32 model
    again = run_mpi(SANDBLASTER_RANKS, sandblaster(data, tmp_path), timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout
    assert f"resuming L-BFGS after iteration {stopped} " in again.stdout, again.stdout
    assert load_checkpoint(tmp_path / "final.h5")["extra"]["iterations"] == iterations
    assert_bitwise_equal(expected, final_parameters(tmp_path))
