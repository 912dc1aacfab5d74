"""What Sandblaster's coordinator rank, shard ranks and worker ranks say to each other, and how they wait.

All messages are point-to-point on a communicator private to the run (a Dup of the library's),
one :class:`Tag` per kind of message:

=============  ======================  =====================================================
tag            direction               body
=============  ======================  =====================================================
COMMAND        coordinator -> shard    pickled (:class:`ShardCommand`, ...): (RUN, program),
                                       (BEGIN, pass, point, before), (END, pass, gradient, then),
                                       (FINAL,), (STOP, :class:`Ending`)
REPLY          shard -> coordinator    pickled (RUN, partials) or (END, pass, missing portions,
                                       results); float64 slices of the named vectors after FINAL
ASSIGN         coordinator -> worker   pickled :class:`Assignment`; (:class:`WorkerCommand`.STOP,);
                                       then (WorkerCommand.EXIT, :class:`Ending`)
PULL           worker -> shard         int64 [pass]: "send me the point of this pass"
PARAMETERS     shard -> worker         float64 [pass, ok, slice...]; ok = 0: that pass is over
GRADIENT       worker -> shard         float64 [pass, portion, gradient slice...] (a sum)
RESULT         worker -> coordinator   float64 [pass, portion, loss sum, ok]
EXIT           rank -> coordinator     None: a worker's answer to STOP; after a run that lost a
                                       worker, every survivor's "done, abort now" at exit
SIGNAL         rank -> coordinator     int: the stop signal this rank received (once; the
                                       coordinator stops the run after the current iteration)
=============  ======================  =====================================================

"Coordinator" always means the one dedicated rank (world rank S, after the S shards) that drives
L-BFGS and schedules portions; shards and workers never coordinate anything.

Bulk data (parameters, gradients) travels as float64 buffers with the ids in front (integers below
2**53 are exact in float64), so each is one message; only small commands are pickled.

Why polling with sleeps instead of blocking receives: MPICH's blocking calls spin on the CPU. With
more ranks than cores (a laptop, CI), a spinning coordinator or shard steals the core a worker needs
to compute its portion; sleeping between probes (20 us growing to 0.25 ms, :func:`polite_backoff`,
the shared `mpisgd.comm.wait.Backoff`) hands it back. The cap is a latency/CPU trade: on 2 cores
with 4 ranks a 0.25 ms cap gave 0.04-0.065 s per pass where 1 ms gave 0.078-0.080 s (32 portions
of 256 x 512 features); an idle rank then wakes 4000 times a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Callable, NamedTuple, Optional

from mpi4py import MPI

from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.errors import CommError
from mpisgd.training import preemption

#: the sleeps between probes of every Sandblaster rank (see the module docstring for the cap)
FIRST_SLEEP_S, LONGEST_SLEEP_S = 20e-6, 250e-6

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class Tag(IntEnum):
    """The message tags of a run (its own communicator: no other component's tag can meet them)."""

    COMMAND = 101
    REPLY = 102
    ASSIGN = 103
    PULL = 104
    PARAMETERS = 105
    GRADIENT = 106
    RESULT = 107
    EXIT = 108
    SIGNAL = 109


class ShardCommand(str, Enum):
    """What the coordinator rank asks of a shard; a shard's reply starts with the command it answers.

    A ``str`` enum, so that a reply compares equal to the plain name (``ShardCommand.END == "end"``).
    """

    RUN = "run"  # run a program of vector commands, reply with its partial scalars
    BEGIN = "begin"  # a pass starts: run a program, then serve the pass's point to workers that pull it
    END = "end"  # the pass ends: once every portion is in, form the gradient and run a program
    FINAL = "final"  # send this shard's slices of the named vectors (x: the parameters), for a checkpoint
    STOP = "stop"  # the run is over; the command carries the Ending


class WorkerCommand(str, Enum):
    """What the coordinator rank tells a worker besides assignments."""

    STOP = "stop"  # no more portions: complete pending sends and acknowledge with EXIT
    EXIT = "exit"  # the run's Ending: leave the serving loop


class Assignment(NamedTuple):
    """One portion of one pass, handed by the coordinator rank to a worker."""

    pass_id: int
    portion: int
    start: int
    end: int

    def __str__(self) -> str:
        return f"pass {self.pass_id}, portion {self.portion} (rows {self.start}..{self.end - 1})"


class Ending(NamedTuple):
    """How the run ended, sent by the coordinator rank to every rank that is still there."""

    summary: Optional[dict]  # the training summary; None when the run failed
    failure: Optional[str]  # why the run failed (every rank raises it), None when it did not
    lost: list  # world ranks of the workers the run finished without


class SignalForwarder:
    """A shard or worker tells the coordinator, once, that this process received a stop signal
    (:mod:`mpisgd.training.preemption`): the coordinator then stops the whole run."""

    def __init__(self, comm: MPI.Comm, coordinator: int) -> None:
        self.comm, self.coordinator, self.sent = comm, coordinator, False

    def __call__(self) -> None:
        signum = preemption.received()
        if signum is not None and not self.sent:
            self.sent = True
            self.comm.send(int(signum), dest=self.coordinator, tag=Tag.SIGNAL)


def polite_backoff(sleep: Sleep = time.sleep) -> Backoff:
    """The shared backoff with Sandblaster's sleeps (20 us doubling to 0.25 ms)."""
    return Backoff(first=FIRST_SLEEP_S, longest=LONGEST_SLEEP_S, sleep=sleep)


def wait_for_message(comm: MPI.Comm, *, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
                     timeout: Optional[float] = None, clock: Clock = time.monotonic,
                     sleep: Sleep = time.sleep) -> Optional[MPI.Status]:
    """Probe until a matching message is there; its status, or None after ``timeout`` seconds.

    Args:
        comm: the run's communicator.
        source, tag: what to wait for (any by default).
        timeout: seconds (None: no deadline; 0: one probe).
        clock, sleep: the time source and the pause between probes; injectable for tests.
    """
    status = MPI.Status()

    def arrived() -> Optional[MPI.Status]:
        return status if comm.Iprobe(source=source, tag=tag, status=status) else None

    return wait_until(arrived, timeout=timeout, what=f"message with tag {tag}", backoff=polite_backoff(sleep),
                      clock=clock, on_timeout=lambda: None)


def receive_object(comm: MPI.Comm, *, source: int, tag: int, timeout: Optional[float] = None,
                   what: str = "a reply") -> Any:
    """The next pickled message from ``source``; CommError when none comes within ``timeout``."""
    if wait_for_message(comm, source=source, tag=tag, timeout=timeout) is None:
        raise CommError(f"rank {source} sent no {what} within {timeout:.0f} s")
    return comm.recv(source=source, tag=tag)


@dataclass(frozen=True)
class Portions:
    """The training set cut into consecutive portions of ``size`` rows (the last may be shorter).

    Contiguous rows make each portion one hyperslab read, and fixed ids make the order in which
    shards add portion gradients (id order) independent of which worker finished first.
    """

    num_samples: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.num_samples // self.size)

    def rows(self, portion: int) -> tuple[int, int]:
        """(first row, end row) of ``portion``."""
        if not 0 <= portion < self.count:
            raise IndexError(f"portion {portion} outside 0..{self.count - 1}")
        start = portion * self.size
        return start, min(start + self.size, self.num_samples)
