"""Collective MPI calls that have no nonblocking form, under the collective timeout.

Splitting or duplicating a communicator (where ``MPI_Comm_idup`` cannot serve) and creating or freeing
an RMA window block inside MPI, where Python cannot act, so :mod:`mpisgd.comm.watchdog`'s nonblocking
waits cannot watch them. :func:`blocking_collective` keeps their deadline from a timer thread (mpi4py
lets go of the GIL inside them): past the timeout it says who has not arrived, where the watchdog's
arrival board can tell, and ends the job with exit code 4, since no exception can reach a thread
blocked in MPI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Optional

from mpisgd.errors import CollectiveTimeout
from mpisgd.log import flush as flush_log

if TYPE_CHECKING:
    from mpisgd.comm.watchdog import Watchdog, WatchdogSettings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def blocking_collective(what: str, watchdog: Optional[Watchdog] = None) -> Iterator[None]:
    """Run a collective MPI call that has no nonblocking form (a communicator's split or duplicate, a
    window's creation) under the collective timeout (``watchdog``'s settings, else the process's).

    The calling thread sits inside MPI, where Python cannot act, so a timer thread keeps the deadline:
    past the timeout it logs the error on this rank (naming who has not arrived where ``watchdog``'s
    board can be read, which needs MPI_THREAD_MULTIPLE, mpi4py's default), waits briefly for the other
    live ranks to give up too, and ends the job with exit code 4 (MPI_Abort; without
    MPI_THREAD_MULTIPLE this process exits and its launcher ends the others). A call that returns in
    time costs one thread's start."""
    if watchdog is not None:
        settings = watchdog.settings
    else:
        from mpisgd.comm.watchdog import WatchdogSettings
        settings = WatchdogSettings.resolve()
    if not settings.enabled:
        yield
        return
    from mpi4py import MPI

    multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
    rank = MPI.COMM_WORLD.Get_rank() if watchdog is None else watchdog.world_ranks[watchdog.rank]
    timer = threading.Timer(settings.timeout, _end_blocked_job, args=(what, rank, settings, watchdog, multiple))
    timer.daemon = True
    try:
        timer.start()
    except RuntimeError:  # Python 3.12+ starts no thread at interpreter exit (atexit frees): no deadline then
        yield
        return
    try:
        yield
    finally:
        timer.cancel()


def _end_blocked_job(what: str, rank: int, settings: WatchdogSettings, watchdog: Optional[Watchdog],
                     multiple: bool) -> None:
    """The timer of :func:`blocking_collective`, in its own thread: the call is still blocked."""
    from mpisgd.comm.watchdog import diagnose, mark_timed_out

    mark_timed_out()
    text = "which ranks are missing is unknown (a blocking MPI call)"
    if watchdog is not None and watchdog.board is not None and multiple:
        try:  # the diagnosis is a courtesy: whatever it raises, the job must still end
            now = watchdog.read_board()
            text, _ = watchdog.describe(now, None)
            suspects = set(diagnose(watchdog.sequence, watchdog.rank, now or {}, None).not_arrived)
            watchdog.await_the_others(suspects, watchdog.sequence, settings.timeout)
        except Exception as error:  # noqa: BLE001
            text = f"which ranks are missing is unknown (reading the arrival board failed: {error})"
    where = watchdog.where() if watchdog is not None else repr(what)
    logger.critical("%s: no progress for %.1f s (collective timeout %g s) on rank %d, inside a blocking MPI call "
                    "that nothing can interrupt: %s; ending the job (exit code %d)", where, settings.timeout,
                    settings.timeout, rank, text, CollectiveTimeout.exit_code)
    flush_log()
    if multiple:
        from mpisgd.comm.abort import abort_world
        abort_world(CollectiveTimeout.exit_code)
    os._exit(CollectiveTimeout.exit_code)
