"""The windows sync-ps adds to Downpour's: one gradient slot per worker on every shard, the step each
slot holds, and per-shard counts; plus the two RMA operations of a worker, a consistent pull and a
push into its slot.

Why slots and not Downpour's one accumulation buffer: a gradient that arrives after its step's first
N-b must be discarded, and a sum cannot give one back. Each worker writes only its own slot, then the
slot's tag (the step, i.e. the shard version the gradient was computed at plus one, and how many
pushes the worker has made, in one int64: :func:`slot_tag`); the server sums the slots it accepts. A
worker writes its slot again only after the shard has moved past the step of its last push, so no slot
is written while the server reads it. That push may have been overwritten before the server looked (a
late one, under oversubscription); the push count in the tag lets the server count it late all the same.

Consistent pulls: the server makes ``SEQUENCE`` odd while it updates the shard in place and even again
after (a sequence lock); a pull that saw the same even value before and after reading holds one
version of every shard it read, which the synchronous schedule needs (Downpour's pulls are Hogwild).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
from mpi4py import MPI

from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.downpour.client import ParameterClient
from mpisgd.downpour.windows import ParameterServerWindows, _allocate, free_windows

SINGLE_WRITER = {"which_accumulate_ops": "replace,no_op"}


class SlotCounter(IntEnum):
    """Per-shard int64 counts, written by that shard's server only (REPLACE), read with NO_OP."""

    SEQUENCE = 0  #: odd while the shard is being updated
    APPLIED = 1  #: gradients applied (summed into an update)
    LATE = 2  #: gradients discarded: they came after their step's first N-b, or for a step already past
    FEWEST = 3  #: fewest gradients in one update so far (0 before the first)
    MOST = 4  #: most gradients in one update so far


SLOT_COUNTERS = len(SlotCounter)

STEP_BITS = 32  # a tag's low bits hold the step, the high ones the worker's pushes (one atomic int64)


def slot_tag(step: int, pushes: int) -> int:
    """The tag of a worker's ``pushes``-th push, for ``step``: one int64, so that a reader never sees the
    step of one push with the count of another (MPI makes only single elements atomic)."""
    if not (0 <= step < 1 << STEP_BITS and 0 <= pushes < 1 << (63 - STEP_BITS)):
        raise ValueError(f"sync-ps slot tag out of range: step {step}, pushes {pushes}")
    return pushes << STEP_BITS | step


def tag_step(tags: np.ndarray) -> np.ndarray:
    """The steps of :func:`slot_tag` values."""
    return tags & ((1 << STEP_BITS) - 1)


def tag_pushes(tags: np.ndarray) -> np.ndarray:
    """The push counts of :func:`slot_tag` values."""
    return tags >> STEP_BITS


class SlotWindows:
    """Create (collectively, on every rank of the job) the slot, tag and count windows of sync-ps.

    Args:
        windows: the job's Downpour windows (their communicator, roles and shard layout).
    """

    def __init__(self, windows: ParameterServerWindows) -> None:
        self.windows = windows
        self.num_workers = len(windows.roles.workers)
        self.layout = windows.layout
        shard = windows.shard
        own = 0 if shard is None else self.layout.shard_size(shard)
        comm = windows.comm
        self.slots = _allocate(comm, self.num_workers * own, np.float32)
        self.tags = _allocate(comm, self.num_workers if shard is not None else 0, np.int64, SINGLE_WRITER)
        self.counts = _allocate(comm, SLOT_COUNTERS if shard is not None else 0, np.int64, SINGLE_WRITER)
        self._windows = [self.slots, self.tags, self.counts]
        for win in self._windows:
            win.Lock_all(MPI.MODE_NOCHECK)
        self._read = np.zeros((self.layout.num_shards, SLOT_COUNTERS), dtype=np.int64)
        self._ignored = np.zeros(max(SLOT_COUNTERS, self.num_workers), dtype=np.int64)
        self._tag = np.zeros(1, dtype=np.int64)
        self._pushes = 0  # this worker's pushes in this run
        self._freed = False

    # ---- a worker ---------------------------------------------------------------------------------
    def read_counts(self) -> np.ndarray:
        """Every shard's counts, shape (shards, SLOT_COUNTERS)."""
        win = self.windows
        for shard in range(self.layout.num_shards):
            self.counts.Get_accumulate([self._ignored[:SLOT_COUNTERS], MPI.INT64_T], [self._read[shard], MPI.INT64_T],
                                       win.server_rank(shard), (0, SLOT_COUNTERS, MPI.INT64_T), op=MPI.NO_OP)
        for shard in range(self.layout.num_shards):
            self.counts.Flush(win.server_rank(shard))
        return self._read.copy()

    def pull_consistent(self, client: ParameterClient, out: np.ndarray) -> np.ndarray:
        """Pull every shard into ``out`` with no update in progress during the read (retrying when one
        was); returns the shards' versions."""

        def pulled() -> np.ndarray | None:
            before = self.read_counts()[:, SlotCounter.SEQUENCE]
            if (before % 2).any():
                return None
            versions = client.pull_parameters(out)
            unchanged = np.array_equal(before, self.read_counts()[:, SlotCounter.SEQUENCE])
            return versions if unchanged else None

        return wait_until(pulled, what="a consistent pull", backoff=Backoff(first=1e-5, longest=1e-3))

    def push(self, worker_index: int, grads: np.ndarray, steps: np.ndarray) -> None:
        """Write ``grads`` into this worker's slot on every shard, then tag each with its step (and
        this worker's push count)."""
        win = self.windows
        self._pushes += 1
        for shard in range(self.layout.num_shards):
            where = self.layout.shard_slice(shard)
            size = where.stop - where.start
            rank = win.server_rank(shard)
            self.slots.Put([grads[where], MPI.FLOAT], rank, (worker_index * size, size, MPI.FLOAT))
            self.slots.Flush(rank)  # the slot is complete at the server before its tag says so
            self._tag[0] = slot_tag(int(steps[shard]), self._pushes)
            self.tags.Accumulate([self._tag, MPI.INT64_T], rank, (worker_index, 1, MPI.INT64_T), op=MPI.REPLACE)
            self.tags.Flush(rank)

    # ---- lifetime -----------------------------------------------------------------------------------
    def free(self) -> None:
        """Collective: end the epochs and free the windows (before the Downpour windows are freed)."""
        if self._freed:
            return
        free_windows(self._windows)
        self._freed = True
