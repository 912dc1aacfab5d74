"""`mpisgd train --strategy downpour|dcasgd` end to end under mpiexec, on the MPI library's shared-memory path
and on its network path (helpers.network_path_environment: MPICH's MPIR_CVAR_NOLOCAL=1, Open MPI's osc/rdma
over btl/tcp; no shared memory between the ranks of one machine, as between nodes): convergence, workers that stop early or hang, non-finite gradients, bad input, resume, metrics,
and the RMA atomicity stress test at 5 ranks and on the network path.

How faults are made: a hung worker is stopped from OUTSIDE with SIGSTOP (found by its rank variable and
a marker in its environment), which is what a real hang looks like to the other ranks: no code of the
stopped process runs, so nothing in it can cooperate. A worker leaving its loop early or computing a
NaN needs code at a given step; that is the test-only MPISGD_TEST_WORKER_FAULT hook of the worker loop.

Deterministic by construction, on a loaded machine too: a fault strikes at a step its worker is sure to
reach (``--max-steps`` caps the others' share of the job's step budget so that exactly the steps the
faulty worker does not take are left to them), a worker counts as dead only after a --worker-timeout
no live worker comes near, and the tests wait for events the job reports (the metrics file, its output);
their own timeouts only bound a hang.
"""

import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import h5py
import pytest
import torch
from helpers import mpisgd_command, network_path_environment, run_mpi

from mpisgd.checkpoint import load_checkpoint
from mpisgd.faults import MARKER_VARIABLE, pid_of_rank
from mpisgd.metrics import read_metrics
from mpisgd.models import build_model

TIMEOUT = 120
FAULT_TIMEOUT = 300  # a fault test waits out --worker-timeout; this only bounds a hang
WORKER_TIMEOUT = 20  # far beyond any pause of a live worker, even on 2 loaded cores
PATHS = {"shm": {}, "network": network_path_environment()}
ACCURACY = 0.85  # what every strategy reaches on this data set; the stated bar of the convergence tests
VALID_MODEL = 0.75  # fault tests: a trained model (chance is 1/3) after a run cut short by the fault




def train(nprocs, data, *flags, env=None, timeout=TIMEOUT, strategy="downpour"):
    train_path, val_path = data
    return run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", strategy, "--data", str(train_path),
                            "--val", str(val_path), "--batch-size", "8", "--hidden", "16", "--no-progress",
                            *map(str, flags)], timeout=timeout, env=env)


def final_model(checkpoint_dir):
    """The final checkpoint, loaded into a fresh model; asserts its parameters are finite."""
    state = load_checkpoint(Path(checkpoint_dir) / "final.h5")
    extra = state["extra"]
    model = build_model(extra["model"], extra["input_shape"], extra["num_classes"], extra["hidden"])
    model.load_state_dict(state["model_state"])
    assert all(torch.isfinite(p).all() for p in model.parameters()), "non-finite parameters in final.h5"
    return model, extra


def accuracy_of(model, h5_path):
    """Validation accuracy computed here with plain torch, independently of the job's own evaluation."""
    with h5py.File(h5_path, "r") as f:
        x, y = torch.from_numpy(f["x"][:]).float(), torch.from_numpy(f["y"][:]).long()
    with torch.no_grad():
        return float((model.eval()(x).argmax(dim=1) == y).float().mean())


# ---- RMA atomicity at 5 ranks and on the network path ---------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_concurrent_pushes_are_atomic(path):
    """tests/mpi/test_ps_atomicity.py in a job of 5 ranks: servers and workers on its first 2, 3, 4 and 5
    ranks, with 1 and 2 servers (tests/test_mpi_suites.py runs it in jobs of up to 4 ranks)."""
    result = run_mpi(5, [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         "--timeout=100", "tests/mpi/test_ps_atomicity.py"], timeout=TIMEOUT,
                     env={"MPISGD_INNER_MPI_RUN": "1", **PATHS[path]})
    assert result.returncode == 0, result.stdout[-5000:]
    assert result.stdout.count("7 passed, 1 skipped") == 5, result.stdout[-5000:]


