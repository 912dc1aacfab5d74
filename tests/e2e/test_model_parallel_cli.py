"""`mpisgd train --stages K` end to end: a split replica trains exactly as the unsplit model in one process
(the reference), resumes at another K, and a world that does not factor is refused on every rank."""

import pytest
import torch
from helpers import mpisgd_command, run_mpi

from mpisgd.checkpoint import load_checkpoint
from mpisgd.metrics import read_metrics

TIMEOUT = 240


def train(nprocs, folder, *flags):
    return run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", "sync", "--max-steps", "12", "--epochs", "1",
                            "--batch-size", "16", "--hidden", "32,16", "--warmup-epochs", "0.5",
                            "--checkpoint-dir", str(folder), "--no-progress", *map(str, flags)], timeout=TIMEOUT)


def final_parameters(folder):
    return load_checkpoint(folder / "final.h5")["model_state"]


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unsplit")
    result = train(1, folder)
    assert result.returncode == 0, result.stdout
    return final_parameters(folder)


@pytest.mark.parametrize("nprocs, flags", [
    (2, ["--stages", "2", "--micro-batches", "2"]),
    (3, ["--stages", "3", "--micro-batches", "4", "--pipeline-schedule", "1f1b"]),
    (2, ["--tensor-parallel", "2"]),
], ids=["K2-gpipe", "K3-1f1b", "T2"])
def test_split_run_writes_the_unsplit_runs_model(tmp_path, unsplit, nprocs, flags):
    result = train(nprocs, tmp_path, *flags)
    assert result.returncode == 0, result.stdout
    split = final_parameters(tmp_path)
    assert sorted(split) == sorted(unsplit)  # the unsplit model's layer names
    for name, reference in unsplit.items():
        torch.testing.assert_close(torch.as_tensor(split[name]), torch.as_tensor(reference), rtol=1e-4, atol=1e-5)


def test_resume_at_another_number_of_stages(tmp_path, unsplit):
    first = run_mpi(2, [mpisgd_command(), "train", "--strategy", "sync", "--max-steps", "6", "--epochs", "1",
                        "--batch-size", "16", "--hidden", "32,16", "--warmup-epochs", "0.5", "--checkpoint-dir",
                        str(tmp_path), "--no-progress", "--stages", "2", "--micro-batches", "2"], timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout
    second = train(3, tmp_path, "--stages", "3", "--micro-batches", "4", "--resume")
    assert second.returncode == 0, second.stdout
    for name, reference in unsplit.items():
        torch.testing.assert_close(torch.as_tensor(final_parameters(tmp_path)[name]), torch.as_tensor(reference),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nprocs, flags, says", [
    (3, ["--stages", "2", "--micro-batches", "2"], "do not factor"),
    (2, ["--stages", "2", "--micro-batches", "3"], "not divisible"),
], ids=["world-does-not-factor", "batch-not-divisible-by-M"])
def test_bad_layouts_are_refused_on_every_rank(tmp_path, nprocs, flags, says):
    result = train(nprocs, tmp_path, *flags)
    assert result.returncode == 2, result.stdout
    # every rank says it (their lines may interleave in the launcher's output)
    assert result.stdout.count("mpisgd: error:") == nprocs and result.stdout.count(says) == nprocs, result.stdout


def test_metrics_of_a_split_run_record_the_unsplit_runs_losses(tmp_path):
    records = {}
    for nprocs, flags in ((1, []), (2, ["--stages", "2", "--micro-batches", "2"])):
        metrics = tmp_path / f"metrics{nprocs}.jsonl"
        result = train(nprocs, tmp_path / f"run{nprocs}", "--metrics", metrics, "--log-every", "4", *flags)
        assert result.returncode == 0, result.stdout
        records[nprocs] = [r for r in read_metrics(metrics) if r.get("loss") is not None]
    assert [r["step"] for r in records[2]] == [r["step"] for r in records[1]] == [4, 8, 12]
    for split, unsplit_record in zip(records[2], records[1]):
        assert split["loss"] == pytest.approx(unsplit_record["loss"], rel=1e-4)
        assert split["lr"] == pytest.approx(unsplit_record["lr"])
        assert split["samples_per_s"] > 0 and split["bytes_sent"] > 0
