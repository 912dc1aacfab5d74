"""Faults for tests and benchmarks: acting on one rank of a running job from outside it (Linux /proc),
and the test-only fault hooks inside the library (the one place that defines and parses them).

Stragglers and frozen workers must be made *outside* the library (a signal to the rank's process),
or the library could be told about its own slowness. A job is marked with an environment variable,
and the launcher gives every rank its rank in the environment (MPICH's hydra: PMI_RANK; Open MPI:
OMPI_COMM_WORLD_RANK; PMIx launchers: PMIX_RANK), so /proc tells which process is which rank.

What needs code at a given step of a Downpour worker (leaving its loop, a NaN gradient, raising, sleeping
without entering MPI) is :class:`WorkerFault`, read from
``MPISGD_TEST_WORKER_FAULT=rank:step:action[:seconds]``; the worker loop only calls its two hooks.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from mpisgd import environment
from mpisgd.errors import SharedConfigError

logger = logging.getLogger(__name__)

MARKER_VARIABLE = "MPISGD_TEST_MARKER"
WORKER_FAULT_VARIABLE = "MPISGD_TEST_WORKER_FAULT"
#: where launchers put a process's world rank: MPICH (hydra, PMI), Open MPI, PMIx launchers
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def pid_of_rank(marker: str, rank: int, timeout: float = 60.0) -> int:
    """PID of world rank ``rank`` of the job started with MPISGD_TEST_MARKER=marker in its environment,
    found by any launcher's rank variable (:data:`RANK_VARIABLES`); RuntimeError after ``timeout`` s.

    Its poll loop is its own, not :func:`mpisgd.comm.wait.wait_until`: it runs in the process that
    launches the job (a test, a benchmark driver), which must not initialize MPI, and importing
    ``mpisgd.comm`` imports mpi4py's MPI module, which does.
    """
    mark = f"{MARKER_VARIABLE}={marker}".encode()
    ranks = {f"{name}={rank}".encode() for name in RANK_VARIABLES}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as file:
                    variables = set(file.read().split(b"\0"))
            except OSError:
                continue
            if mark in variables and variables & ranks:
                return int(pid)
        time.sleep(0.05)
    raise RuntimeError(f"rank {rank} of the job marked {marker} not found")


def duty_cycle(pid: int, stop: threading.Event, *, stopped_s: float, running_s: float) -> None:
    """Slow process ``pid`` down: SIGSTOP for ``stopped_s``, SIGCONT for ``running_s``, until ``stop``
    is set or the process is gone; it is left running. (stopped 3 parts of 4: 4x slower)"""
    try:
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stopped_s)
            os.kill(pid, signal.SIGCONT)
            time.sleep(running_s)
    except ProcessLookupError:
        return
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class FaultAction(Enum):
    """What a :class:`WorkerFault` does at its step."""

    EXIT = "exit"  # leave the training loop (as if the worker's data ran out)
    SLEEP = "sleep"  # sleep without entering MPI: a worker hung in its own code
    RAISE = "raise"  # raise an exception in the training loop
    NAN = "nan"  # compute a NaN gradient


@dataclass(frozen=True)
class WorkerFault:
    """A test-only fault of one worker at one of its training steps (``MPISGD_TEST_WORKER_FAULT``)."""

    step: int
    action: FaultAction
    seconds: float = 0.0

    def corrupts_gradient(self, step: int) -> bool:
        """Hook after the gradient of ``step`` is computed: True where it must become NaN."""
        return self.action is FaultAction.NAN and step == self.step

    def strike(self, step: int) -> bool:
        """Hook after the worker reported ``step``: act; returns True where the worker leaves its loop."""
        if step != self.step:
            return False
        if self.action is FaultAction.EXIT:
            logger.warning("test fault: leaving the training loop at step %d", step)
            return True
        if self.action is FaultAction.SLEEP:
            logger.warning("test fault: sleeping %s s at step %d without entering MPI", self.seconds, step)
            time.sleep(self.seconds)
        if self.action is FaultAction.RAISE:
            raise RuntimeError(f"test fault at step {step}")
        return False


def parse_worker_fault(spec: str, rank: int) -> Optional[WorkerFault]:
    """The fault ``spec`` (``rank:step:action[:seconds]``) sets for world rank ``rank``, or None.

    Raises:
        SharedConfigError: a malformed spec (every rank parses the same environment, so all raise it).
    """
    parts = spec.split(":")
    try:
        fault_rank, step, action = int(parts[0]), int(parts[1]), parts[2]
        seconds = float(parts[3]) if len(parts) > 3 else 0.0
    except (IndexError, ValueError):
        raise SharedConfigError(f"{WORKER_FAULT_VARIABLE} must be rank:step:action[:seconds], "
                                f"got {spec!r}") from None
    try:
        fault_action = FaultAction(action)
    except ValueError:
        raise SharedConfigError(f"{WORKER_FAULT_VARIABLE}: action must be exit, sleep, raise or nan, "
                                f"got {action!r}") from None
    return WorkerFault(step, fault_action, seconds) if fault_rank == rank else None


def worker_fault(rank: int) -> Optional[WorkerFault]:
    """This rank's test-only fault from ``MPISGD_TEST_WORKER_FAULT``, or None (unset, or another rank's).
    Call it on every rank, so that a malformed value fails on all of them together."""
    spec = environment.read(WORKER_FAULT_VARIABLE)
    return parse_worker_fault(str(spec), rank) if spec else None


SANDBLASTER_FAULT_VARIABLE = "MPISGD_SANDBLASTER_FAULT"


class PortionFault(Enum):
    """What a Sandblaster worker does after computing its n-th portion (``MPISGD_SANDBLASTER_FAULT``)."""

    EXIT = "exit"  # leave the job with os._exit(3) before reporting it: a process exit, not a signal
    FREEZE = "freeze"  # SIGSTOP itself before reporting it: a hung process that nothing continues
    STRAGGLE = "straggle"  # from then on hold each portion until its pass is over: every backup copy wins


def sandblaster_fault(rank: int) -> Optional[tuple[int, PortionFault]]:
    """(n, action) of ``MPISGD_SANDBLASTER_FAULT=rank:n:action`` for world rank ``rank``, or None.
    Call it on every rank, so that a malformed value fails on all of them together."""
    spec = str(environment.read(SANDBLASTER_FAULT_VARIABLE) or "")
    if not spec:
        return None
    try:
        target, portion, action = spec.split(":")
        fault_rank, count, fault = int(target), int(portion), PortionFault(action)
    except ValueError:
        raise SharedConfigError(f"{SANDBLASTER_FAULT_VARIABLE} must be rank:portion:exit|freeze|straggle, "
                                f"got {spec!r}") from None
    return (count, fault) if fault_rank == rank else None