# ---- convergence ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("strategy, flags", [
    ("downpour", ["--server-rule", "adagrad", "--lr", "0.05", "--server-nice", "10"]),  # Downpour (Dean et al.)
    ("downpour", ["--server-rule", "sgd", "--lr", "0.1", "--warmstart-steps", "20"]),  # plain ASGD
    ("dcasgd", ["--lr", "0.1", "--dc-lambda", "0.5", "--dc-variant", "adaptive"]),  # Zheng et al.
], ids=["downpour-adagrad", "asgd", "dcasgd-adaptive"])
def test_each_strategy_reaches_the_stated_accuracy(tmp_path, data, strategy, flags, path):
    """Server 0 evaluates every 16 pushes and stops the job at the target; metrics and plot work."""
    metrics = tmp_path / "run.jsonl"
    # asynchronous runs depend on scheduling: a generous budget of epochs, stopped by the target accuracy
    result = train(4, data, "--servers", "2", "--epochs", "30", "--checkpoint-dir", tmp_path, *flags,
                   "--target-accuracy", ACCURACY, "--eval-every", "16", "--metrics", metrics,
                   "--log-every", "8", strategy=strategy, env=PATHS[path])
    assert result.returncode == 0, result.stdout
    assert f"{strategy} finished after" in result.stdout and "(target_accuracy)" in result.stdout
    if "--server-nice" in flags:  # honoured on shared memory; on the network path it would stall workers
        assert ("--server-nice ignored" in result.stdout) == (path == "network"), result.stdout
    if "--warmstart-steps" in flags:  # the second worker waited for the first one's 20 pushes
        warm = re.search(r"warm start done, pushes per worker \[(\d+), (\d+)\]", result.stdout)
        assert warm and int(warm.group(1)) >= 20 and int(warm.group(2)) == 0, result.stdout
    records = read_metrics(metrics)
    evaluations = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert max(evaluations) >= ACCURACY, evaluations
    model, extra = final_model(tmp_path)  # the evaluated parameters that reached the target
    assert extra["strategy"] == strategy and extra["val_accuracy"] >= ACCURACY, extra
    assert extra["model_step"] <= extra["step"] and extra["val_accuracy"] in evaluations, extra
    assert accuracy_of(model, data[1]) == pytest.approx(extra["val_accuracy"], abs=2 / 512)
    assert sum(extra["worker_steps"]) == extra["step"] < 30 * 2 * 32  # stopped early: 30 epochs of 2 x 32
    progress = [r for r in records if "updates_per_s" in r]
    assert progress
    assert all(len(r["updates_per_s"]) == 2 and len(r["pushes_per_worker"]) == 2 for r in progress)
    assert sum(progress[-1]["staleness_hist"]) == 2 * sum(progress[-1]["pushes_per_worker"])  # one per shard
    if strategy == "downpour" and path == "shm":
        png = tmp_path / "curves.png"
        plot = run_mpi(1, [mpisgd_command(), "plot", str(metrics), "-o", str(png)], timeout=TIMEOUT)
        assert plot.returncode == 0, plot.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- faults -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_a_worker_leaving_early_does_not_stop_the_job(tmp_path, data, path):
    # 3 workers x 22 batches x 2 epochs = 132 steps; each capped at 63, so the leaver surely gets to its
    # 6th step, and the other two must take over the 132 - 6 = 2 x 63 steps it leaves them
    result = train(4, data, "--epochs", "2", "--checkpoint-dir", tmp_path, "--lr", "0.05", "--n-fetch", "3",
                   "--n-push", "2", "--max-steps", "63", env={"MPISGD_TEST_WORKER_FAULT": "2:6:exit", **PATHS[path]},
                   timeout=FAULT_TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert "leaving the training loop at step 6" in result.stdout
    _, extra = final_model(tmp_path)
    # the others took over the steps the leaver did not do
    assert extra["worker_steps"] == [63, 6, 63] and sum(extra["worker_steps"]) == 132, extra
    # a push every 2 steps, and what was accrued when a worker stopped
    assert extra["step"] == sum(math.ceil(steps / 2) for steps in extra["worker_steps"]), extra
    assert extra["val_accuracy"] >= VALID_MODEL, extra


def assert_finished_without_worker_3(result, tmp_path, metrics):
    assert result.returncode == 0, result.stdout
    assert "worker rank 3: no heartbeat" in result.stdout and "MPI_Abort" in result.stdout
    assert "finished after" in result.stdout
    _, extra = final_model(tmp_path)
    # 3 workers x 22 batches x 3 epochs = 198 steps, each live worker capped at 96: the hung worker surely
    # made its 6 steps, and the live workers took over the rest of its share
    steps = extra["worker_steps"]
    assert steps == [96, 96, HUNG_AT_STEP] and sum(steps) == 198, extra
    assert extra["val_accuracy"] >= VALID_MODEL, extra
    assert read_metrics(metrics)[-1]["dead_workers"] == [3]


HUNG_AT_STEP = 6
HUNG_FLAGS = ["--epochs", "3", "--max-steps", "96", "--lr", "0.05", "--worker-timeout", WORKER_TIMEOUT,
              "--log-every", "4"]
HANG = {"MPISGD_TEST_WORKER_FAULT": f"3:{HUNG_AT_STEP}:sleep:600"}


@pytest.mark.parametrize("path", PATHS)
def test_a_worker_hung_in_its_own_code_is_counted_dead_and_the_job_ends_with_exit_0(tmp_path, data, path):
    """Rank 3 stops at its 6th step without entering MPI again (a deadlock or an endless loop in user
    code); the job finishes without it."""
    metrics = tmp_path / "run.jsonl"
    result = train(4, data, *HUNG_FLAGS, "--checkpoint-dir", tmp_path, "--metrics", metrics,
                   env={**PATHS[path], **HANG}, timeout=FAULT_TIMEOUT)
    assert f"sleeping 600.0 s at step {HUNG_AT_STEP}" in result.stdout, result.stdout
    assert_finished_without_worker_3(result, tmp_path, metrics)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
@pytest.mark.parametrize("path", PATHS)
def test_a_worker_frozen_from_outside_is_counted_dead_and_the_job_ends_with_exit_0(tmp_path, data, path):
    """SIGSTOP on rank 3's process once the metrics show its 6th step, where the hang fault holds it
    outside MPI: frozen at a random moment it could hold the shared-memory mutex of a window's atomic
    operations, which stalls every rank that uses that window (see mpisgd/downpour/windows.py), a hang
    this test is not about."""
    marker = uuid.uuid4().hex
    metrics = tmp_path / "run.jsonl"
    outcome = {}

    def launch():
        outcome["result"] = train(4, data, *HUNG_FLAGS, "--checkpoint-dir", tmp_path, "--metrics", metrics,
                                  env={**PATHS[path], **HANG, MARKER_VARIABLE: marker}, timeout=FAULT_TIMEOUT)

    runner = threading.Thread(target=launch)
    runner.start()
    pid = pid_of_rank(marker, 3, timeout=FAULT_TIMEOUT)
    try:
        deadline = time.monotonic() + FAULT_TIMEOUT  # bounds a hang only
        reached = False
        while not reached and runner.is_alive() and time.monotonic() < deadline:
            records = read_metrics(metrics) if metrics.exists() else []
            reached = any(r.get("worker_steps", [0, 0, 0])[2] >= HUNG_AT_STEP for r in records)
            time.sleep(0.05)
        assert reached, "the metrics never showed rank 3 at its hang"
        os.kill(pid, signal.SIGSTOP)
        runner.join(FAULT_TIMEOUT)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.join(FAULT_TIMEOUT)
    assert_finished_without_worker_3(outcome["result"], tmp_path, metrics)


def test_non_finite_gradients_are_never_applied(tmp_path, data):
    # 2 workers x 32 batches, each capped at 32 steps: rank 2 surely reaches its 9th step
    stop = train(3, data, "--epochs", "1", "--max-steps", "32", "--checkpoint-dir", tmp_path / "stop",
                 env={"MPISGD_TEST_WORKER_FAULT": "2:9:nan"})
    assert stop.returncode == 1, stop.stdout
    assert stop.stdout.count("a worker computed a non-finite gradient") == 3, stop.stdout
    _, extra = final_model(tmp_path / "stop")
    assert extra["worker_steps"][1] == 9
    metrics = tmp_path / "skip.jsonl"
    skip = train(3, data, "--epochs", "1", "--max-steps", "32", "--checkpoint-dir", tmp_path / "skip",
                 "--on-nonfinite", "skip", "--metrics", metrics, env={"MPISGD_TEST_WORKER_FAULT": "2:9:nan"})
    assert skip.returncode == 0, skip.stdout
    _, extra = final_model(tmp_path / "skip")
    assert read_metrics(metrics)[-1]["nonfinite_gradients"] == 1
    assert extra["step"] == 2 * 32 - 1  # every push but the non-finite one


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nprocs, flags, message", [
    (2, ["--servers", "2"], "2 rank(s) cannot hold 2 server(s) + at least 1 worker"),
    (3, ["--servers", "0"], "--servers must be positive"),
    (3, ["--n-push", "0"], "--n-push must be positive"),
    (3, ["--n-fetch", "-1"], "--n-fetch must be positive"),
    (3, ["--strategy", "dcasgd", "--dc-lambda", "-1"], "--dc-lambda must be >= 0"),
    (3, ["--server-rule", "adam"], "--server-rule must be one of"),
    (3, ["--server-nice", "20"], "--server-nice must be in 0..19"),
])
def test_bad_input_is_a_clear_error_with_exit_2_on_every_rank(data, nprocs, flags, message):
    result = train(nprocs, data, *flags)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count(message) == nprocs, result.stdout


