"""`mpisgd train --strategy sandblaster` end to end under mpiexec: the optimum scipy finds, stragglers
and backup tasks, lost workers, bad input.

The reference is computed here, independently of mpisgd: the same objective (mean cross-entropy of
softmax regression + (wd/2)||W||^2, bias not penalized) in numpy, minimized by scipy's L-BFGS-B.

Faults happen at a fixed point of the run, whatever the machine's load, through the worker's
test-only hook MPISGD_SANDBLASTER_FAULT=<rank>:<n>:<action> (mpisgd.faults.sandblaster_fault), acting
after the worker computed its n-th portion, before it reports it (i.e. in the middle of a pass):
``straggle`` holds every portion from then on until its pass is over, so each one is won by a backup
copy and every late copy races in after it; ``freeze`` SIGSTOPs the worker (a hung process, never
continued: the job's abort takes it down); ``exit`` leaves the job with an exit. A worker cannot be
killed with a signal to test a dead one: MPICH's hydra then SIGKILLs every rank whatever the flags
(see the docstring of mpisgd.sandblaster.job), and so does Open MPI's PRRTE unless the job is
"recoverable", where MPI_Abort no longer ends a hung rank (measured: docs/cluster.rst); the exiting worker
runs under the launcher's keep-running flags (helpers.keep_running_flags: hydra's -disable-auto-cleanup,
PRRTE's ``--runtime-options error-nonzero-status=false``).
"""

import os
import signal
import uuid

import h5py
import numpy as np
import pytest
import torch
from helpers import keep_running_flags, mpisgd_command, run_mpi
from scipy.optimize import minimize

from mpisgd.checkpoint import load_checkpoint
from mpisgd.data import make_classification_h5
from mpisgd.faults import MARKER_VARIABLE, SANDBLASTER_FAULT_VARIABLE, pid_of_rank
from mpisgd.metrics import read_metrics
from mpisgd.models import build_model

TIMEOUT = 120
WEIGHT_DECAY = 1e-2
SAMPLES, FEATURES, CLASSES, PORTION = 256, 10, 3, 32
PORTIONS = SAMPLES // PORTION


def objective(weights, bias, x, y):
    """The documented Sandblaster objective for softmax regression, in float64 numpy."""
    logits = x @ weights.T + bias
    shift = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - shift).sum(axis=1)) + shift[:, 0]
    return float(np.mean(log_z - logits[np.arange(len(y)), y]) + 0.5 * WEIGHT_DECAY * np.sum(weights ** 2))


def scipy_optimum(x, y):
    def fun(theta):
        w, b = theta[:CLASSES * FEATURES].reshape(CLASSES, FEATURES), theta[CLASSES * FEATURES:]
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        residual = p - np.eye(CLASSES)[y]
        grad_w = residual.T @ x / len(y) + WEIGHT_DECAY * w
        return objective(w, b, x, y), np.concatenate([grad_w.ravel(), residual.mean(axis=0)])
    result = minimize(fun, np.zeros(CLASSES * (FEATURES + 1)), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 2000})
    return result.fun


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """256 samples x 10 features x 3 classes, and scipy's optimum of the objective on them."""
    folder = tmp_path_factory.mktemp("sandblaster")
    for name, sample_seed, samples in (("train", 1, SAMPLES), ("val", 2, 128)):  # as `mpisgd make-data`
        make_classification_h5(folder / f"{name}.h5", samples, FEATURES, CLASSES, seed=5,
                               sample_seed=sample_seed)
    with h5py.File(folder / "train.h5") as file:
        x, y = file["x"][()].astype(np.float64), file["y"][()]
    return {"train": folder / "train.h5", "val": folder / "val.h5", "x": x, "y": y,
            "optimum": scipy_optimum(x, y)}


class Run:
    """One finished sandblaster job: its output, metrics and final checkpoint."""

    def __init__(self, result, folder):
        self.returncode, self.stdout = result.returncode, result.stdout
        self.metrics_path = folder / "metrics.jsonl"
        self.records = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        self.iterations = [r for r in self.records if "train_objective" in r]
        self.checkpoint = folder / "checkpoint" / "final.h5"

    @property
    def objective(self):
        return self.iterations[-1]["train_objective"]


