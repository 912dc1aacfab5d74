"""The small collectives of mpisgd's own bookkeeping, under the collective watchdog: a few numbers reduced,
a Python object broadcast or gathered, a barrier.

Training code agrees on little things (the data paths, the number of classes, which checkpoint to resume
from, whether a checkpoint verified on every rank, an evaluation's counts). mpi4py's ``bcast``/``allreduce``
/``allgather`` of objects block inside MPI, where a rank waiting for a frozen peer can never time out; these
helpers run the nonblocking forms (``Iallreduce``, ``Ibcast`` of a length and then of the pickled bytes,
``Iallgather`` + ``Iallgatherv``, ``Ibarrier``) and wait through :meth:`Communicator.wait`, so each one is
named and counted in the arrival board like the all-reduces, warns after ``stall_warning`` and raises
:class:`~mpisgd.errors.CollectiveTimeout` after ``timeout``. Collectives of some ranks only (the
servers' own, through :func:`among`) are waited as point-to-point waits are: not counted in the arrival
board, named by the members not there yet. On a bare mpi4py communicator (no watchdog)
they block in ``MPI_Waitall``, as a plain MPI program does; so does a communicator with ``timeout=0``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
from mpi4py import MPI

__all__ = ["Watched", "allgather_objects", "allreduce_numbers", "among", "barrier", "bcast_object"]

#: the reductions of :func:`allreduce_numbers` (a logical or is a max of 0/1)
NUMBER_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

Wait = Callable[[list, str], None]  # Communicator.wait: enter the named collective, complete its requests


class Watched(NamedTuple):
    """Collectives on another communicator ``mpi`` waited with ``wait(requests, name)``: a Communicator's
    (``comm.wait``, for collectives that every rank of that Communicator runs at the same point, such as
    its node's), or :func:`among`'s (for those of some of its ranks only)."""

    mpi: MPI.Comm
    wait: Wait


def among(comm: Any, mpi: MPI.Comm, *, what: str) -> Watched:
    """Collectives on ``mpi``, a communicator of only some ranks of the mpisgd Communicator ``comm`` (the
    servers of a parameter-server job): waits under ``comm``'s deadline and stall warnings, as
    point-to-point waits naming ``mpi``'s other members (the ranks outside never enter these
    collectives, so the collective sequence numbers that name missing ranks do not apply)."""
    world, group = MPI.COMM_WORLD.Get_group(), mpi.Get_group()
    try:
        members = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world)
    finally:
        group.Free()
        world.Free()
    me = MPI.COMM_WORLD.Get_rank()
    peers = [int(r) for r in members if r != me]

    def wait(requests: list, name: str) -> None:
        comm.watchdog.wait_for_peers(lambda: MPI.Request.Testall(requests), what=f"{what}: {name}", peers=peers,
                                     agree=False)

    return Watched(mpi, wait)


def _endpoints(comm: Any) -> tuple[MPI.Comm, Optional[Wait]]:
    """(the MPI communicator, the watchdog's wait) of an mpisgd Communicator; (comm, None) of an mpi4py one."""
    wait = getattr(comm, "wait", None)
    mpi = getattr(comm, "mpi", None)
    if isinstance(mpi, MPI.Comm) and callable(wait):
        return mpi, wait
    if isinstance(comm, MPI.Comm):
        return comm, None
    raise TypeError(f"expected an mpisgd Communicator or an mpi4py communicator, got {type(comm).__name__}")


def _complete(requests: list, wait: Optional[Wait], name: str) -> None:
    if wait is None:
        MPI.Request.Waitall(requests)
    else:
        wait(requests, name)


def allreduce_numbers(comm: Any, values: Union[float, Sequence[float], np.ndarray], op: str = "sum", *,
                      name: str) -> np.ndarray:
    """Reduce a few numbers across ranks; returns a new 1-D array, the same values on every rank (int64
    where this rank's values are ints or bools, else float64). The reduction is in float64 on every rank
    whatever each passed (ints exact below 2**53), so ranks passing ints and floats still agree.

    Args:
        comm: an mpisgd Communicator (watched) or an mpi4py communicator (blocking).
        values: a number, or a sequence or array of them (the same length on every rank).
        op: ``"sum"``, ``"max"`` or ``"min"``.
        name: what a stall warning or a timeout calls this collective ("number of classes").
    """
    if op not in NUMBER_OPS:
        raise ValueError(f"unknown op {op!r}; valid: {', '.join(NUMBER_OPS)}")
    mpi, wait = _endpoints(comm)
    array = np.atleast_1d(np.asarray(values))
    result = np.ascontiguousarray(array, dtype=np.float64).copy()
    _complete([mpi.Iallreduce(MPI.IN_PLACE, result, op=NUMBER_OPS[op])], wait, name)
    return result.astype(np.int64) if array.dtype.kind in "biu" else result


def bcast_object(comm: Any, obj: Any = None, root: int = 0, *, name: str) -> Any:
    """Root's ``obj`` (any picklable object) on every rank: its pickled length, then its bytes."""
    mpi, wait = _endpoints(comm)
    mine = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if mpi.Get_rank() == root else b""
    length = np.array([len(mine)], dtype=np.int64)
    _complete([mpi.Ibcast(length, root=root)], wait, f"{name} (length)")
    data = np.frombuffer(mine, dtype=np.uint8).copy() if mpi.Get_rank() == root else np.empty(int(length[0]),
                                                                                             dtype=np.uint8)
    _complete([mpi.Ibcast(data, root=root)], wait, name)
    return pickle.loads(data.tobytes())


def allgather_objects(comm: Any, obj: Any, *, name: str) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: the lengths, then the bytes."""
    mpi, wait = _endpoints(comm)
    mine = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8).copy()
    lengths = np.empty(mpi.Get_size(), dtype=np.int64)
    _complete([mpi.Iallgather(np.array([len(mine)], dtype=np.int64), lengths)], wait, f"{name} (lengths)")
    counts = [int(n) for n in lengths]
    displacements = [int(d) for d in np.cumsum([0] + counts[:-1])]
    everything = np.empty(sum(counts), dtype=np.uint8)
    _complete([mpi.Iallgatherv(mine, [everything, (counts, displacements)])], wait, name)
    return [pickle.loads(everything[d:d + n].tobytes()) for d, n in zip(displacements, counts)]


def barrier(comm: Any, *, name: str = "barrier") -> None:
    """Every rank has arrived here (``Ibarrier``)."""
    mpi, wait = _endpoints(comm)
    _complete([mpi.Ibarrier()], wait, name)
