"""The one-sided MPI windows of the sharded parameter server, and what lives where in them.

Design, from measurements on the MPICH wheel (see ARCHITECTURE.md): memory comes from ``Win.Allocate``
(``Win.Create`` windows stalled workers while a server computed), and every rank opens ONE
passive-target epoch per window, ``Lock_all(MODE_NOCHECK)``, at creation and closes it at ``free()``;
each operation is completed with ``Flush``. Per-operation ``Lock``/``Unlock`` made a worker wait for a
busy server; with one epoch and shared memory it never does.

Windows (all created collectively over one duplicate of the caller's communicator; ranks that hold
nothing expose 0 bytes):

- ``params``: each server exposes its shard of the flat parameter vector (float32). Workers ``Get``
  it (Hogwild-style reads, as Downpour does: a pull may mix values from before and after an update;
  never a torn float). The server updates it in place.
- ``grads[s]``: one window per shard s (a separate window, so that MPICH's per-window shared-memory
  accumulate mutex is per shard): the accumulation buffer. Workers ``Accumulate(SUM)``; the server
  takes the sum and resets it atomically with ``Get_accumulate(REPLACE)`` of zeros. Mixing SUM and
  REPLACE goes beyond the standard's default ``accumulate_ops=same_op_no_op`` assertion; MPICH's
  default (``which_accumulate_ops=any_op``) makes them atomic with each other, and the window says so
  with the ``which_accumulate_ops`` hint. tests/e2e/test_downpour.py checks it with a stress test on
  the shared-memory path and on the network path (MPIR_CVAR_NOLOCAL=1): run it on a new MPI.
  On shared memory that atomicity is a mutex in the window: a worker frozen (SIGSTOP, a debugger)
  in the microseconds it holds it stalls that shard's other accumulates until it runs again.
- ``control``: per server, int64 counters (:class:`Counter`: VERSION, PUSHES, REJECTED, REFUSED, and
  on shard 0 CLAIMS), only ever changed with SUM and read with NO_OP, so every access is atomic
  under the standard's rules.

Every rank learns at creation how many elements each server exposes (:attr:`ParameterServerWindows.exposed`),
so that a client checks every target range against the shard's real extent before any RMA call.
- ``board``: on server 0, float64, sized by :class:`~mpisgd.downpour.board.BoardLayout`: the job board
  (header written by server 0, one row per worker written only by that worker), written with
  ``Accumulate(REPLACE)`` and read with ``Get_accumulate(NO_OP)``; what it holds is
  :mod:`mpisgd.downpour.board`'s business.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisgd.comm.blocking import blocking_collective
from mpisgd.downpour.board import BoardLayout
from mpisgd.training.layout import Roles, ShardLayout


class Counter(IntEnum):
    """Slots of each server's control counters (int64)."""

    VERSION = 0  #: updates applied to the shard
    PUSHES = 1  #: pushes received (each worker push adds one)
    REJECTED = 2  #: updates rejected because the pushed sum held NaN/Inf
    CLAIMS = 3  #: on shard 0: training steps claimed by the workers (the job's step budget is shared)
    REFUSED = 4  #: pushes a client refused to send: they would have written outside this shard


CONTROL_SLOTS = len(Counter)
VERSION, PUSHES, REJECTED, CLAIMS = Counter.VERSION, Counter.PUSHES, Counter.REJECTED, Counter.CLAIMS
REFUSED = Counter.REFUSED

