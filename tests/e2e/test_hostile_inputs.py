"""Hostile inputs through the real `mpisgd train` command: exit 2 on every rank, the file (or setting)
named, no traceback, no hang (each run has a timeout). The many generated cases run in process
(tests/unit/test_hostile_inputs.py); these few prove the command's side of it, including a problem only
one rank's block holds reaching every rank, and the launcher/MPI mismatch check of a singleton."""

import json
import os
import subprocess

import h5py
import numpy as np
import pytest
from helpers import ROOT, mpisgd_command, run_mpi

TIMEOUT = 180
RANKS = 3


def write_h5(path, x, y, **attrs):
    with h5py.File(path, "w") as file:
        file["x"], file["y"] = x, y
        file.attrs.update(attrs)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 6)).astype(np.float32)
    y = np.arange(48) % 3
    huge = y.copy()
    huge[47] = 10**12  # in the last rank's block only
    good = write_h5(folder / "good.h5", x, y)
    raw = good.read_bytes()
    (folder / "random.h5").write_bytes(rng.bytes(4096))
    (folder / "truncated.h5").write_bytes(raw[: len(raw) * 2 // 3])
    with h5py.File(folder / "group.h5", "w") as file:
        file.create_group("x")
        file["y"] = y
    return {
        "good": good,
        "huge_label": write_h5(folder / "huge_label.h5", x, huge),
        "random": folder / "random.h5",
        "truncated": folder / "truncated.h5",
        "group": folder / "group.h5",
        "other_features": write_h5(folder / "other_features.h5", x[:, :4], y),
    }


def train(nprocs, data, val, *flags, env=None):
    return run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--val", str(val),
                            "--batch-size", "8", "--hidden", "8", "--epochs", "1", "--no-progress", *map(str, flags)],
                   timeout=TIMEOUT, env=env)


def assert_refused_on_every_rank(result, *named, ranks=RANKS):
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout and "Fatal Python error" not in result.stdout, result.stdout
    assert result.stdout.count("mpisgd: error:") >= ranks, result.stdout  # counted whole: the launcher joins lines
    for text in named:
        assert result.stdout.count(text) >= ranks, (text, result.stdout)


@pytest.mark.parametrize("case, flags, named", [
    ("huge_label", [], ["huge_label.h5", "label 1000000000000 at row 47", "--num-classes"]),
    # stated: only the last rank's block holds the label, and every rank must still hear of it
    ("huge_label", ["--num-classes", "3"], ["huge_label.h5", "label 1000000000000 at row 47 is outside [0, 3)"]),
    ("random", [], ["random.h5"]),
    ("truncated", [], ["truncated.h5"]),
    ("group", [], ["group.h5", "'x' is a group"]),
])
def test_a_hostile_training_file_is_refused_on_every_rank(files, case, flags, named):
    assert_refused_on_every_rank(train(RANKS, files[case], files["good"], *flags), *named)


def test_a_validation_file_of_other_features_names_both_files(files):
    result = train(2, files["good"], files["other_features"])
    assert_refused_on_every_rank(result, "other_features.h5", "good.h5", ranks=2)


def test_a_config_file_of_ill_typed_values_is_refused_naming_the_setting(files, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": None, "lr": True}))
    result = train(2, files["good"], files["good"], "--config", config)
    assert_refused_on_every_rank(result, "--epochs: needs a value, got null", ranks=2)
    config.write_text(json.dumps({"hidden": "wide"}))
    assert_refused_on_every_rank(train(2, files["good"], files["good"], "--config", config),
                                 "--hidden: cannot read 'wide'", ranks=2)


def singleton(files, env):
    """`mpisgd train` started without mpiexec, as a launcher whose MPI mpi4py does not speak would."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "SLURM_", "MPISGD_"))}
    command = [mpisgd_command(), "train", "--data", str(files["good"]), "--val", str(files["good"]),
               "--max-steps", "1", "--hidden", "8", "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env={**environ, "PYTHONUNBUFFERED": "1", **env})


def test_launcher_says_four_tasks_but_mpi_one_rank_exits_2(files):
    refused = singleton(files, {"PMI_SIZE": "4"})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "PMI_SIZE=4" in refused.stderr and "MPISGD_ALLOW_SINGLETON" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and "finished" not in refused.stdout
    allowed = singleton(files, {"PMI_SIZE": "4", "MPISGD_ALLOW_SINGLETON": "1"})
    assert allowed.returncode == 0 and "finished after 1 steps" in allowed.stdout, allowed.stdout + allowed.stderr
    warned = singleton(files, {"SLURM_NTASKS": "4"})  # a batch script without srun: warned, not refused
    assert warned.returncode == 0 and "SLURM_NTASKS=4" in warned.stderr, warned.stdout + warned.stderr


def test_an_explicit_shm_algorithm_without_room_in_dev_shm_exits_2_on_every_rank(files):
    # a window far larger than any /dev/shm: the ranks agree on the free space before allocating anything
    result = train(2, files["good"], files["good"], "--algorithm", "shm", env={"MPISGD_SHM_AREA_BYTES": str(1 << 40)})
    assert_refused_on_every_rank(result, "/dev/shm", "MiB are free there", ranks=2)
