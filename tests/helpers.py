"""Shared test helpers: launching mpiexec with a timeout so a hang fails instead of blocking."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def mpiexec() -> str:
    """The mpiexec of this environment (the `mpich` wheel's), else the one on PATH."""
    local = BIN / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: install with the [mpich] extra")
    return found


def mpisgd_command() -> str:
    return str(BIN / "mpisgd")


def run_mpi(nprocs: int, args: list[str], *, timeout: float, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n nprocs args`` and return the finished process; a hang raises TimeoutExpired.

    The process group is killed on timeout so no orphan rank keeps spinning.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([mpiexec(), "-n", str(nprocs), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd or ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"mpiexec -n {nprocs} {' '.join(args)} hung for {timeout}s; output:\n{out}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
