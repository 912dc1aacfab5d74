"""The Sandblaster coordinator: L-BFGS's workspace on sharded vectors, and the portion scheduler.

`ShardedWorkspace` implements `mpisgd.sandblaster.lbfgs.Workspace`: a program of vector commands goes
to every shard and their partial scalars are combined in shard order; evaluating the objective is
one *pass* over the training set, cut into portions that `PortionScheduler` hands to workers.

Scheduling (Dean et al. 2012, after MapReduce): portions are much smaller than 1/workers of the
set and go, in id order, to whichever worker is free, so fast workers simply do more of them. Once
none is left to hand out (the end of the pass), a free worker gets a *backup* copy of a portion
still running elsewhere, the one running longest first (at most two copies of a portion), and the
first copy to finish wins; later copies are counted and dropped, on the coordinator and on the
shards. A portion is backed up only once it has run longer than ``BACKUP_AFTER`` times the median
time of recent portions (Hadoop's speculative execution does the same): backing up every portion
still running at the end of each pass doubles the end-of-pass work; measured on 2 cores with 4
ranks and no straggler, it made a pass 1.9x slower (0.0385 s vs 0.0202 s, 8 portions of 256 x 64;
benchmarks/SANDBLASTER_RESULTS.md).

A worker that has not returned a portion within ``worker_timeout`` seconds is declared lost:
its portion is re-issued and it gets no more work (unless it answers again).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpisgd.errors import CommError
from mpisgd.sandblaster.lbfgs import combine_partials
from mpisgd.sandblaster.protocol import (
    ASSIGN,
    COMMAND,
    EXIT,
    REPLY,
    RESULT,
    Portions,
    receive_object,
    wait_for_message,
)
from mpisgd.training.layout import ShardLayout

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
    """

    COUNTERS = ("accepted_losses", "backup_portions", "reissued_portions", "duplicate_results",
                "stale_results", "workers_lost")

    def __init__(self, comm: MPI.Comm, *, workers: Sequence[int], portions: Portions, backup_tasks: bool,
                 worker_timeout: float):
        self.comm = comm
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
        overdue = time.monotonic() - self._backup_threshold()
        for worker in [w for w in self._live() if not self.assigned[w]]:  # idle workers take backups
            running = [k for k, holders in work.copies.items() if work.unfinished(k) and holders
                       and worker not in holders and len(holders) < MAX_COPIES and work.handed[k] <= overdue]
            if not running:
                return
            self._assign(worker, work, min(running, key=lambda k: work.handed[k]))
            self.counters["backup_portions"] += 1

    def _assign(self, worker: int, work: _PassWork, portion: int) -> None:
        start, end = self.portions.rows(portion)
        self.comm.send((work.pass_id, portion, start, end), dest=worker, tag=ASSIGN)
        now = time.monotonic()
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
        return max(0.0, min(events) - time.monotonic())

    def _receive_results(self, work: _PassWork, timeout: float) -> None:
        """Take every result that is there, waiting up to ``timeout`` for the first."""
        status = wait_for_message(self.comm, tag=RESULT, timeout=timeout)
        while status is not None:
            worker = status.Get_source()
            self.comm.Recv(self._result, source=worker, tag=RESULT)
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
            if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=RESULT, status=status):
                status = None

    def _worker_answered(self, worker: int, result_pass: int, portion: int) -> None:
        now = time.monotonic()
        self.heard[worker] = now
        queue = self.assigned[worker]
        for index, (its_pass, its_portion, handed) in enumerate(queue):
            if (its_pass, its_portion) == (result_pass, portion):  # FIFO: normally the first one
                self.durations.append(now - handed)
                del queue[index]
                break
        if worker in self.lost:
            self.lost.discard(worker)
            print(f"[sandblaster] worker rank {worker} answered again and gets work again", file=sys.stderr,
                  flush=True)

    def _declare_overdue_lost(self, work: _PassWork) -> None:
        now = time.monotonic()
        for worker in self._live():
            if not self.assigned[worker] or now - self.heard[worker] < self.worker_timeout:
                continue
            self.lost.add(worker)
            self.counters["workers_lost"] += 1
            held = list(self.assigned[worker])
            self.assigned[worker].clear()
            print(f"[sandblaster] worker rank {worker} held portions {[k for _, k, _ in held]} and did not "
                  f"answer for {self.worker_timeout:g} s (--worker-timeout): counted as lost, its work is "
                  "re-issued", file=sys.stderr, flush=True)
            for its_pass, portion, _ in held:
                if its_pass == work.pass_id and portion in work.copies:
                    work.copies[portion].discard(worker)  # re-queued by _requeue_orphans if nobody has it

    def take_counters(self) -> dict:
        """Counters since the last call (and reset them)."""
        taken = {name: self.counters[name] for name in self.COUNTERS}
        taken["portions_per_worker"] = {str(w): self.accepted_by[w] for w in self.workers}
        taken["computed_per_worker"] = {str(w): self.computed_by[w] for w in self.workers}
        self.counters, self.accepted_by, self.computed_by = Counter(), Counter(), Counter()
        return taken

    def stop_workers(self, reply_timeout: float) -> list:
        """Tell every worker not lost to stop and wait for each to acknowledge; returns the silent ones."""
        waiting = self._live()
        for worker in waiting:
            self.comm.send(("stop",), dest=worker, tag=ASSIGN)
        deadline = time.monotonic() + reply_timeout
        pending = set(waiting)
        while pending:
            left = max(0.0, deadline - time.monotonic())
            status = wait_for_message(self.comm, tag=MPI.ANY_TAG, timeout=left)
            if status is None:
                break
            source, tag = status.Get_source(), status.Get_tag()
            if tag == RESULT:  # a late portion from a worker that had not read "stop" yet
                self.comm.Recv(self._result, source=source, tag=RESULT)
            elif tag == EXIT:
                self.comm.recv(source=source, tag=EXIT)
                pending.discard(source)
            else:
                raise CommError(f"sandblaster coordinator: unexpected message tag {tag} from rank {source}")
        return sorted(self.lost | pending)


