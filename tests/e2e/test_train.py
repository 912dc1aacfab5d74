"""`mpisgd train --strategy sync` end to end under mpiexec: resume, bad input, metrics, plot."""

import json

import h5py
import numpy as np
import pytest
import torch
from helpers import mpisgd_command, run_mpi

from mpisgd.checkpoint import load_checkpoint
from mpisgd.metrics import read_metrics

TIMEOUT = 240


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """64 training and 64 validation samples of an easy 3-class problem, written by `mpisgd make-data`."""
    folder = tmp_path_factory.mktemp("data")
    for name, sample_seed in (("train", 1), ("val", 2)):
        result = run_mpi(1, [mpisgd_command(), "make-data", str(folder / f"{name}.h5"), "--samples", "64",
                             "--features", "6", "--classes", "3", "--seed", "5", "--sample-seed",
                             str(sample_seed)], timeout=TIMEOUT)
        assert result.returncode == 0, result.stdout
    return folder / "train.h5", folder / "val.h5"


def train(nprocs, data, *flags, timeout=TIMEOUT):
    train_path, val_path = data
    return run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(train_path),
                            "--val", str(val_path), "--batch-size", "8", "--hidden", "16",
                            "--no-progress", *map(str, flags)], timeout=timeout)


@pytest.mark.parametrize("optimizer_flags", [
    ["--optimizer", "sgd", "--momentum", "0.9"],
    ["--optimizer", "lars", "--warmup-epochs", "1", "--schedule", "step", "--milestones", "2"],
])
def test_resume_equals_uninterrupted_run(tmp_path, small_data, optimizer_flags):
    # 2 ranks x batch 8 on 64 samples: 4 steps per epoch; stopping at 6 interrupts mid-epoch
    straight = train(2, small_data, "--epochs", "3", "--max-steps", "12", "--checkpoint-dir", tmp_path / "a",
                     *optimizer_flags)
    assert straight.returncode == 0, straight.stdout
    first = train(2, small_data, "--epochs", "3", "--max-steps", "6", "--checkpoint-dir", tmp_path / "b",
                  *optimizer_flags)
    assert first.returncode == 0, first.stdout
    second = train(2, small_data, "--epochs", "3", "--max-steps", "12", "--checkpoint-dir", tmp_path / "b",
                   "--resume", *optimizer_flags)
    assert second.returncode == 0, second.stdout
    a = load_checkpoint(tmp_path / "a" / "final.h5")
    b = load_checkpoint(tmp_path / "b" / "final.h5")
    assert a["extra"]["step"] == b["extra"]["step"] == 12
    for name, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][name]), f"{name} differs after resume"
    first_run = load_checkpoint(tmp_path / "b" / "checkpoint-000000006.h5")
    assert not torch.equal(first_run["model_state"]["0.weight"] if "0.weight" in first_run["model_state"]
                           else next(iter(first_run["model_state"].values())),
                           next(iter(a["model_state"].values()))), "resume test would pass without training"


def test_metrics_target_accuracy_and_plot(tmp_path, small_data):
    metrics = tmp_path / "run.jsonl"
    result = train(3, small_data, "--epochs", "20", "--lr", "0.5", "--metrics", metrics, "--log-every", "1",
                   "--target-accuracy", "0.8")
    assert result.returncode == 0, result.stdout
    assert "(target_accuracy)" in result.stdout
    records = read_metrics(metrics)
    losses = [r for r in records if r.get("loss") is not None]
    evaluations = [r for r in records if r.get("val_accuracy") is not None]
    assert losses and all({"step", "epoch", "lr", "samples_per_s", "wall_time"} <= r.keys() for r in losses)
    assert evaluations[-1]["val_accuracy"] >= 0.8 and len(evaluations) < 20
    assert losses[-1]["loss"] < losses[0]["loss"]
    png = tmp_path / "curves.png"
    plot = run_mpi(1, [mpisgd_command(), "plot", str(metrics), str(metrics), "-o", str(png)], timeout=TIMEOUT)
    assert plot.returncode == 0, plot.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_and_flag_precedence(tmp_path, small_data):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 50, "max-steps": 3, "checkpoint_dir": str(tmp_path / "c")}))
    result = train(2, small_data, "--config", config, "--max-steps", "2")
    assert result.returncode == 0, result.stdout
    assert load_checkpoint(tmp_path / "c" / "final.h5")["extra"]["step"] == 2  # the flag won
    config.write_text(json.dumps({"epochz": 2}))
    bad = train(2, small_data, "--config", config)
    assert bad.returncode == 2 and bad.stdout.count("unknown setting 'epochz'") == 2, bad.stdout


