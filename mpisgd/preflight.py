"""Checks of the launch made before any collective: does MPI see the ranks the launcher started?

Why: when mpi4py is linked to another MPI than the launcher's (an MPICH wheel under Open MPI's
``mpirun``, or the reverse), or Slurm's ``srun`` runs without a PMI plugin MPI understands
(``srun`` without ``--mpi=pmi2``/``pmix``), every task starts as an independent one-rank job: N copies
train the same model alone, write the same files and never talk. Nothing fails, so the mistake is found
hours later. The launcher's own variables say how many tasks it started; MPI saying 1 rank while the
launcher says several is that mistake, reported on every task before anything else happens.

The other checks of the environment live with what they guard: /dev/shm's free space in
:mod:`mpisgd.comm.shm` (before the shared window is allocated), GPUs per node in
:func:`mpisgd.devices.select_device`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Optional

from mpisgd import environment
from mpisgd.errors import ConfigError

log = logging.getLogger(__name__)

#: variables a launcher sets in each task it starts, with the number of tasks of the step (who sets them)
STEP_SIZE_VARIABLES = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun/prterun"),
    ("PMI_SIZE", "a PMI launcher (MPICH's hydra mpiexec, srun --mpi=pmi2)"),
    ("PMIX_SIZE", "a PMIx launcher"),
    ("SLURM_STEP_NUM_TASKS", "Slurm's srun"),
)
#: set for the whole allocation, also in the batch script itself, where one process is often meant
ALLOCATION_SIZE_VARIABLE = "SLURM_NTASKS"
OVERRIDE = "MPISGD_ALLOW_SINGLETON"


def _count(environ: Mapping[str, str], name: str) -> Optional[int]:
    try:
        return int(environ.get(name, "").strip())
    except ValueError:
        return None


def launched_tasks(environ: Optional[Mapping[str, str]] = None) -> int:
    """Tasks an MPI launcher started, from its own variables (MPI need not be started), else 1."""
    environ = os.environ if environ is None else environ
    counts = [_count(environ, name) for name, _ in STEP_SIZE_VARIABLES[:3]]
    return max([c for c in counts if c is not None] or [1])


def launcher_mismatch(mpi_size: int, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """What is wrong when MPI sees one rank but the launcher started several tasks, else None.

    Args:
        mpi_size: ranks in MPI_COMM_WORLD.
        environ: the environment (default: this process's).
    """
    environ = os.environ if environ is None else environ
    if mpi_size != 1:
        return None
    if any(_count(environ, name) == 1 for name, _ in STEP_SIZE_VARIABLES[:3]):
        return None  # an MPI launcher said 1 itself (`mpiexec -n 1` inside a bigger Slurm step)
    for name, launcher in STEP_SIZE_VARIABLES:
        tasks = _count(environ, name)
        if tasks is not None and tasks > 1:
            return (f"{name}={tasks}: {launcher} started {tasks} tasks, but MPI sees 1 rank in this one, so "
                    f"each task would train alone. mpi4py is probably linked to another MPI library than the "
                    f"launcher's (check `python -m mpi4py --mpi-lib-version` against `mpiexec --version`), or "
                    f"srun lacks --mpi=pmi2 (or pmix). Set {OVERRIDE}=1 to run independent one-rank jobs anyway.")
    return None


def check_launch(mpi_size: int, environ: Optional[Mapping[str, str]] = None) -> None:
    """Raise ConfigError on a launcher/MPI mismatch (unless MPISGD_ALLOW_SINGLETON=1); warn when a Slurm
    allocation of several tasks runs one process outside srun (a batch script that forgot srun)."""
    environ = os.environ if environ is None else environ
    if environment.read(OVERRIDE, False):
        return
    problem = launcher_mismatch(mpi_size, environ)
    if problem:
        raise ConfigError(problem)
    tasks = _count(environ, ALLOCATION_SIZE_VARIABLE)
    if mpi_size == 1 and tasks is not None and tasks > 1:
        log.warning("%s=%d but this job runs 1 MPI rank: launch it with srun (or mpiexec) to use the %d tasks "
                    "of the allocation; %s=1 silences this", ALLOCATION_SIZE_VARIABLE, tasks, tasks, OVERRIDE)
