"""End-to-end tests of the batch scripts in ``slurm/``.

Static checks (``bash -n``, strict mode, usage line, resources in the header) run everywhere. The
CPU scripts are then submitted to a private one-node Slurm cluster on localhost
(:mod:`slurm_cluster`; skipped unless root with ``slurm-wlm`` and ``munge`` installed) with small
sizes, and their state, log and output files are checked. Jobs run the ``mpisgd`` command and the
Python of the environment running the tests (``sys.executable``'s bin directory goes first on the
PATH that ``sbatch --export=ALL`` hands to the job).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import launcher_environment, mpi_library

from .slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401  (fixture slurm_cluster)

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO_ROOT / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))
EXPECTED_SCRIPTS = {"info.sbatch", "bench_allreduce.sbatch", "sync_cpu.sbatch", "sync_gpu.sbatch",
                    "downpour.sbatch", "sandblaster.sbatch"}
ENV_BIN = Path(sys.executable).parent
MPISGD = ENV_BIN / "mpisgd"
# A deadline that only catches hung jobs: the jobs take 10-30 s on an idle 2-core machine, several times
# that when other tests share its cores, and a deadline near their length made the result depend on load.
JOB_TIMEOUT_S = 420
# The same for the parameter-server strategies' own deadline: a worker starved of CPU for longer than
# --worker-timeout (default 30 s) counts as dead and the job ends with MPI_Abort, whatever it computed.
PATIENT_WORKERS = ("--worker-timeout", "300")


# ---------------------------------------------------------------------------- static checks

def test_expected_scripts_exist() -> None:
    assert EXPECTED_SCRIPTS <= {path.name for path in SCRIPTS}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_is_well_formed(script: Path) -> None:
    text = script.read_text()
    lines = text.splitlines()
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    assert lines[0] == "#!/bin/bash"
    assert re.search(rf"^# Usage: sbatch slurm/{re.escape(script.name)}\b", text, re.MULTILINE), "usage line"
    assert "set -euo pipefail" in lines
    # sbatch stops reading #SBATCH lines at the first command: all of them must come before it.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(line) < first_command for line in directives)
    for option in ("--job-name=", "--nodes=", "--ntasks-per-node=", "--cpus-per-task=", "--time=",
                   "--output=%x-%j.out"):
        assert any(line.startswith(f"#SBATCH {option}") for line in directives), option
    assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"' in text
    assert 'srun --mpi="${SRUN_MPI:-pmi2}"' in text and "mpiexec)" in text  # both launchers
    assert re.search(r"^(launch|run_preemptible) mpisgd \w+", text, re.MULTILINE), \
        "launches the installed mpisgd command"


# ---------------------------------------------------------------------------- jobs

def _job_env(**variables: str) -> dict[str, str]:
    """The job's extra environment: this Python environment first on PATH, the MPI library's job defaults
    (:func:`_mpi_job_defaults`), plus ``variables``."""
    return {"PATH": os.pathsep.join([str(ENV_BIN), os.environ.get("PATH", "/usr/bin:/bin")]),
            **_mpi_job_defaults(), **variables}


#: why srun does not start the Open MPI wheel's ranks here (measured, Debian 12: Slurm 22.05.8, PMIx 4.2.2)
SRUN_OPEN_MPI = ("under Debian's srun --mpi=pmix (its pmix_v4 plugin needs libpmix-dev for libpmix.so) the Open MPI "
                 "5.0.11 wheel starts 2 ranks, but with 3 or more every rank from 2 on fails in MPI_Init (its PMIx "
                 "client finds no pmix.lpeers in what the plugin serves), and Open MPI 5 has no PMI2: its jobs "
                 "use mpirun inside the allocation (LAUNCHER=mpiexec)")


#: why a SIGTERM from Slurm cannot preempt a job whose ranks mpirun starts (PRRTE 3.0.11, read in its prte.c)
MPIRUN_SIGTERM = ("under Open MPI the ranks are mpirun's children, not tasks of a Slurm step, so scancel --signal=TERM "
                  "reaches none of them; and a SIGTERM that reaches mpirun itself (scancel --full, the time limit, "
                  "preemption) makes PRRTE abort the job: it terminates the ranks and exits 1, not 75, so the "
                  "script cannot requeue. Preempt such jobs with SIGUSR1, which mpirun forwards (#SBATCH "
                  "--signal=B:USR1@120, scancel --batch --signal=USR1: the other case of this test)")


def _mpi_job_defaults() -> dict[str, str]:
    """Under Open MPI (the second leg of .ci/run) the scripts start their ranks with mpirun inside the
    allocation (:data:`SRUN_OPEN_MPI`), told to oversubscribe without binding (the allocation may hold
    more tasks than the machine has cores), and as root allowed to run."""
    if mpi_library() != "openmpi":
        return {}
    return {"LAUNCHER": "mpiexec", **launcher_environment(), "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
            "PRTE_MCA_hwloc_default_binding_policy": "none"}


def _require_mpisgd(*subcommand: str) -> None:
    """Skip unless ``mpisgd <subcommand> --help`` works in this environment."""
    if not MPISGD.exists():
        pytest.skip(f"{MPISGD} not installed (pip install -e .)")
    try:
        result = subprocess.run([str(MPISGD), *subcommand, "--help"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=60, check=False,
                                env={**os.environ, **_job_env()})
    except subprocess.TimeoutExpired:
        pytest.fail(f"mpisgd {' '.join(subcommand)} --help hung")
    if result.returncode != 0:
        pytest.skip(f"mpisgd {' '.join(subcommand)} --help exited {result.returncode}: "
                    f"{result.stdout.strip()[-300:]}")


def _run_job(cluster: SlurmCluster, script: str, workdir: Path, *sbatch_args: str,
             script_args: tuple[str, ...] = (), **variables: str) -> tuple[str, str]:
    """Submit ``slurm/<script>`` from ``workdir``, wait, assert COMPLETED.

    Returns:
        (job id, contents of the job's ``%x-%j.out`` log).
    """
    job_id = cluster.sbatch(SLURM_DIR / script, *sbatch_args, script_args=script_args,
                            env=_job_env(**variables), cwd=workdir)
    state = cluster.wait(job_id, timeout=JOB_TIMEOUT_S)
    logs = sorted(workdir.glob(f"*-{job_id}.out"))
    log = logs[0].read_text(errors="replace") if logs else "<no %x-%j.out log>"
    info = cluster.job_info(job_id)
    assert state == "COMPLETED", f"job {job_id} {state} exit {info.get('ExitCode')}:\n{log}"
    assert logs and logs[0].name == f"{info['JobName']}-{job_id}.out"
    return job_id, log


def _rank_lines(log: str) -> dict[int, tuple[str, int, int]]:
    """``mpisgd info``'s per-rank lines as {rank: (host, node-local rank, node-local size)}."""
    pattern = re.compile(r"^rank (\d+): host (\S+) node-local rank (\d+)/(\d+)\b", re.MULTILINE)
    return {int(rank): (host, int(local), int(local_size))
            for rank, host, local, local_size in pattern.findall(log)}


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_info_reports_every_rank(slurm_cluster: SlurmCluster, tmp_path: Path, launcher: str) -> None:
    """Both launchers give mpi4py + the MPI library one 4-rank COMM_WORLD on the node."""
    if launcher == "srun" and mpi_library() == "openmpi":
        pytest.skip(SRUN_OPEN_MPI)
    _require_mpisgd("info")
    _, log = _run_job(slurm_cluster, "info.sbatch", tmp_path, "--ntasks-per-node=4", "--cpus-per-task=2",
                      LAUNCHER=launcher)
    assert "4 ranks x 2 threads" in log, log  # OMP_NUM_THREADS follows --cpus-per-task
    assert re.search(r"^ranks: 4$", log, re.MULTILINE), log
    ranks = _rank_lines(log)
    assert sorted(ranks) == [0, 1, 2, 3], log
    assert sorted(local for _, local, _ in ranks.values()) == [0, 1, 2, 3], log
    assert {local_size for _, _, local_size in ranks.values()} == {4}, log
    assert len({host for host, _, _ in ranks.values()}) == 1, log


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_open_mpi_job_runs_with_mpirun_inside_the_allocation(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Under Open MPI: slurm/info.sbatch with LAUNCHER=mpiexec gives one 4-rank Open MPI COMM_WORLD (PRRTE
    reads the Slurm allocation: no -n, no hostfile of its own)."""
    if mpi_library() != "openmpi":
        pytest.skip("runs in the Open MPI leg of .ci/run (this environment's mpi4py loads MPICH)")
    _require_mpisgd("info")
    _, log = _run_job(slurm_cluster, "info.sbatch", tmp_path, "--ntasks-per-node=4", LAUNCHER="mpiexec")
    assert re.search(r"^MPI library: Open MPI v5\.", log, re.MULTILINE), log
    assert "launcher mpiexec" in log and re.search(r"^ranks: 4$", log, re.MULTILINE), log
    assert sorted(_rank_lines(log)) == [0, 1, 2, 3], log


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_bench_allreduce_writes_json(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    _require_mpisgd("bench", "allreduce")
    job_id, log = _run_job(slurm_cluster, "bench_allreduce.sbatch", tmp_path, "--ntasks-per-node=2",
                           SIZES="4KiB,64KiB")
    report = json.loads((tmp_path / f"mpisgd-bench-allreduce-{job_id}.json").read_text())
    assert report["meta"]["ranks"] == 2, report["meta"]
    assert {row["size_bytes"] for row in report["rows"]} == {4096, 65536}, report["rows"]
    assert all(row["time_s"] > 0 for row in report["rows"]), report["rows"]
    assert "native" in {row["algorithm"] for row in report["rows"]}, report["rows"]
    assert "64KiB" in log, log  # the table on stdout reaches the %x-%j.out log


def _check_training_outputs(workdir: Path, job_name: str, job_id: str, log: str) -> None:
    """The JSONL metrics show a falling, finite loss and a validation score; a checkpoint exists."""
    metrics_path = workdir / f"{job_name}-{job_id}.jsonl"
    assert metrics_path.exists(), f"no {metrics_path.name}\n{log}"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) >= 2 and all(math.isfinite(loss) for loss in losses), records
    assert losses[-1] < losses[0], losses
    assert any("val_accuracy" in record for record in records), records
    checkpoints = list((workdir / f"ckpt-{job_id}").glob("*.h5"))
    assert checkpoints, f"no checkpoint in ckpt-{job_id}\n{log}"


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_sync_cpu_trains_and_checkpoints(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    _require_mpisgd("train")
    job_id, log = _run_job(slurm_cluster, "sync_cpu.sbatch", tmp_path, "--ntasks-per-node=2",
                           script_args=("--max-steps", "40"), EPOCHS="1", BATCH="32")
    _check_training_outputs(tmp_path, "mpisgd-sync-cpu", job_id, log)


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_downpour_trains_and_checkpoints(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    _require_mpisgd("train")
    job_id, log = _run_job(slurm_cluster, "downpour.sbatch", tmp_path, "--ntasks-per-node=3",
                           script_args=("--max-steps", "40", "--log-every", "5", *PATIENT_WORKERS),
                           SERVERS="1", EPOCHS="1", BATCH="32")
    _check_training_outputs(tmp_path, "mpisgd-downpour", job_id, log)


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_sandblaster_trains_and_checkpoints(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    _require_mpisgd("train")
    job_id, log = _run_job(slurm_cluster, "sandblaster.sbatch", tmp_path, "--ntasks-per-node=4",
                           script_args=PATIENT_WORKERS, SERVERS="1", ITERATIONS="10", PORTION="512")
    _check_training_outputs(tmp_path, "mpisgd-sandblaster", job_id, log)


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 30)  # its waits' deadlines (only a hang reaches them) and room
def test_cluster_reports_failed_and_hung_jobs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The harness itself: a failing job is FAILED, a hung one raises TimeoutError and is cancelled."""
    failing = tmp_path / "fail.sbatch"
    failing.write_text("#!/bin/bash\n#SBATCH --ntasks=1 --time=00:01:00\nexit 3\n")
    assert slurm_cluster.wait(slurm_cluster.sbatch(failing, cwd=tmp_path), timeout=JOB_TIMEOUT_S) == "FAILED"
    hanging = tmp_path / "hang.sbatch"
    hanging.write_text("#!/bin/bash\n#SBATCH --ntasks=1 --time=00:05:00\nsleep 300\n")
    job_id = slurm_cluster.sbatch(hanging, cwd=tmp_path)
    with pytest.raises(TimeoutError, match=f"job {job_id} not finished"):
        slurm_cluster.wait(job_id, timeout=3)
    assert slurm_cluster.wait(job_id, timeout=JOB_TIMEOUT_S) == "CANCELLED"


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("how", ["scancel-batch-usr1", "scancel-term"])
def test_preempted_sync_job_checkpoints_requeues_and_completes(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                              how: str) -> None:
    """A running ``sbatch --requeue`` job is signalled as Slurm does it: SIGUSR1 to the batch shell
    (what ``#SBATCH --signal=B:USR1@120`` sends before the time limit), or ``scancel --signal=TERM`` to
    every task. The ranks checkpoint and exit 75, the script requeues the job, and the second run
    resumes (``--resume auto``) and completes."""
    if how == "scancel-term" and mpi_library() == "openmpi":
        pytest.skip(MPIRUN_SIGTERM)
    _require_mpisgd("train")
    steps = 400
    job_id = slurm_cluster.sbatch(SLURM_DIR / "sync_cpu.sbatch", "--ntasks-per-node=2",
                                  script_args=("--max-steps", str(steps), "--checkpoint-every", "4"),
                                  env=_job_env(EPOCHS="100", BATCH="32"), cwd=tmp_path)
    checkpoints = tmp_path / f"ckpt-{job_id}"
    deadline = time.monotonic() + JOB_TIMEOUT_S  # the event: the job's first checkpoint exists
    while not list(checkpoints.glob("checkpoint-*.h5")):
        assert time.monotonic() < deadline, f"job {job_id} wrote no checkpoint: {slurm_cluster.job_info(job_id)}"
        time.sleep(0.2)
    if how == "scancel-batch-usr1":
        slurm_cluster.run_client("scancel", "--batch", "--signal=USR1", job_id)
    else:
        slurm_cluster.run_client("scancel", "--signal=TERM", job_id)
    state = slurm_cluster.wait(job_id, timeout=JOB_TIMEOUT_S)
    log = next(iter(tmp_path.glob(f"*-{job_id}.out"))).read_text(errors="replace")
    info = slurm_cluster.job_info(job_id)
    assert state == "COMPLETED", f"job {job_id} {state} {info.get('ExitCode')}:\n{log}"
    assert int(info.get("Restarts", "0")) >= 1, info
    assert "(preempted)" in log and "requeueing job" in log, log
    assert f"finished after {steps} steps (max_steps)" in log, log
    from mpisgd.checkpoint import load_checkpoint
    assert load_checkpoint(checkpoints / "final.h5")["extra"]["step"] == steps


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 60)
def test_preempted_sync_ps_job_checkpoints_requeues_and_completes(slurm_cluster: SlurmCluster,
                                                                   tmp_path: Path) -> None:
    """``slurm/downpour.sbatch`` with STRATEGY=sync-ps, preempted as Slurm does before the time limit
    (SIGUSR1 to the batch shell): server 0 learns it from the job board, the servers write their state,
    exit 75, the script requeues, and the second run resumes and completes exactly at --max-steps."""
    _require_mpisgd("train")
    steps = 400
    job_id = slurm_cluster.sbatch(SLURM_DIR / "downpour.sbatch", "--ntasks-per-node=3",
                                  script_args=("--max-steps", str(steps), "--checkpoint-every", "4",
                                               *PATIENT_WORKERS),
                                  env=_job_env(STRATEGY="sync-ps", EPOCHS="100", BATCH="32"), cwd=tmp_path)
    checkpoints = tmp_path / f"ckpt-{job_id}"
    deadline = time.monotonic() + JOB_TIMEOUT_S  # the event: the job's first checkpoint exists
    while not list(checkpoints.glob("checkpoint-*.h5")):
        assert time.monotonic() < deadline, f"job {job_id} wrote no checkpoint: {slurm_cluster.job_info(job_id)}"
        time.sleep(0.2)
    slurm_cluster.run_client("scancel", "--batch", "--signal=USR1", job_id)
    state = slurm_cluster.wait(job_id, timeout=JOB_TIMEOUT_S)
    log = next(iter(tmp_path.glob(f"*-{job_id}.out"))).read_text(errors="replace")
    info = slurm_cluster.job_info(job_id)
    assert state == "COMPLETED", f"job {job_id} {state} {info.get('ExitCode')}:\n{log}"
    assert int(info.get("Restarts", "0")) >= 1, info
    assert "(preempted)" in log and "requeueing job" in log and "resuming sync-ps at step" in log, log
    assert f"finished after {steps} steps (max_steps)" in log, log
    from mpisgd.checkpoint import load_checkpoint
    assert load_checkpoint(checkpoints / "final.h5")["extra"]["step"] == steps


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 60)
def test_preempted_sandblaster_job_requeues_and_continues_its_lbfgs_run(slurm_cluster: SlurmCluster,
                                                                       tmp_path: Path) -> None:
    """``slurm/sandblaster.sbatch``: the coordinator gets SIGTERM after iteration 3 (the test hook, so the
    run cannot end first), writes its L-BFGS state and exits 75; the script requeues the job, whose second
    run goes on from iteration 4 (the hook strikes at iteration 3 only) and completes."""
    _require_mpisgd("train")
    job_id, log = _run_job(slurm_cluster, "sandblaster.sbatch", tmp_path, "--ntasks-per-node=4",
                           script_args=PATIENT_WORKERS, SERVERS="1", ITERATIONS="10", PORTION="512",
                           MPISGD_TEST_SIGNAL_AT="3:SIGTERM:1")
    assert int(slurm_cluster.job_info(job_id).get("Restarts", "0")) >= 1, log
    assert "SIGTERM received after iteration 3" in log and "requeueing job" in log, log
    assert "resuming L-BFGS after iteration 3" in log, log
    from mpisgd.checkpoint import load_checkpoint
    final = load_checkpoint(tmp_path / f"ckpt-{job_id}" / "final.h5")["extra"]
    assert final["iterations"] > 3, final