def write_h5(path, x, y, **attrs):
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
        f.attrs.update(attrs)
    return path


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    y = np.arange(40) % 3
    late_bad_label = y.copy()
    late_bad_label[-1] = 7  # only the last rank's block sees it
    (folder / "not_hdf5.h5").write_text("hello")
    return {
        "missing": folder / "does_not_exist.h5",
        "not_hdf5": folder / "not_hdf5.h5",
        "length_mismatch": write_h5(folder / "mismatch.h5", x, y[:30]),
        "label_out_of_range": write_h5(folder / "labels.h5", x, late_bad_label, num_classes=3),
        "negative_label": write_h5(folder / "negative.h5", x, -y),
        "too_few_samples": write_h5(folder / "tiny.h5", x[:1], y[:1]),
        "nan_x": write_h5(folder / "nan.h5", np.where(np.arange(40)[:, None] == 39, np.nan, x), y),
    }


@pytest.mark.parametrize("case, flags, message", [
    ("missing", [], "does_not_exist.h5"),
    ("not_hdf5", [], "not_hdf5.h5"),
    ("length_mismatch", [], "30"),
    ("label_out_of_range", [], "label"),
    ("negative_label", [], "label"),
    ("too_few_samples", [], "sample"),
    ("nan_x", [], "finite"),
    (None, ["--model", "resnet"], "--model must be one of"),
    (None, ["--optimizer", "adamw"], "--optimizer must be one of"),
    (None, ["--batch-size", "0"], "--batch-size must be positive"),
    (None, ["--lr", "-0.1"], "--lr must be positive"),
    (None, ["--epochs", "two"], "cannot read 'two'"),
    (None, ["--resume"], "--resume needs --checkpoint-dir"),
    (None, ["--unknown-flag"], "unrecognized arguments"),
])
def test_bad_input_is_a_clear_error_with_exit_2_on_every_rank(small_data, broken_files, case, flags, message):
    data = (broken_files[case], small_data[1]) if case else small_data
    nprocs = 3
    result = train(nprocs, data, "--epochs", "1", *flags, timeout=120)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count(message) >= nprocs, result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),  # argparse, before MPI starts
    (["--batch-size", "0"], "--batch-size must be positive"),  # the configuration's check, MPI running
])
def test_a_bad_input_error_is_printed_by_every_rank_even_one_that_starts_late(small_data, flags, message):
    """The last rank starts its command 3 s after the others (an MPMD launch: it sleeps first). Open MPI's
    launcher ends the job as soon as one rank exits non-zero (a 3-rank run in CI lost one rank's message), so
    the ranks that failed wait for each other before they exit (mpisgd.cli._leave_together)."""
    command = [mpisgd_command(), "train", "--data", str(small_data[0]), "--val", str(small_data[1]),
               "--no-progress", *flags]
    late = ["sh", "-c", 'sleep 3; exec "$@"', "late-rank", *command]
    result = run_mpi(2, [*command, ":", "-n", "1", *late], timeout=TIMEOUT)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count(message) == 3, result.stdout


def test_non_finite_gradients_stop_or_skip(tmp_path, small_data):
    stop = train(2, small_data, "--epochs", "2", "--lr", "1e30", "--momentum", "0")
    assert stop.returncode == 1, stop.stdout
    assert stop.stdout.count("non-finite averaged gradient") == 2 and "step " in stop.stdout
    skip = train(2, small_data, "--epochs", "2", "--lr", "1e30", "--momentum", "0", "--on-nonfinite", "skip",
                 "--checkpoint-dir", tmp_path / "skip")
    assert skip.returncode == 0, skip.stdout
    assert "skipped" in skip.stdout
    final = load_checkpoint(tmp_path / "skip" / "final.h5")["model_state"]
    assert all(torch.isfinite(t).all() for t in final.values()), "a non-finite step was applied"


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "downpour", "--momentum", "0.5"],
     "--momentum is not used by --strategy downpour; it is read by --strategy sync, sync-ps only"),
    (["--strategy", "sandblaster", "--epochs", "2"],
     "--epochs is not used by --strategy sandblaster; it is read by --strategy sync, downpour, dcasgd, sync-ps only"),
    (["--servers", "2"], "--servers is not used by --strategy sync"),
])
def test_a_setting_the_strategy_ignores_is_an_error_naming_who_reads_it(small_data, flags, message):
    result = train(2, small_data, *flags, timeout=120)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count(message) == 2, result.stdout


def test_a_config_file_setting_the_strategy_ignores_names_the_file(tmp_path, small_data):
    config = tmp_path / "run.toml"
    config.write_text("n-push = 4\n")
    result = train(2, small_data, "--config", config, timeout=120)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count(f"--n-push (set in {config}) is not used by --strategy sync") == 2, result.stdout


def test_hier_is_accepted_like_every_all_reduce_algorithm(small_data):
    """--algorithm takes its list from mpisgd.comm (hier included); hier on one node falls back as the API does."""
    result = train(2, small_data, "--epochs", "1", "--max-steps", "2", "--algorithm", "hier", timeout=120)
    assert "--algorithm must be one of" not in result.stdout, result.stdout
