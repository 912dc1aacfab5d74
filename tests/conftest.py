"""Top-level pytest configuration.

tests/mpi holds tests that run *inside* an MPI job (every rank runs pytest); the outer run
launches them through tests/test_mpi_suites.py under mpiexec at several sizes, each with a
timeout, and does not collect them itself.
"""

import glob
import os

import pytest
from helpers import mapped_by_some_process

INNER_MPI_RUN = os.environ.get("MPISGD_INNER_MPI_RUN") == "1"
collect_ignore = [] if INNER_MPI_RUN else ["mpi"]

MPICH_SHARED_MEMORY = "/dev/shm/mpich_*"




@pytest.fixture(autouse=True)
def no_stale_mpich_shared_memory():
    """A job killed by a test (timeouts, SIGKILLed ranks) leaves MPICH's /dev/shm/mpich_shm_* file,
    which holds RAM until removed (see mpisgd/comm/abort.py). Remove what this test's jobs left once
    no process maps it. Never inside an MPI job: there the files belong to the job running it."""
    if INNER_MPI_RUN:
        yield
        return
    before = set(glob.glob(MPICH_SHARED_MEMORY))
    yield
    for path in set(glob.glob(MPICH_SHARED_MEMORY)) - before:
        if not mapped_by_some_process(path):
            try:
                os.unlink(path)
            except OSError:
                pass
