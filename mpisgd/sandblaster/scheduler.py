"""The Sandblaster coordinator rank's portion scheduler: who computes which portion of each pass.

Evaluating the objective is one *pass* over the training set, cut into portions
(`mpisgd.sandblaster.protocol.Portions`); `PortionScheduler` hands them to worker ranks and collects
their loss sums. (`mpisgd.sandblaster.workspace` sends the shard ranks their part of a pass.)

Scheduling (Dean et al. 2012, after MapReduce): portions are much smaller than 1/workers of the
set and go, in id order, to whichever worker is free, so fast workers simply do more of them. Once
none is left to hand out (the end of the pass), a free worker gets a *backup* copy of a portion
still running elsewhere, the one running longest first (at most two copies of a portion), and the
first copy to finish wins; later copies are counted and dropped, on the coordinator rank and on the
shards. A portion is backed up only once it has run longer than ``BACKUP_AFTER`` times the median
time of recent portions (Hadoop's speculative execution does the same): backing up every portion
still running at the end of each pass doubles the end-of-pass work; measured on 2 cores with 4
ranks and no straggler, it made a pass 1.9x slower (0.0385 s vs 0.0202 s, 8 portions of 256 x 64;
benchmarks/SANDBLASTER_RESULTS.md).

A worker that has not returned a portion within ``worker_timeout`` seconds is declared lost:
its portion is re-issued and it gets no more work (unless it answers again).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisgd.errors import CommError
from mpisgd.sandblaster.protocol import (
    Assignment,
    Clock,
    Portions,
    Sleep,
    Tag,
    WorkerCommand,
    wait_for_message,
)

logger = logging.getLogger(__name__)

MAX_COPIES = 2  # a portion runs on at most this many workers at once (original + one backup)
PREFETCH = 2  # assignments a worker may hold: the next one waits in its queue while it computes
BACKUP_AFTER = 2.0  # back up a portion out longer than this many median hand-out-to-result times
_DURATIONS_KEPT = 64


@dataclass
class _PassWork:
    """The state of one pass (or of a re-run of some of its portions) on the coordinator."""

    pass_id: int
    queue: deque  # portions not handed out yet, in id order
    copies: dict  # portion -> workers holding a copy
    handed: dict  # portion -> when its first copy was handed out
    losses: dict = field(default_factory=dict)  # portion -> accepted loss sum
    accepted: Counter = field(default_factory=Counter)

    def unfinished(self, portion: int) -> bool:
        return portion in self.copies and portion not in self.losses


class PortionScheduler:
    """Hand out the portions of each pass to workers; back up stragglers', re-issue lost workers'.

    Each worker holds up to ``PREFETCH`` assignments, so it finds its next portion queued when it
    finishes one instead of waiting a round trip for it. Counters since the last `take_counters`
    are what the metrics log per iteration.

    Args:
        comm: the run's communicator (this process is the coordinator rank).
        workers: world ranks of the workers.
        portions: how the training set is cut.
        backup_tasks: back up the portions of stragglers at the end of a pass.
        worker_timeout: seconds without an answer before a worker holding work is counted as lost.
        clock, sleep: the time source and the pause between probes; injectable, so tests can drive time.
    """

    COUNTERS = ("accepted_losses", "backup_portions", "reissued_portions", "duplicate_results",
                "stale_results", "workers_lost")

    def __init__(self, comm: MPI.Comm, *, workers: Sequence[int], portions: Portions, backup_tasks: bool,
                 worker_timeout: float, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        self.comm = comm
        self.clock, self.sleep = clock, sleep
        self.workers = tuple(workers)
        self.portions = portions
        self.backup_tasks = backup_tasks
        self.worker_timeout = worker_timeout
        self.assigned: dict = {w: deque() for w in self.workers}  # worker -> [(pass, portion, handed)]
        self.heard: dict = {}  # worker -> when it last answered (or got work while idle)
        self.lost: set = set()
        self.counters: Counter = Counter()
        self.accepted_by: Counter = Counter()
        self.computed_by: Counter = Counter()
        self.durations: deque = deque(maxlen=_DURATIONS_KEPT)  # seconds from hand-out to result
        self._result = np.empty(4)

    def run_pass(self, pass_id: int, todo: Sequence[int]) -> dict:
        """Get every portion in ``todo`` of pass ``pass_id`` computed once; returns portion -> loss sum.

        Raises:
            CommError: no worker is left.
        """
        work = _PassWork(pass_id, deque(todo), {k: set() for k in todo}, {})
        while len(work.losses) < len(todo):
            self._requeue_orphans(work)
            self._hand_out(work)
            self._receive_results(work, self._time_to_next_event(work))
            self._declare_overdue_lost(work)
            if len(self.lost) == len(self.workers):
                raise CommError(f"every worker (ranks {list(self.workers)}) stopped responding for "
                                f"{self.worker_timeout:g} s (--worker-timeout); the run cannot continue")
        double = [k for k, n in work.accepted.items() if n != 1]
        if double:
            raise CommError(f"bug: pass {pass_id}: losses of portions {double} accepted more than once")
        self.counters["accepted_losses"] += len(todo)
        return work.losses

    def _requeue_orphans(self, work: _PassWork) -> None:
        """Portions nobody holds any more (their worker was lost, or dropped them as stale) go back."""
        for portion, holders in work.copies.items():
            orphan = not holders and portion in work.handed and work.unfinished(portion)
            if orphan and portion not in work.queue:
                work.queue.appendleft(portion)
                self.counters["reissued_portions"] += 1

    def _live(self) -> list:
        return [w for w in self.workers if w not in self.lost]

    def _hand_out(self, work: _PassWork) -> None:
        while work.queue:  # fresh portions to the least loaded worker
            open_workers = [w for w in self._live() if len(self.assigned[w]) < PREFETCH]
            if not open_workers:
                return
            worker = min(open_workers, key=lambda w: len(self.assigned[w]))
            self._assign(worker, work, work.queue.popleft())
        if not self.backup_tasks:
            return
        overdue = self.clock() - self._backup_threshold()
        for worker in [w for w in self._live() if not self.assigned[w]]:  # idle workers take backups
            running = [k for k, holders in work.copies.items() if work.unfinished(k) and holders
                       and worker not in holders and len(holders) < MAX_COPIES and work.handed[k] <= overdue]
            if not running:
                return
            self._assign(worker, work, min(running, key=lambda k: work.handed[k]))
            self.counters["backup_portions"] += 1

    def _assign(self, worker: int, work: _PassWork, portion: int) -> None:
        start, end = self.portions.rows(portion)
        self.comm.send(Assignment(work.pass_id, portion, start, end), dest=worker, tag=Tag.ASSIGN)
        now = self.clock()
        if not self.assigned[worker]:
            self.heard[worker] = now  # an idle worker's clock starts now, not at its last answer
        self.assigned[worker].append((work.pass_id, portion, now))
        work.copies[portion].add(worker)
        work.handed.setdefault(portion, now)

    def _backup_threshold(self) -> float:
        """How long a portion must be out before it gets a backup copy (0 until times are known)."""
        if len(self.durations) < 4:
            return 0.0
        return BACKUP_AFTER * float(np.median(self.durations))

    def _time_to_next_event(self, work: _PassWork) -> float:
        """Seconds until a worker's deadline passes or a portion becomes due for a backup."""
        busy = [w for w in self._live() if self.assigned[w]]
        if not busy:
            return 0.0  # nobody is computing: nothing to wait for (the caller sees why)
        events = [self.heard[w] + self.worker_timeout for w in busy]
        if self.backup_tasks and len(busy) < len(self._live()):
            threshold = self._backup_threshold()
            events += [work.handed[k] + threshold for k, holders in work.copies.items()
                       if holders and work.unfinished(k) and len(holders) < MAX_COPIES]
        return max(0.0, min(events) - self.clock())

    def _receive_results(self, work: _PassWork, timeout: float) -> None:
        """Take every result that is there, waiting up to ``timeout`` for the first."""
        status = wait_for_message(self.comm, tag=Tag.RESULT, timeout=timeout, clock=self.clock, sleep=self.sleep)
        while status is not None:
            worker = status.Get_source()
            self.comm.Recv(self._result, source=worker, tag=Tag.RESULT)
            result_pass, portion = int(self._result[0]), int(self._result[1])
            loss, ok = self._result[2], self._result[3]
            self._worker_answered(worker, result_pass, portion)
            if ok:
                self.computed_by[worker] += 1
            if result_pass != work.pass_id or portion not in work.copies:
                self.counters["stale_results"] += 1
            else:
                work.copies[portion].discard(worker)
                if ok and portion not in work.losses:
                    work.losses[portion] = float(loss)
                    work.accepted[portion] += 1
                    self.accepted_by[worker] += 1
                elif ok:
                    self.counters["duplicate_results"] += 1
            status = MPI.Status()
            if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=Tag.RESULT, status=status):
                status = None

    def _worker_answered(self, worker: int, result_pass: int, portion: int) -> None:
        now = self.clock()
        self.heard[worker] = now
        queue = self.assigned[worker]
        for index, (its_pass, its_portion, handed) in enumerate(queue):
            if (its_pass, its_portion) == (result_pass, portion):  # FIFO: normally the first one
                self.durations.append(now - handed)
                del queue[index]
                break
        if worker in self.lost:
            self.lost.discard(worker)
            logger.warning("sandblaster: worker rank %d answered again and gets work again", worker)

    def _declare_overdue_lost(self, work: _PassWork) -> None:
        now = self.clock()
        for worker in self._live():
            if not self.assigned[worker] or now - self.heard[worker] < self.worker_timeout:
                continue
            self.lost.add(worker)
            self.counters["workers_lost"] += 1
            held = list(self.assigned[worker])
            self.assigned[worker].clear()
            logger.warning("sandblaster: worker rank %d held portions %s and did not answer for %g s "
                           "(--worker-timeout): counted as lost, its work is re-issued",
                           worker, [k for _, k, _ in held], self.worker_timeout)
            for its_pass, portion, _ in held:
                if its_pass == work.pass_id and portion in work.copies:
                    work.copies[portion].discard(worker)  # re-queued by _requeue_orphans if nobody has it

    def take_counters(self) -> dict[str, Any]:
        """Counters since the last call (and reset them)."""
        taken: dict[str, Any] = {name: self.counters[name] for name in self.COUNTERS}
        taken["portions_per_worker"] = {str(w): self.accepted_by[w] for w in self.workers}
        taken["computed_per_worker"] = {str(w): self.computed_by[w] for w in self.workers}
        self.counters, self.accepted_by, self.computed_by = Counter(), Counter(), Counter()
        return taken

    def stop_workers(self, reply_timeout: float) -> list[int]:
        """Tell every worker not lost to stop and wait for each to acknowledge; returns the silent ones."""
        waiting = self._live()
        for worker in waiting:
            self.comm.send((WorkerCommand.STOP,), dest=worker, tag=Tag.ASSIGN)
        deadline = self.clock() + reply_timeout
        pending = set(waiting)
        while pending:
            left = max(0.0, deadline - self.clock())
            status = wait_for_message(self.comm, tag=MPI.ANY_TAG, timeout=left, clock=self.clock, sleep=self.sleep)
            if status is None:
                break
            source, tag = status.Get_source(), status.Get_tag()
            if tag == Tag.RESULT:  # a late portion from a worker that had not read "stop" yet
                self.comm.Recv(self._result, source=source, tag=Tag.RESULT)
            elif tag == Tag.EXIT:
                self.comm.recv(source=source, tag=Tag.EXIT)
                pending.discard(source)
            elif tag == Tag.SIGNAL:  # a stop signal that came as the run ended anyway
                self.comm.recv(source=source, tag=Tag.SIGNAL)
            else:
                raise CommError(f"sandblaster coordinator rank: unexpected message tag {tag} from rank {source}")
        return sorted(self.lost | pending)


def __getattr__(name: str) -> Any:
    """``ShardedWorkspace`` moved to `mpisgd.sandblaster.workspace`; the old module
    (mpisgd.ps.sandblaster_coordinator, aliased to this one) held both."""
    if name == "ShardedWorkspace":
        from mpisgd.sandblaster.workspace import ShardedWorkspace
        return ShardedWorkspace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