# ---- resume ---------------------------------------------------------------------------------

def test_resume_continues_the_shards_and_the_workers(tmp_path, data):
    """Checkpoints hold whole vectors (parameters, Adagrad state), so a job resumes with any number of
    servers: written by 2 shards, resumed by 1."""
    first = train(4, data, "--servers", "2", "--epochs", "5", "--max-steps", "10",
                  "--checkpoint-dir", tmp_path, "--lr", "0.05")
    assert first.returncode == 0, first.stdout
    before = load_checkpoint(tmp_path / "final.h5")
    assert before["extra"]["worker_steps"] == [10, 10]
    second = train(3, data, "--epochs", "5", "--max-steps", "30", "--checkpoint-dir", tmp_path,
                   "--lr", "0.05", "--resume")
    assert second.returncode == 0, second.stdout
    state = load_checkpoint(tmp_path / "final.h5")
    assert state["extra"]["worker_steps"] == [30, 30] and state["extra"]["step"] == 60
    assert state["optimizer_state"]["rule"] == "adagrad"
    squares = state["optimizer_state"]["state"]["sum_of_squares"]
    # Adagrad's sums only grow: the resumed shards started from the saved ones, not from zero
    assert (squares >= before["optimizer_state"]["state"]["sum_of_squares"]).all() and (squares > 0).any()
