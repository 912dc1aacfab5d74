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
    FREEZE = "freeze"  # SIGSTOP itself: a hung process that nothing continues (the collective watchdog's case)
    SLOW = "slow"  # sleep ``seconds`` at this step and every later one: a straggler that always arrives


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
        if self.action is FaultAction.SLOW and step >= self.step:
            logger.info("test fault: slow rank, sleeping %s s at step %d", self.seconds, step)
            time.sleep(self.seconds)
            return False
        if step != self.step:
            return False
        if self.action is FaultAction.FREEZE:
            logger.warning("test fault: freezing (SIGSTOP) at step %d", step)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.action is FaultAction.EXIT:
            logger.warning("test fault: leaving the training loop at step %d", step)
            return True
        if self.action is FaultAction.SLEEP:
            logger.warning("test fault: sleeping %s s at step %d without entering MPI", self.seconds, step)
            time.sleep(self.seconds)
        if self.action is FaultAction.RAISE:
            raise RuntimeError(f"test fault at step {step}")
        return False


def parse_worker_fault(spec: str, rank: int, variable: str = WORKER_FAULT_VARIABLE) -> Optional[WorkerFault]:
    """The fault ``spec`` (``rank:step:action[:seconds]``) sets for world rank ``rank``, or None.

    Raises:
        SharedConfigError: a malformed spec (every rank parses the same environment, so all raise it).
    """
    parts = spec.split(":")
    try:
        fault_rank, step, action = int(parts[0]), int(parts[1]), parts[2]
        seconds = float(parts[3]) if len(parts) > 3 else 0.0
    except (IndexError, ValueError):
        raise SharedConfigError(f"{variable} must be rank:step:action[:seconds], got {spec!r}") from None
    try:
        fault_action = FaultAction(action)
    except ValueError:
        raise SharedConfigError(f"{variable}: action must be one of {', '.join(a.value for a in FaultAction)}, "
                                f"got {action!r}") from None
    return WorkerFault(step, fault_action, seconds) if fault_rank == rank else None


def worker_fault(rank: int) -> Optional[WorkerFault]:
    """This rank's test-only fault from ``MPISGD_TEST_WORKER_FAULT``, or None (unset, or another rank's).
    Call it on every rank, so that a malformed value fails on all of them together."""
    spec = environment.read(WORKER_FAULT_VARIABLE)
    return parse_worker_fault(str(spec), rank) if spec else None


SYNC_FAULT_VARIABLE = "MPISGD_TEST_SYNC_FAULT"


def sync_fault(rank: int) -> Optional[WorkerFault]:
    """World rank ``rank``'s fault in ``DistributedOptimizer.step`` (``MPISGD_TEST_SYNC_FAULT=rank:step:action
    [:seconds]``, struck before the step's gradient all-reduce), or None. Call it on every rank."""
    spec = environment.read(SYNC_FAULT_VARIABLE)
    return parse_worker_fault(str(spec), rank, SYNC_FAULT_VARIABLE) if spec else None


MODEL_PARALLEL_FAULT_VARIABLE = "MPISGD_TEST_MODEL_PARALLEL_FAULT"


def model_parallel_fault(rank: int) -> Optional[WorkerFault]:
    """World rank ``rank``'s fault in model-parallel training (``MPISGD_TEST_MODEL_PARALLEL_FAULT=rank:step:
    action[:seconds]``, struck before the step's pipeline runs: a frozen stage), or None. Call it on every rank."""
    spec = environment.read(MODEL_PARALLEL_FAULT_VARIABLE)
    return parse_worker_fault(str(spec), rank, MODEL_PARALLEL_FAULT_VARIABLE) if spec else None


_hook_calls: dict = {}  # variable -> how many times this process has passed its hook


def _strike_at_call(variable: str, rank: int) -> None:
    """Strike ``variable``'s fault (``rank:n:action[:seconds]``) at this process's n-th pass through its
    hook (from 0; the strike's log line calls it a step)."""
    number = _hook_calls.get(variable, 0)
    _hook_calls[variable] = number + 1
    spec = environment.read(variable)
    fault = parse_worker_fault(str(spec), rank, variable) if spec else None
    if fault is not None:
        fault.strike(number)


EVALUATION_FAULT_VARIABLE = "MPISGD_TEST_EVALUATION_FAULT"


def evaluation_started(rank: int) -> None:
    """Hook at the start of every evaluation of world rank ``rank`` (call it on every rank): strikes
    ``MPISGD_TEST_EVALUATION_FAULT=rank:n:action[:seconds]`` at this process's evaluation number n."""
    _strike_at_call(EVALUATION_FAULT_VARIABLE, rank)


