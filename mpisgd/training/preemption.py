"""Preemption: SIGTERM, SIGUSR1 and SIGINT become a stop that every rank agrees on at a step boundary.

Slurm sends SIGTERM at the time limit and on ``scancel``, and the signal of ``#SBATCH --signal`` (e.g.
SIGUSR1) some time before; mpiexec forwards what it receives to the ranks. The handler only records the
signal: Python runs handlers between bytecodes, and a rank inside an MPI call sees it when the call
returns. The strategies then decide together (sync: :class:`StopAgreement`, one int reduced with MAX per
step, so a rank that got the signal alone stops every rank at the same step instead of leaving them in
a collective it never joins), write a checkpoint of that step and return ``stopped="preempted"``; the
``mpisgd`` command then exits with :data:`EXIT_PREEMPTED`, and the same command with ``--resume auto``
continues the job.

A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt as usual.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional, TypeVar, cast

import numpy as np

logger = logging.getLogger(__name__)

#: exit status of ``mpisgd train`` that stopped on a signal after writing its checkpoint: EX_TEMPFAIL of
#: sysexits.h ("try again later"), distinct from 128 + signal, which means the process was killed
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED = "preempted"  # the ``stopped`` reason of a summary

_received: Optional[int] = None
_previous: dict[int, Any] = {}


def _record(signum: int, frame: Any) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        raise KeyboardInterrupt
    _received = signum


def install_signal_handlers() -> bool:
    """Catch :data:`STOP_SIGNALS` in this process (main thread only; elsewhere it does nothing and
    returns False). The ``mpisgd`` command calls it first thing; the trainers call it for the Python API
    (:func:`handling_signals`)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in STOP_SIGNALS:
        previous = signal.signal(signum, _record)
        if previous is not _record:
            _previous[signum] = previous
    return True


def restore_signal_handlers() -> None:
    """Put back the handlers :func:`install_signal_handlers` replaced."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous.items()):
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        del _previous[signum]


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Within the block the stop signals are caught (if nobody caught them already); restored after."""
    ours = signal.getsignal(signal.SIGTERM) is not _record and install_signal_handlers()
    try:
        yield
    finally:
        if ours:
            restore_signal_handlers()


def received() -> Optional[int]:
    """The stop signal this process received, or None."""
    return _received


def clear() -> None:
    """Forget a received signal (tests; a job that has handled its stop)."""
    global _received
    _received = None


def signal_name(signum: Optional[int]) -> str:
    try:
        return signal.Signals(signum).name if signum else "no signal"
    except ValueError:
        return f"signal {signum}"


class StopAgreement:
    """Every rank of ``comm`` learns at the same step whether any rank received a stop signal.

    Call :meth:`start` at the beginning of each step and :meth:`finish` at its end: one int is reduced
    with MAX by a nonblocking all-reduce that overlaps the step's own work, so it costs a few microseconds
    and never a deadlock: every rank calls it once per step, whether or not it got a signal.
    """

    def __init__(self, comm: Any, *, wait: Any = None) -> None:
        from mpi4py import MPI

        self.comm, self._max = comm, MPI.MAX
        self._wait = wait  # the communicator's collective watchdog (Communicator.watchdog.wait), if given
        self._mine = np.zeros(1, dtype=np.int64)
        self._any = np.zeros(1, dtype=np.int64)
        self._request: Any = None

    def start(self) -> None:
        self._mine[0] = _received or 0
        self._request = self.comm.Iallreduce(self._mine, self._any, op=self._max)

    def finish(self) -> Optional[int]:
        """The (largest) signal number any rank had received at :meth:`start`, or None."""
        from mpisgd.comm.wait import Backoff, wait_until

        request, self._request = self._request, None
        if self._wait is not None:
            self._wait([request])
        else:
            wait_until(request.Test, what="the ranks' stop flags", backoff=Backoff(spin=True))
        return int(self._any[0]) or None

    def cancel(self) -> None:
        """Complete an outstanding reduction (the loop ended for another reason); not after a collective
        timed out, when the ranks it waits for may never come (the job is ending anyway)."""
        from mpisgd.comm.watchdog import timed_out

        if self._request is not None and not timed_out():
            self.finish()


F = TypeVar("F", bound=Callable[..., Any])


def catching_stop_signals(train: F) -> F:
    """Decorator of a strategy's entry point: the stop signals are caught while it runs (the Python API
    gets what the ``mpisgd`` command does)."""
    @functools.wraps(train)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with handling_signals():
            return train(*args, **kwargs)
    return cast(F, wrapper)
