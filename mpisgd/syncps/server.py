"""A sync-ps shard: each step, apply the mean of the first N-b gradients that arrive for it and discard
the rest (Chen et al. 2016, "Revisiting Distributed Synchronous SGD": b backup workers).

It is a :class:`~mpisgd.downpour.server.ShardServer` (so Downpour's coordinator and its followers serve
it unchanged) whose "pending work" is a quorum of tagged slots instead of a pushed sum. The quorum is
N-b, or every worker still able to push when fewer are (the board's clocks: a worker done, failed or
counted dead by the coordinator is not waited for), so a dead worker never stalls a step. Each shard
chooses its own first N-b; with b = 0 every shard waits for every live worker.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpisgd.downpour.board import JobBoard
from mpisgd.downpour.rules import UpdateRule
from mpisgd.downpour.server import ShardServer
from mpisgd.downpour.windows import ParameterServerWindows, window_array
from mpisgd.syncps.windows import SLOT_COUNTERS, SlotCounter, SlotWindows, tag_pushes, tag_step


class SlotLedger:
    """What a server has seen of the workers' slot tags: each new push is an arrival when its tag is
    for the step being gathered, else late. A push the worker overwrote before the server looked was
    for a step applied without it (the worker pushes again only then), so it is late."""

    def __init__(self, num_workers: int) -> None:
        self.seen = np.zeros(num_workers, dtype=np.int64)  # pushes accounted per worker

    def note(self, tags: np.ndarray, step: int) -> tuple[list[int], int]:
        """The workers (in index order) whose newest push in ``tags`` is new and for ``step``, and how
        many of the new pushes are late."""
        pushes, steps = tag_pushes(tags), tag_step(tags)
        arrived, late = [], 0
        for worker in np.flatnonzero(pushes > self.seen):
            new = int(pushes[worker] - self.seen[worker])
            self.seen[worker] = pushes[worker]
            on_time = int(steps[worker]) == step
            if on_time:
                arrived.append(int(worker))
            late += new - on_time
        return arrived, late


class SyncShardServer(ShardServer):
    """Serve one shard synchronously.

    Args:
        windows, rule, idle_sleep_s: as :class:`~mpisgd.downpour.server.ShardServer`.
        slots: the job's :class:`~mpisgd.syncps.windows.SlotWindows`.
        board: this rank's board (who can still push).
        backup_workers: b; each step applies the first N-b gradients.
    """

    def __init__(self, windows: ParameterServerWindows, rule: UpdateRule, *, slots: SlotWindows, board: JobBoard,
                 backup_workers: int, idle_sleep_s: float) -> None:
        super().__init__(windows, rule, idle_sleep_s=idle_sleep_s)
        self.slot_windows, self.board = slots, board
        self.num_workers = slots.num_workers
        self.wanted = self.num_workers - backup_workers
        self.slot_memory = window_array(slots.slots, np.float32).reshape(self.num_workers, self.size)
        self.version = 0  # steps completed (the VERSION counter)
        self.ledger = SlotLedger(self.num_workers)
        self.arrivals: list[int] = []  # workers whose gradient for step version+1 came, in order
        self.counts = np.zeros(SLOT_COUNTERS, dtype=np.int64)
        self._tags = np.zeros(self.num_workers, dtype=np.int64)
        self._ignored_tags = np.zeros(self.num_workers, dtype=np.int64)

    def initialize(self, values: np.ndarray, *, claimed_steps: int = 0) -> None:
        super().initialize(values, claimed_steps=claimed_steps)
        for win in (self.slot_windows.slots, self.slot_windows.tags, self.slot_windows.counts):
            window_array(win, np.float32 if win is self.slot_windows.slots else np.int64)[:] = 0
            win.Sync()

    # ---- what arrived -----------------------------------------------------------------------------
    def _read_tags(self) -> np.ndarray:
        tags = self.slot_windows.tags
        tags.Get_accumulate([self._ignored_tags, MPI.INT64_T], [self._tags, MPI.INT64_T], self.rank,
                            (0, self.num_workers, MPI.INT64_T), op=MPI.NO_OP)
        tags.Flush(self.rank)
        return self._tags

    def _collect(self) -> None:
        """Note the gradients tagged since the last look: for this step (in order of arrival), or late."""
        arrived, late = self.ledger.note(self._read_tags(), self.version + 1)
        self.arrivals += arrived
        self.counts[SlotCounter.LATE] += late

    def _quorum(self) -> int:
        """N-b, or fewer where fewer workers can still push for this step."""
        if len(self.arrivals) >= self.wanted:
            return self.wanted
        clocks = self.board.read_clocks()
        can_push = (~clocks.excluded & np.isfinite(clocks.clocks))
        can_push[self.arrivals] = True
        return min(self.wanted, int(can_push.sum()))

    def pending(self) -> bool:
        self._collect()
        quorum = self._quorum()
        return quorum > 0 and len(self.arrivals) >= quorum

    # ---- the step ------------------------------------------------------------------------------------
    def serve_once(self) -> bool:
        if not self.pending():
            return False
        quorum = self._quorum()
        # the mean in worker order, not arrival order: with every gradient chosen (b = 0) the sum is then
        # the same in every run, so a resumed job continues bitwise
        chosen, discarded = sorted(self.arrivals[:quorum]), self.arrivals[quorum:]
        self.arrivals = []
        self.counts[SlotCounter.LATE] += len(discarded)
        self.slot_windows.slots.Sync()  # the slots the tags announced, as written
        self._publish(sequence_step=1)
        applied = self._apply_mean(chosen)
        self.version += 1
        self._bump(self._one_update)  # VERSION: workers waiting on this step go on
        if applied:
            counts = self.counts
            counts[SlotCounter.APPLIED] += len(chosen)
            counts[SlotCounter.FEWEST] = min(counts[SlotCounter.FEWEST] or len(chosen), len(chosen))
            counts[SlotCounter.MOST] = max(counts[SlotCounter.MOST], len(chosen))
        self._publish(sequence_step=1)
        return applied

    def _apply_mean(self, chosen: list) -> bool:
        """The rule applied to the mean of the ``chosen`` workers' slots, chunk by chunk, polling MPI
        between chunks; a non-finite mean is rejected (counted) and the step passes without it."""
        taken, scale = self.taken, np.float32(1.0 / len(chosen))
        for start in range(0, self.size, self.chunk):
            where = slice(start, min(start + self.chunk, self.size))
            np.sum(self.slot_memory[chosen, where], axis=0, out=taken[where])
            taken[where] *= scale
            self.poll()
        if not np.isfinite(taken).all():
            self.rejected += 1
            self._bump(self._one_rejection)
            return False
        for start in range(0, self.size, self.chunk):
            where = slice(start, min(start + self.chunk, self.size))
            self.rule.apply(self.params[where], taken[where], where)
            self.poll()
        self.windows.sync_local()
        self.updates += 1
        return True

    def _publish(self, *, sequence_step: int = 0) -> None:
        self.counts[SlotCounter.SEQUENCE] += sequence_step
        counts = self.slot_windows.counts
        counts.Accumulate([self.counts, MPI.INT64_T], self.rank, (0, SLOT_COUNTERS, MPI.INT64_T), op=MPI.REPLACE)
        counts.Flush(self.rank)

    def drain(self) -> int:
        """The end: whatever arrived and was not applied is late."""
        self._collect()
        self.counts[SlotCounter.LATE] += len(self.arrivals)
        self.arrivals = []
        self._publish()
        return 0