SHARD_GATHER_FAULT_VARIABLE = "MPISGD_TEST_SHARD_GATHER_FAULT"


def shard_gather_started(rank: int) -> None:
    """Hook as a parameter server (world rank ``rank``) starts gathering the shards for a checkpoint or
    the job's end: strikes ``MPISGD_TEST_SHARD_GATHER_FAULT=rank:n:action[:seconds]`` at its gather number n."""
    _strike_at_call(SHARD_GATHER_FAULT_VARIABLE, rank)


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


CHECKPOINT_FAULT_VARIABLE = "MPISGD_TEST_CHECKPOINT_FAULT"


class WriteStage(Enum):
    """The stages of a checkpoint write (:func:`mpisgd.checkpoint.save_checkpoint`), in order."""

    DURING_WRITE = "during-write"  # the first section is in the temporary file, the others are not
    AFTER_TEMP_WRITE = "after-temp-write"  # the HDF5 part is complete, the checksum header not yet written
    AFTER_CHECKSUM = "after-checksum"  # the header is written, nothing fsynced
    AFTER_FSYNC = "after-fsync"  # the temporary file is on disk, not yet renamed
    AFTER_RENAME = "after-rename"  # renamed over the target, the directory not yet fsynced
    AFTER_DIRECTORY_FSYNC = "after-directory-fsync"  # the write is complete


class CheckpointFault:
    """Kill this process with SIGKILL at one stage of its n-th checkpoint write
    (``MPISGD_TEST_CHECKPOINT_FAULT=stage[:n]``, n from 1, default 1): what a node failure or ``kill -9``
    does, so tests can show that every stage leaves a loadable checkpoint behind."""

    def __init__(self, stage: WriteStage, write: int) -> None:
        self.stage, self.write, self.writes = stage, write, 0

    def begin_write(self) -> None:
        self.writes += 1

    def strike(self, stage: WriteStage) -> None:
        if stage is self.stage and self.writes == self.write:
            logger.warning("test fault: SIGKILL at %s of checkpoint write %d", stage.value, self.writes)
            os.kill(os.getpid(), signal.SIGKILL)


_checkpoint_fault: Optional[tuple[str, Optional[CheckpointFault]]] = None


def checkpoint_fault() -> Optional[CheckpointFault]:
    """This process's checkpoint fault, or None; one object per value of the variable (it counts writes)."""
    global _checkpoint_fault
    spec = str(environment.read(CHECKPOINT_FAULT_VARIABLE) or "")
    if _checkpoint_fault is not None and _checkpoint_fault[0] == spec:
        return _checkpoint_fault[1]
    fault = None
    if spec:
        stage, _, count = spec.partition(":")
        try:
            fault = CheckpointFault(WriteStage(stage), int(count or 1))
        except ValueError:
            raise SharedConfigError(f"{CHECKPOINT_FAULT_VARIABLE} must be stage[:n] with stage one of "
                                    f"{', '.join(s.value for s in WriteStage)}, got {spec!r}") from None
    _checkpoint_fault = (spec, fault)
    return fault


SIGNAL_AT_VARIABLE = "MPISGD_TEST_SIGNAL_AT"


@dataclass(frozen=True)
class SignalAtStep:
    """A rank sends itself ``signal`` right after training step ``step`` (``MPISGD_TEST_SIGNAL_AT=
    step:SIGTERM[:rank,rank...]``, default every rank): a preemption at a known step, so the test of the
    agreed stop does not depend on timing."""

    step: int
    signum: int

    def strike(self, step: int) -> None:
        if step == self.step:
            logger.warning("test fault: sending %s to this rank after step %d", signal.Signals(self.signum).name,
                           step)
            os.kill(os.getpid(), self.signum)


def signal_at_step(rank: int) -> Optional[SignalAtStep]:
    """This rank's :class:`SignalAtStep` from ``MPISGD_TEST_SIGNAL_AT``, or None. Call it on every rank."""
    spec = str(environment.read(SIGNAL_AT_VARIABLE) or "")
    if not spec:
        return None
    parts = spec.split(":")
    try:
        step, signum = int(parts[0]), int(signal.Signals[parts[1]])
        ranks = [int(r) for r in parts[2].split(",")] if len(parts) > 2 else None
    except (IndexError, KeyError, ValueError):
        raise SharedConfigError(f"{SIGNAL_AT_VARIABLE} must be step:SIGNAME[:rank,...], got {spec!r}") from None
    return SignalAtStep(step, signum) if ranks is None or rank in ranks else None