#: what the board holds moved to mpisgd.downpour.board; still importable from here
_MOVED_TO_BOARD = ("TRAINING", "STOPPING", "DRAINING", "FINISHED", "RUNNING", "DONE", "FAILED", "STALENESS_BINS",
                   "STOP_REASONS")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_BOARD:
        from mpisgd.downpour import board
        return getattr(board, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _allocate(comm: MPI.Intracomm, count: int, dtype, info: dict | None = None) -> MPI.Win:
    itemsize = np.dtype(dtype).itemsize
    mpi_info = MPI.Info.Create(info) if info else MPI.INFO_NULL
    try:
        with blocking_collective("parameter server: create a window"):
            return MPI.Win.Allocate(count * itemsize, itemsize, info=mpi_info, comm=comm)
    finally:
        if info:
            mpi_info.Free()


def free_windows(windows: list) -> None:
    """Collective: end this rank's ``Lock_all`` epoch on each of ``windows``, then free them."""
    for win in windows:
        win.Unlock_all()
    with blocking_collective("parameter server: free the windows"):  # MPI_Win_free synchronizes
        for win in windows:
            win.Free()


def window_array(win: MPI.Win, dtype: type) -> np.ndarray:
    """This rank's own memory of window ``win`` as a numpy array (a view: stores need ``win.Sync()``)."""
    memory = win.tomemory()
    if not len(memory):
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(memory, dtype=dtype)  # type: ignore[call-overload]  # mpi4py's buffer has no stub


class ParameterServerWindows:
    """Create (collectively, on every rank of ``comm``) the windows of a sharded parameter server.

    Args:
        comm: all ranks of the job (servers and workers); duplicated, so its messages never mix with
            the library's others.
        roles: which ranks are servers (shard s lives on rank ``roles.servers[s]``) and workers.
        layout: how the flat parameter vector is split into shards.
        buffer_size: float model buffers per worker row of the board.

    After creation every rank holds a ``Lock_all(MODE_NOCHECK)`` epoch on every window; call
    :meth:`free` (collective) to end the epochs and free the windows.
    """

    def __init__(self, comm: MPI.Intracomm, roles: Roles, layout: ShardLayout, *,
                 buffer_size: int = 0) -> None:
        if len(roles.servers) != layout.num_shards:
            raise ValueError(f"{len(roles.servers)} servers for {layout.num_shards} shards")
        with blocking_collective("parameter server: duplicate the communicator"):
            self.comm = comm.Dup()
        self.roles, self.layout = roles, layout
        self.rank = self.comm.Get_rank()
        self.shard: int | None = roles.servers.index(self.rank) if self.rank in roles.servers else None
        self.board_layout = BoardLayout(len(roles.workers), buffer_size, num_servers=len(roles.servers))
        own = 0 if self.shard is None else layout.shard_size(self.shard)
        accumulate_info = {"which_accumulate_ops": "sum,replace,no_op", "accumulate_ordering": "none"}
        self.params = _allocate(self.comm, own, np.float32)
        self.grads = [_allocate(self.comm, own if s == self.shard else 0, np.float32, accumulate_info)
                      for s in range(layout.num_shards)]
        self.control = _allocate(self.comm, CONTROL_SLOTS if self.shard is not None else 0, np.int64,
                                 {"which_accumulate_ops": "sum,no_op"})
        self.board = _allocate(self.comm, self.board_layout.size if self.shard == 0 else 0, np.float64,
                               {"which_accumulate_ops": "replace,no_op"})
        self._windows = [self.params, *self.grads, self.control, self.board]
        with blocking_collective("parameter server: the shards' sizes"):  # what each shard really exposes
            sizes = self.comm.allgather(own)
        #: elements of the params and grads windows on the server of each shard, as that server allocated them
        self.exposed: tuple = tuple(int(sizes[rank]) for rank in roles.servers)
        for win in self._windows:
            win.Lock_all(MPI.MODE_NOCHECK)
        self._freed = False

    def server_rank(self, shard: int) -> int:
        return self.roles.servers[shard]

    @property
    def board_rank(self) -> int:
        return self.roles.servers[0]

    # ---- a server's own memory ------------------------------------------------------------------
    def local_params(self) -> np.ndarray:
        """This server's shard of the parameters: a numpy view of its window memory."""
        self._check()
        if self.shard is None:
            raise RuntimeError("only a server rank holds a shard")
        return window_array(self.params, np.float32)

    def local_board(self) -> np.ndarray:
        """Server 0's board memory (float64), for the board to initialize before any RMA access."""
        self._check()
        if self.shard != 0:
            raise RuntimeError("only server 0 holds the board")
        return window_array(self.board, np.float64)

    def sync_local(self) -> None:
        """Make local stores to window memory visible to RMA readers (MPI_Win_sync)."""
        self._check()
        self.params.Sync()

    # ---- lifetime ---------------------------------------------------------------------------------
    def free(self) -> None:
        """Collective: end every rank's epoch and free the windows. Every rank must call it, so only
        at a normal end of the job (see mpisgd.downpour.job on ending with a hung rank)."""
        if self._freed:
            return
        free_windows(self._windows)
        self.comm.Free()
        self._freed = True

    def _check(self) -> None:
        if self._freed:
            raise RuntimeError("ParameterServerWindows used after free()")
