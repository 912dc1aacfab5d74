"""All-reduce through an MPI-3 shared-memory window, for communicators that live on one node.

Why: on one node, ``rhd`` and ``ring`` move every byte through MPI's shared-memory channel, which
copies it into a cell on the sender's side and out of it on the receiver's, at each of their 2 lg p
or 2(p-1) steps. Here every rank maps the same window (``MPI_Win_allocate_shared``): it writes its
vector once into its own slot, sums its 1/p block of the result straight out of every rank's slot,
and reads the whole result once. Fused buckets go further: ``DistributedOptimizer``'s gradients are
packed straight into the slot and unpacked straight from the result, so the all-reduce itself copies
nothing (measured in BENCHMARKS.md).

Synchronization is MPI's own: ``MPI_Win_sync`` + a barrier + ``MPI_Win_sync``, as the unified
memory model of shared windows asks. The barrier is always ``MPI_Ibarrier`` (a rank that yields the
CPU while waiting and one that does not must still call the same collective); two barriers per
call suffice. Two areas alternate between calls, so that a rank that finished reading a result
can write its next vector while others still read.

Every element of the result is computed by one rank (the owner of its block, summing the slots in
rank order) and read by all: results are bitwise identical on every rank.

Across nodes (``algorithm="hier"``, as Horovod's hierarchical all-reduce and NCCL's trees do): each
node sums into its own window as above, and then, before the second barrier, every rank all-reduces
its block of the node's sum with the ranks of the same local rank on the other nodes. The network
carries each node's vector once, split over all its ranks, instead of every rank's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Optional, cast

import numpy as np
from mpi4py import MPI

from mpisgd.arrays import HOST_OPS
from mpisgd.comm import objects
from mpisgd.comm.algorithms import block_bounds, wait_requests
from mpisgd.comm.watchdog import Watchdog
from mpisgd.errors import CommError

log = logging.getLogger(__name__)

#: elements reduced per pass over the slots: the partial sums stay in cache between slots
_CACHE_ELEMENTS = 16384


class SharedMemoryAllreduce:
    """Slots of ``area_bytes`` per rank and a shared result of as many bytes, each twice (two
    alternating areas).

    Collective: every rank of ``comm`` constructs it together, every call is made by all ranks
    with the same length and dtype (the communicator's mismatch check guards the public API), and
    :meth:`free` is collective too. Raises CommError on every rank when the node's shared memory
    cannot hold the window (checked on /dev/shm, where MPICH puts it) or MPI cannot allocate it.
    """

    def __init__(self, comm: MPI.Comm, area_bytes: int, *, polite: bool,
                 watchdog: Optional[Watchdog] = None, watched: Any = None) -> None:
        self.comm, self.polite = comm, polite
        # the communicator's watchdog (its barriers and the window's creation have a deadline); None: MPI_Waitall
        self.wait: Optional[Callable[[list], None]] = None if watchdog is None else watchdog.wait
        agree = watched if watched is not None else comm  # the creation's agreements (objects.Watched: watched)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.area_bytes = area_bytes - area_bytes % 8
        needed = 2 * self.area_bytes * (self.size + 1)  # every rank's slots + the result
        room = int(objects.allreduce_numbers(agree, _free_shared_memory(), "min", name="shared window: free memory")[0])
        if room < 2 * needed:  # twice: room for the MPI library's own shared memory and other jobs
            problem = shared_memory_shortage(2 * needed, room, self.area_bytes)
            if self.rank == 0:
                log.warning("%s", problem)
            raise CommError(problem)
        windows, error = [], None
        try:
            node = cast(MPI.Intracomm, comm)  # a shared-memory split: an intracommunicator
            with watchdog.blocking("shared window: create") if watchdog else contextlib.nullcontext():
                windows.append(MPI.Win.Allocate_shared(2 * self.area_bytes, 1, comm=node))
                windows.append(MPI.Win.Allocate_shared(2 * self.area_bytes if self.rank == 0 else 0, 1, comm=node))
        except MPI.Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in objects.allgather_objects(agree, error, name="shared window: allocation") if e]
        if errors:
            for win in windows:
                win.Free()
            raise CommError(f"MPI could not allocate the shared-memory window: {errors[0]}")
        self.slots_win, self.result_win = windows
        for win in windows:
            win.Lock_all(MPI.MODE_NOCHECK)
        self._memory: list[Any] = [self.slots_win.Shared_query(q)[0] for q in range(self.size)]
        self._result_memory: Any = self.result_win.Shared_query(0)[0]
        self._calls = 0
        self._views: dict = {}

    def capacity(self, dtype: str) -> int:
        """Most elements of ``dtype`` one call can reduce without copying through chunks."""
        return self.capacity_of(self.area_bytes, dtype)

    @staticmethod
    def capacity_of(area_bytes: int, dtype: str) -> int:
        """:meth:`capacity` of a window of ``area_bytes`` per slot, before it exists."""
        return (area_bytes - area_bytes % 8) // np.dtype(dtype).itemsize

    def _area(self, dtype: str) -> tuple:
        """(slots of every rank, result) of the area the next call uses, as ``dtype`` arrays."""
        key = (dtype, self._calls & 1)
        if key not in self._views:
            n = self.capacity(dtype)
            offset = (self._calls & 1) * self.area_bytes
            slots = [np.frombuffer(m, dtype=dtype, count=n, offset=offset) for m in self._memory]
            self._views[key] = (slots, np.frombuffer(self._result_memory, dtype=dtype, count=n, offset=offset))
        return self._views[key]

    def slot(self, n: int, dtype: str) -> np.ndarray:
        """This rank's input for the next :meth:`reduce`: write (or pack) the vector here."""
        return self._area(dtype)[0][self.rank][:n]

    def reduce(self, n: int, dtype: str, op: str, across=None) -> np.ndarray:
        """Reduce the first ``n`` elements of every rank's slot; returns the shared result (read-only
        by convention: valid until the call after next).

        ``across(block)``: called on this rank's block of the node's result before anyone reads it,
        to reduce it further with the other nodes in place (the hierarchical all-reduce)."""
        slots, result = self._area(dtype)
        self._calls += 1
        self._barrier()
        bounds = block_bounds(n, self.size)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        for start in range(lo, hi, _CACHE_ELEMENTS):
            end = min(start + _CACHE_ELEMENTS, hi)
            partial = result[start:end]
            np.copyto(partial, slots[0][start:end])
            for other in slots[1:]:
                HOST_OPS.reduce_(partial, other[start:end], op)
        if across is not None:
            across(result[lo:hi])
        self._barrier()
        return result[:n]

    def allreduce_(self, buf: np.ndarray, op: str, across=None) -> None:
        """Reduce a host buffer in place, through the window in pieces of at most its capacity."""
        dtype = buf.dtype.name
        step = self.capacity(dtype)
        for start in range(0, len(buf), step):
            piece = buf[start:start + step]
            np.copyto(self.slot(len(piece), dtype), piece)
            np.copyto(piece, self.reduce(len(piece), dtype, op, across))

    def _barrier(self) -> None:
        self.slots_win.Sync()
        self.result_win.Sync()
        wait_requests([self.comm.Ibarrier()], self.wait)
        self.slots_win.Sync()
        self.result_win.Sync()

    def free(self) -> None:
        """Collective (MPI_Win_free synchronizes): every rank calls it, or none."""
        self._views.clear()
        self._memory = []
        self._result_memory = None
        for win in (self.slots_win, self.result_win):
            win.Unlock_all()
            win.Free()


def shared_memory_shortage(wanted: int, free: int, area_bytes: int) -> str:
    """The message for a /dev/shm too small for the window: the sizes, and the ways out."""
    return (f"the shared-memory all-reduce window needs {wanted >> 20} MiB free in /dev/shm, and only "
            f"{free >> 20} MiB are free there (on the fullest node). Fix: give the container more "
            f"(docker run --shm-size={max(1, -(-wanted // 2**30))}g, Kubernetes: an emptyDir with medium Memory "
            f"on /dev/shm), or shrink the window (MPISGD_SHM_AREA_BYTES, now {area_bytes}), or do without it "
            "(MPISGD_SHM=0, or --algorithm rhd / ring)")


def _free_shared_memory() -> int:
    """Free bytes of /dev/shm, where MPI implementations put shared windows (unbounded if absent)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return 1 << 62
    return stat.f_bavail * stat.f_frsize