def sandblaster(nprocs, servers, problem, folder, *flags, model="linear", env=None, mpiexec_flags=()):
    folder.mkdir(parents=True, exist_ok=True)
    result = run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", "sandblaster",
                              "--servers", str(servers), "--model", model, "--hidden", "8",
                              "--data", str(problem["train"]), "--val", str(problem["val"]),
                              "--weight-decay", str(WEIGHT_DECAY), "--portion-size", str(PORTION),
                              "--gradient-tolerance", "1e-7", "--max-iterations", "200",
                              "--metrics", str(folder / "metrics.jsonl"),
                              "--checkpoint-dir", str(folder / "checkpoint"), "--no-progress",
                              *map(str, flags)],
                     timeout=TIMEOUT, env=env, mpiexec_flags=list(mpiexec_flags))
    return Run(result, folder)


_baselines: dict = {}


def baseline(nprocs, servers, problem, tmp_path_factory):
    """Undisturbed run at (nprocs, servers), shared by the tests that compare against it."""
    if (nprocs, servers) not in _baselines:
        folder = tmp_path_factory.mktemp(f"baseline-{nprocs}-{servers}")
        _baselines[nprocs, servers] = sandblaster(nprocs, servers, problem, folder)
    return _baselines[nprocs, servers]


def assert_every_portion_counted_once(run, servers):
    for record in run.iterations:
        expected = record["passes"] * PORTIONS
        assert record["portions_per_pass"] == PORTIONS
        assert record["accepted_losses"] == expected, record
        assert record["accepted_gradients"] == [expected] * servers, record
        assert sum(record["portions_per_worker"].values()) == expected, record


def checkpoint_objective(run, problem):
    state = load_checkpoint(run.checkpoint)
    model = build_model("linear", (FEATURES,), CLASSES)
    model.load_state_dict(state["model_state"])  # the shared format loads into the built-in model
    weights, bias = (state["model_state"][k].double().numpy() for k in ("1.weight", "1.bias"))
    return objective(weights, bias, problem["x"], problem["y"]), state["extra"]


@pytest.mark.parametrize("nprocs, servers", [(3, 1), (4, 1), (5, 2)])
def test_final_objective_matches_scipy(problem, tmp_path_factory, nprocs, servers):
    run = baseline(nprocs, servers, problem, tmp_path_factory)
    assert run.returncode == 0, run.stdout
    assert "mpisgd train: sandblaster finished after" in run.stdout
    optimum = problem["optimum"]
    assert abs(run.objective - optimum) <= 1e-6 * optimum, (run.objective, optimum)
    assert [r["step"] for r in run.iterations] == list(range(len(run.iterations)))
    assert np.all(np.diff([r["train_objective"] for r in run.iterations]) < 0)
    keys = {"train_objective", "loss", "gradient_norm", "step_size", "step_length", "function_evaluations",
            "backup_portions", "portions_per_worker", "wall_time"}
    assert keys <= set(run.iterations[-1]) and run.iterations[-1]["gradient_norm"] < 1e-3
    assert_every_portion_counted_once(run, servers)
    from_checkpoint, extra = checkpoint_objective(run, problem)
    assert abs(from_checkpoint - optimum) <= 1e-6 * optimum
    assert extra["strategy"] == "sandblaster" and extra["step"] == run.iterations[-1]["step"]
    assert run.records[-1]["val_accuracy"] > 0.8
    if nprocs == 3:  # `mpisgd plot` reads sandblaster metrics like any other
        png = run.metrics_path.with_suffix(".png")
        plot = run_mpi(1, [mpisgd_command(), "plot", str(run.metrics_path), "-o", str(png)], timeout=TIMEOUT)
        assert plot.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG", plot.stdout


def test_straggler_gets_backup_tasks_and_changes_nothing(problem, tmp_path_factory, tmp_path):
    reference = baseline(4, 1, problem, tmp_path_factory)
    # worker rank 3 holds each portion until its pass is over: a backup copy on rank 2 must win every one
    run = sandblaster(4, 1, problem, tmp_path, env={SANDBLASTER_FAULT_VARIABLE: "3:1:straggle"})
    assert run.returncode == 0, run.stdout
    assert "lost worker" not in run.stdout, run.stdout  # held, not hung: it answers STOP at the end
    assert sum(r.get("backup_portions", 0) for r in run.iterations) > 0, "no backup task was issued"
    late_kinds = ("duplicate_results", "stale_results", "duplicate_gradients", "stale_gradients")
    late_copies = sum(r[k] for r in run.iterations for k in late_kinds)
    assert late_copies > 0, "no backup copy raced the original: the test did not exercise duplicates"
    assert sum(r["computed_per_worker"]["3"] for r in run.iterations) > 0  # the straggler did compute
    assert_every_portion_counted_once(run, 1)
    assert len(run.iterations) == len(reference.iterations)
    for ours, theirs in zip(run.iterations, reference.iterations):
        assert ours["train_objective"] == pytest.approx(theirs["train_objective"], rel=1e-9, abs=0)
    done_by = {rank: sum(r["portions_per_worker"][rank] for r in run.iterations) for rank in ("2", "3")}
    assert done_by["2"] > done_by["3"], done_by  # the free worker simply did more of the portions


