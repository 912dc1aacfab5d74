"""Ending a whole job with MPI_Abort without leaving MPICH's shared memory behind.

MPICH maps one node-wide file, /dev/shm/mpich_shm_<job id>_<node>, at MPI_Init and removes it at
MPI_Finalize; MPI_Abort leaves it. /dev/shm is RAM: after a day of tests that end jobs on purpose
with MPI_Abort (a dead worker, an error on one rank), this machine held 527 such files, 1.8 GB. (A
later job whose id hashed to the same name would even take the stale file for its own.) Every
rank of the job has mapped the file long before anyone aborts, so unlinking it first changes
nothing for this job.
"""

from __future__ import annotations

import os
import sys
import time

SHARED_MEMORY_DIR = "/dev/shm/"
#: between the last output and MPI_Abort: hydra's mpiexec exits as soon as it handles the abort, and
#: output still on its way from the proxy was lost in some runs (the message saying why the job ends)
OUTPUT_GRACE_S = 0.5


def mapped_mpich_files() -> list:
    """Paths of MPICH's shared-memory files that this process maps (empty where /proc is absent)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if SHARED_MEMORY_DIR + "mpich_" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith(SHARED_MEMORY_DIR) and not p.endswith("(deleted)"))


def abort_world(code: int) -> None:
    """MPI_Abort on COMM_WORLD (hydra's mpiexec then exits with ``code``), after removing the
    shared-memory files the abort would leave behind and giving this rank's output time to arrive."""
    from mpi4py import MPI

    for path in mapped_mpich_files():
        try:
            os.unlink(path)
        except OSError:  # another rank of this node was first
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(OUTPUT_GRACE_S)
    MPI.COMM_WORLD.Abort(code)
