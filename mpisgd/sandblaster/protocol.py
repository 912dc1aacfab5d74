"""What Sandblaster's coordinator, shards and workers say to each other, and how they wait.

All messages are point-to-point on a communicator private to the run (a Dup of the library's),
one tag per kind of message:

=============  ======================  =====================================================
tag            direction               body
=============  ======================  =====================================================
COMMAND        coordinator -> shard    pickled tuple: ("run", program), ("begin", pass, point,
                                       before), ("end", pass, gradient, then), ("final",),
                                       ("stop", summary, failure, lost workers)
REPLY          shard -> coordinator    pickled ("run", partials) or ("end", pass, missing portions,
                                       results); float64 slice of x after "final"
ASSIGN         coordinator -> worker   pickled (pass, portion, first row, end row); ("stop",); then
                                       ("exit", summary, failure, lost workers)
PULL           worker -> shard         int64 [pass]: "send me the point of this pass"
PARAMETERS     shard -> worker         float64 [pass, ok, slice...]; ok = 0: that pass is over
GRADIENT       worker -> shard         float64 [pass, portion, gradient slice...] (a sum)
RESULT         worker -> coordinator   float64 [pass, portion, loss sum, ok]
EXIT           rank -> coordinator     None: a worker's answer to "stop"; after a run that lost a
                                       worker, every survivor's "done, abort now" at exit
=============  ======================  =====================================================

Bulk data (parameters, gradients) travels as float64 buffers with the ids in front (integers below
2**53 are exact in float64), so each is one message; only small commands are pickled.

Why polling with sleeps instead of blocking receives: MPICH's blocking calls spin on the CPU. With
more ranks than cores (a laptop, CI), a spinning coordinator or shard steals the core a worker needs
to compute its portion; sleeping between probes (20 us growing to 0.25 ms) hands it back. The cap
is a latency/CPU trade: on 2 cores with 4 ranks a 0.25 ms cap gave 0.04-0.065 s per pass where 1 ms
gave 0.078-0.080 s (32 portions of 256 x 512 features); an idle rank then wakes 4000 times a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mpi4py import MPI

from mpisgd.errors import CommError

COMMAND, REPLY, ASSIGN, PULL, PARAMETERS, GRADIENT, RESULT, EXIT = range(101, 109)

_FIRST_SLEEP, _LONGEST_SLEEP = 20e-6, 250e-6


def wait_for_message(comm: MPI.Comm, *, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
                     timeout: float | None = None) -> MPI.Status | None:
    """Probe until a matching message is there; its status, or None after ``timeout`` seconds."""
    status = MPI.Status()
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _FIRST_SLEEP
    while not comm.Iprobe(source=source, tag=tag, status=status):
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(2 * pause, _LONGEST_SLEEP)
    return status


def receive_object(comm: MPI.Comm, *, source: int, tag: int, timeout: float | None = None,
                   what: str = "a reply"):
    """The next pickled message from ``source``; CommError when none comes within ``timeout``."""
    status = wait_for_message(comm, source=source, tag=tag, timeout=timeout)
    if status is None:
        raise CommError(f"rank {source} sent no {what} within {timeout:.0f} s")
    return comm.recv(source=source, tag=tag)


class Backoff:
    """Sleep after an idle poll, a little longer each time, reset as soon as work arrives."""

    def __init__(self):
        self.pause = _FIRST_SLEEP

    def idle(self) -> None:
        time.sleep(self.pause)
        self.pause = min(2 * self.pause, _LONGEST_SLEEP)

    def busy(self) -> None:
        self.pause = _FIRST_SLEEP


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

    def rows(self, portion: int) -> tuple:
        """(first row, end row) of ``portion``."""
        if not 0 <= portion < self.count:
            raise IndexError(f"portion {portion} outside 0..{self.count - 1}")
        start = portion * self.size
        return start, min(start + self.size, self.num_samples)