class ShardedWorkspace:
    """`mpisgd.sandblaster.lbfgs.Workspace` whose vectors live on the shards and whose objective is a pass.

    The objective is sum(portion loss sums) / N + the shards' regularizer terms; the gradient is
    formed on the shards (see sandblaster_shard). Loss sums are added with math.fsum, which is
    exact, so neither their order nor the worker that computed them changes the result.
    """

    def __init__(self, comm: MPI.Comm, *, shards: Sequence[int], layout: ShardLayout,
                 scheduler: PortionScheduler, num_samples: int, reply_timeout: float):
        self.comm = comm
        self.shards = tuple(shards)
        self.layout = layout
        self.scheduler = scheduler
        self.num_samples = num_samples
        self.reply_timeout = reply_timeout
        self.pass_id = 0
        self.counters: Counter = Counter()
        self.gradients_by_shard = [0] * len(self.shards)

    def _to_shards(self, command: tuple) -> None:
        for rank in self.shards:
            self.comm.send(command, dest=rank, tag=COMMAND)

    def _replies(self, kind: str) -> list:
        replies = []
        for rank in self.shards:
            reply = receive_object(self.comm, source=rank, tag=REPLY, timeout=self.reply_timeout,
                                   what=f"'{kind}' reply")
            if reply[0] != kind:
                raise CommError(f"sandblaster: shard rank {rank} answered {reply[0]!r} to {kind!r}")
            replies.append(reply)
        return replies

    def run(self, program: Sequence[tuple]) -> list:
        self._to_shards(("run", list(program)))
        return combine_partials(program, [reply[1] for reply in self._replies("run")])

    def evaluate(self, point: str, gradient: str, *, before: Sequence[tuple] = (),
                 then: Sequence[tuple] = ()) -> tuple:
        self.pass_id += 1
        self._to_shards(("begin", self.pass_id, point, list(before)))
        losses = self.scheduler.run_pass(self.pass_id, range(self.portions.count))
        while True:
            self._to_shards(("end", self.pass_id, gradient, list(then)))
            replies = self._replies("end")
            missing = sorted({k for reply in replies for k in reply[2]})
            if not missing:
                break
            self.counters["missing_portions"] += len(missing)  # counted done, yet a shard lacks it: redo
            self.scheduler.run_pass(self.pass_id, missing)
        regularizer = 0.0
        for index, (_, _, _, (shard_regularizer, _, stats)) in enumerate(replies):
            regularizer += shard_regularizer
            self.gradients_by_shard[index] += stats["accepted"]
            self.counters["duplicate_gradients"] += stats["duplicates"]
            self.counters["stale_gradients"] += stats["stale"]
        self.counters["passes"] += 1
        objective = math.fsum(losses[k] for k in range(self.portions.count)) / self.num_samples + regularizer
        return objective, combine_partials(then, [reply[3][1] for reply in replies])

    @property
    def portions(self) -> Portions:
        return self.scheduler.portions

    def gather_parameters(self) -> np.ndarray:
        """The whole parameter vector, once, for the final checkpoint."""
        self._to_shards(("final",))
        flat = np.empty(self.layout.num_params)
        for shard, rank in enumerate(self.shards):
            piece = self.layout.shard_slice(shard)
            buffer = np.empty(piece.stop - piece.start)
            if wait_for_message(self.comm, source=rank, tag=REPLY, timeout=self.reply_timeout) is None:
                raise CommError(f"shard rank {rank} did not send its final parameters")
            self.comm.Recv(buffer, source=rank, tag=REPLY)
            flat[piece] = buffer
        return flat

    def take_counters(self) -> dict:
        """Per-iteration counters of passes, portions and copies (and reset them)."""
        taken = self.scheduler.take_counters()
        for name in ("passes", "duplicate_gradients", "stale_gradients", "missing_portions"):
            taken[name] = self.counters[name]
        taken["accepted_gradients"] = list(self.gradients_by_shard)
        taken["portions_per_pass"] = self.portions.count
        self.counters = Counter()
        self.gradients_by_shard = [0] * len(self.shards)
        return taken

    def stop_shards(self, payload: tuple) -> None:
        self._to_shards(("stop", *payload))