def test_frozen_worker_is_left_behind_and_the_job_ends(problem, tmp_path):
    marker = uuid.uuid4().hex
    try:  # worker rank 4 SIGSTOPs itself in the middle of a pass, holding a portion
        run = sandblaster(5, 1, problem, tmp_path, "--worker-timeout", "2", "--no-backup-tasks",
                          env={MARKER_VARIABLE: marker, SANDBLASTER_FAULT_VARIABLE: "4:3:freeze"})
    finally:
        try:  # in case the job did not end it
            os.kill(pid_of_rank(marker, 4, timeout=0.5), signal.SIGKILL)
        except (RuntimeError, ProcessLookupError):
            pass
    assert run.returncode == 0, run.stdout
    assert "freezing (SIGSTOP) in the middle of pass" in run.stdout
    assert "lost worker rank(s) 4" in run.stdout
    assert abs(run.objective - problem["optimum"]) <= 1e-6 * problem["optimum"]
    assert checkpoint_objective(run, problem)[0] == pytest.approx(problem["optimum"], rel=1e-6)
    # without backup tasks the frozen worker's portion waited for --worker-timeout, then was re-issued
    assert sum(r.get("reissued_portions", 0) for r in run.iterations) >= 1
    assert run.iterations[-1]["lost_workers"] == [4]
    assert_every_portion_counted_once(run, 1)


def test_worker_that_exits_mid_pass_is_survived(problem, tmp_path):
    run = sandblaster(4, 1, problem, tmp_path, "--worker-timeout", "2", "--max-iterations", "30", model="mlp",
                      env={SANDBLASTER_FAULT_VARIABLE: "3:5:exit"}, mpiexec_flags=keep_running_flags())
    assert run.returncode == 0, run.stdout
    assert "leaving the job in the middle of pass" in run.stdout and "lost worker rank(s) 3" in run.stdout
    objectives = [r["train_objective"] for r in run.iterations]
    assert objectives[-1] < 0.5 * objectives[0] and np.all(np.diff(objectives) < 0)
    state = load_checkpoint(run.checkpoint)
    model = build_model("mlp", (FEATURES,), CLASSES, (8,))
    model.load_state_dict(state["model_state"])
    assert all(torch.isfinite(t).all() for t in state["model_state"].values())


@pytest.mark.parametrize("nprocs, flags, message, code", [
    (2, ["--servers", "1"], "2 rank(s) cannot hold 1 server(s) + 1 coordinator + at least 1 worker", 2),
    (3, ["--history", "0"], "--history must be positive", 2),
    (3, ["--portion-size", "-4"], "--portion-size must be positive", 2),
    (3, ["--model", "cnn"], "has buffers (batch norm)", 2),
])
def test_bad_input_is_a_clear_error_on_every_rank(problem, tmp_path, nprocs, flags, message, code):
    if "cnn" in flags:  # image-shaped data, so that the model builds and its batch norm is what is refused
        images = tmp_path / "images.h5"
        make_classification_h5(images, 64, 16, CLASSES, seed=5, image_shape=(1, 4, 4))
        problem = dict(problem, train=images, val=images)
    run = sandblaster(nprocs, 1, problem, tmp_path, *flags)
    assert run.returncode == code, run.stdout
    assert run.stdout.count(message) == nprocs, run.stdout


def test_values_beyond_float32_are_refused_on_every_rank(problem, tmp_path):
    """A float64 value that overflows float32 (the models' input type) would make the objective NaN: the file
    is refused when it is opened, on every rank, naming the file and the row, exit 2."""
    x = problem["x"].copy()
    x[7, 2] = 1e200
    data = dict(problem, train=tmp_path / "overflow.h5")
    with h5py.File(data["train"], "w") as file:
        file["x"], file["y"] = x, problem["y"]
    run = sandblaster(3, 1, data, tmp_path)
    assert run.returncode == 2, run.stdout
    assert run.stdout.count("beyond float32's range (first at row 7)") == 3, run.stdout
    assert "overflow.h5" in run.stdout and "Traceback" not in run.stdout
