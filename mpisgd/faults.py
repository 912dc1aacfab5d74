"""Acting on one rank of a running job from outside it, for tests and benchmarks (Linux /proc).

Stragglers and frozen workers must be made *outside* the library (a signal to the rank's process),
or the library could be told about its own slowness. A job is marked with an environment variable,
and MPICH's hydra gives every rank PMI_RANK, so /proc tells which process is which rank.
"""

from __future__ import annotations

import os
import signal
import threading
import time

MARKER_VARIABLE = "MPISGD_TEST_MARKER"


def pid_of_rank(marker: str, rank: int, timeout: float = 60.0) -> int:
    """PID of world rank ``rank`` of the job started with MPISGD_TEST_MARKER=marker in its environment."""
    wanted = {f"{MARKER_VARIABLE}={marker}".encode(), f"PMI_RANK={rank}".encode()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as file:
                    if wanted <= set(file.read().split(b"\0")):
                        return int(pid)
            except OSError:
                continue
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
