"""Process sets: subsets of the Horovod processes that run collectives together (Horovod >= 0.23).

Ranks given to a ProcessSet are global Horovod ranks; ``rank()`` is relative to the set; roots of
broadcasts stay global ranks, as in Horovod. Each set a process belongs to gets its own mpisgd
Communicator (a duplicate of the set's MPI communicator), so that its reductions run on mpisgd's
algorithms; registering and removing sets is collective over all Horovod processes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from mpi4py import MPI

from mpisgd.comm import AllreduceConfig, Communicator
from mpisgd.comm.blocking import blocking_collective


class ProcessSet:
    """A set of Horovod processes, from a list of global ranks or an mpi4py communicator.

    Pass it to ``hvd.init(process_sets=[...])`` or ``hvd.add_process_set``; once registered it has a
    ``process_set_id`` and ``size()``/``rank()``/``included()`` answer (None before).
    """

    def __init__(self, ranks_or_comm: Union[Sequence[int], MPI.Comm]) -> None:
        self.process_set_id: Optional[int] = None
        self.mpi_comm: Optional[MPI.Comm] = None
        self.ranks: Optional[list] = None
        if isinstance(ranks_or_comm, MPI.Comm):
            self.mpi_comm = ranks_or_comm
        else:
            ranks = list(ranks_or_comm)
            if any(not isinstance(r, int) for r in ranks):
                raise ValueError("ProcessSet should be initialized with a list of process ranks or an mpi4py "
                                 "Comm object")
            self.ranks = sorted(ranks)

    def attach(self, process_set_id: Optional[int], ranks: Optional[tuple]) -> None:
        self.process_set_id = process_set_id
        if ranks is not None:
            self.ranks = list(ranks)

    def size(self) -> Optional[int]:
        """Number of processes in the set (None if not registered)."""
        return None if self.process_set_id is None or self.ranks is None else len(self.ranks)

    def rank(self) -> Optional[int]:
        """This process's rank within the set, -1 if it is not a member (None if not registered)."""
        if self.process_set_id is None or self.ranks is None:
            return None
        from mpisgd.horovod.torch.basics import rank

        me = rank()
        return self.ranks.index(me) if me in self.ranks else -1

    def included(self) -> Optional[bool]:
        """Whether this process belongs to the set (None if not registered)."""
        position = self.rank()
        return None if position is None else position >= 0

    def __str__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks}, mpi_comm={self.mpi_comm})"

    __repr__ = __str__


global_process_set = ProcessSet([])


def add_process_set(process_set: Union[ProcessSet, Sequence[int]]) -> ProcessSet:
    """Register a process set (collective: every Horovod process calls it, members or not) and return it."""
    from mpisgd.horovod.torch.basics import runtime

    return runtime().process_sets.add(process_set)


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a process set (collective); False for the global set or one not registered."""
    from mpisgd.horovod.torch.basics import runtime

    return runtime().process_sets.remove(process_set)


@dataclass
class RegisteredSet:
    """What this process holds for one registered set."""

    process_set_id: int
    ranks: tuple
    communicator: Optional[Communicator]  # None where this process is not a member

    def relative_rank(self, global_rank: int) -> int:
        return self.ranks.index(global_rank)


NO_CHECK = AllreduceConfig(check_collectives=False)  # the negotiation checks every operation already


class ProcessSetTable:
    """Registered process sets by id; 0 is the global set."""

    def __init__(self, communicator: Communicator) -> None:
        self.rank, self.size = communicator.rank, communicator.size
        with communicator.watchdog.blocking("horovod init: duplicate the communicator for process sets"):
            self._control = communicator.mpi.Dup()  # set creation's own messages, apart from the coordinator's
        self._lock = threading.Lock()
        self._sets = {0: RegisteredSet(0, tuple(range(self.size)), Communicator(communicator.mpi, config=NO_CHECK))}
        self._next_id = 1

    def get(self, process_set_id: int) -> RegisteredSet:
        with self._lock:
            found = self._sets.get(process_set_id)
        if found is None:
            raise ValueError(f"process set {process_set_id} is not registered (removed, or never added)")
        return found

    def resolve(self, process_set: Any) -> RegisteredSet:
        """The registered set of a ProcessSet argument."""
        if not isinstance(process_set, ProcessSet):
            raise ValueError(f"process_set must be a ProcessSet, got {type(process_set).__name__}")
        if process_set.process_set_id is None:
            raise ValueError(f"{process_set} has not been registered: pass it to hvd.init(process_sets=...) or "
                             "hvd.add_process_set()")
        return self.get(process_set.process_set_id)

    def _ranks_of(self, process_set: ProcessSet) -> tuple:
        """The set's global ranks, agreed by every process (a communicator is known to its members only)."""
        mine = None
        if process_set.mpi_comm is not None and process_set.mpi_comm != MPI.COMM_NULL:
            group = process_set.mpi_comm.Get_group()
            mine = tuple(sorted(MPI.Group.Translate_ranks(group, list(range(group.Get_size())),
                                                          self._control.Get_group())))
        elif process_set.ranks is not None:
            mine = tuple(process_set.ranks)
        everyone = self._control.allgather(mine)
        candidates = [r for r in everyone if r is not None]
        return mine if mine is not None else candidates[0]

    def add(self, process_set: Union[ProcessSet, Sequence[int]]) -> ProcessSet:
        """Register a set (collective over every Horovod process); an equal registered set is reused,
        as Horovod does."""
        if not isinstance(process_set, ProcessSet):
            process_set = ProcessSet(process_set)
        ranks = self._ranks_of(process_set)
        if not ranks or any(r < 0 or r >= self.size for r in ranks) or len(set(ranks)) != len(ranks):
            raise ValueError(f"process set ranks must be distinct ranks in 0..{self.size - 1}, got {list(ranks)}")
        with self._lock:
            existing = [s for s in self._sets.values() if s.ranks == ranks]
        if existing:
            process_set.attach(existing[0].process_set_id, ranks)
            return process_set
        member = self.rank in ranks
        with blocking_collective("horovod add_process_set: split the ranks"):
            sub = self._control.Split(0 if member else MPI.UNDEFINED, key=self.rank)
        communicator = Communicator(sub, config=NO_CHECK) if member else None
        if member:
            sub.Free()
        with self._lock:
            process_set_id = self._next_id
            self._next_id += 1
            self._sets[process_set_id] = RegisteredSet(process_set_id, ranks, communicator)
        process_set.attach(process_set_id, ranks)
        return process_set

    def remove(self, process_set: ProcessSet) -> bool:
        """Unregister a set (collective); the global set cannot be removed."""
        process_set_id = process_set.process_set_id
        if process_set_id in (None, 0):
            return False
        with self._lock:
            registered = self._sets.pop(process_set_id, None)
        self._control.Barrier()  # no member frees its communicator while another still reduces on it
        if registered is None:
            return False
        if registered.communicator is not None:
            registered.communicator.free()
        process_set.attach(None, None)
        return True

    def free(self) -> None:
        with self._lock:
            registered, self._sets = list(self._sets.values()), {}
        for entry in registered:
            if entry.communicator is not None:
                entry.communicator.free()
        if not MPI.Is_finalized():
            self._control.Free()
