"""The job board: server 0's board window, through which the ranks of a Downpour job coordinate
without ever waiting for each other.

Layout (float64 elements): a header of :class:`Header` fields, written only by server 0 (the
coordinator: phase of the job, stop reason, warm-start gate, exit code, checkpoint requests), then one
row per worker of :class:`RowField` fields, a staleness histogram and the worker's float model
buffers (batch-norm statistics), written only by that worker; last, the clocks of bounded staleness
(``--max-staleness``): one clock per worker (its finished steps, written by that worker; ``inf`` once it
is done or failed) and one exclusion flag per worker (written by server 0: 1 while it counts the
worker as dead); then one entry per world rank of the job (servers first), written by that rank: the
stop signal it received (:mod:`mpisgd.training.preemption`), so that a signal reaching any one rank
stops the whole job through server 0. Every access is one RMA operation that is
atomic per element (``Accumulate(REPLACE)`` to write, ``Get_accumulate(NO_OP)`` to read), so a reader
never sees a torn value; a row read while its worker writes may mix two reports, which only ever
matters as one report of lag.

Header fields and row fields are separate enums on purpose: both start at offset 0 of their part. No
module but this one indexes the raw array; the others use :class:`JobBoard`, :class:`BoardHeader`,
:class:`WorkerReport` and :class:`WorkerRows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from mpisgd.training import preemption

if TYPE_CHECKING:
    from mpisgd.downpour.client import ParameterClient
    from mpisgd.downpour.windows import ParameterServerWindows


class Phase(IntEnum):
    """Phase of the job, published by the coordinator in the header."""

    TRAINING = 0
    STOPPING = 1  # target accuracy reached, or a non-finite gradient with --on-nonfinite stop
    DRAINING = 2  # every worker done, failed or dead: the servers apply what is left
    FINISHED = 3  # the final model is written


class WorkerState(IntEnum):
    """A worker's state, in its row."""

    RUNNING = 0
    DONE = 1
    FAILED = 2


class StopReason(IntEnum):
    """Why the job stopped; ``label`` is the name in summaries and metrics."""

    EPOCHS = 0
    MAX_STEPS = 1
    TARGET_ACCURACY = 2
    NONFINITE = 3
    NO_WORKERS = 4
    PREEMPTED = 5  # a stop signal reached server 0 (mpisgd.training.preemption): checkpoint, no final model

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> StopReason:
        return cls[label.upper()]


STOP_REASONS = tuple(reason.label for reason in StopReason)


class Header(IntEnum):
    """Offsets of the header fields (written by server 0 only)."""

    PHASE = 0
    STOP_REASON = 1  # a StopReason
    WARM_OPEN = 2  # 1 once the warm-start replica has pushed enough
    EXIT_CODE = 3
    CHECKPOINT_REQUESTS = 4  # server 0 counts up; every server then hands in its shard
    ABORT = 5  # 1: the job ends with MPI_Abort (a worker never finished)
    STOP_AT = 6  # sync-ps preempted: 0 none, STOP_PENDING while server 0 picks the step, else the last step


HEADER_SIZE = 8  # room for later fields without moving the rows
STOP_PENDING = -1.0  # Header.STOP_AT while server 0 reads the step to stop after


class RowField(IntEnum):
    """Offsets of the fields of a worker's row (written by that worker only)."""

    HEARTBEAT = 0  # incremented by the worker at every report: its liveness
    STEPS = 1
    PUSHES = 2
    NONFINITE = 3  # gradients with NaN/Inf the worker did not push
    STATE = 4  # a WorkerState
    LOSS_SUM = 5
    LOSS_COUNT = 6
    FAILED_STEP = 7
    HISTOGRAM = 8  # STALENESS_BINS counts follow


STALENESS_BINS = 32  #: staleness 0..30, and 31 or more in the last bin

# the module-level names of earlier versions (mpisgd.downpour exports them)
TRAINING, STOPPING, DRAINING, FINISHED = Phase.TRAINING, Phase.STOPPING, Phase.DRAINING, Phase.FINISHED
RUNNING, DONE, FAILED = WorkerState.RUNNING, WorkerState.DONE, WorkerState.FAILED


@dataclass(frozen=True)
class BoardLayout:
    """Sizes and offsets of the board window (float64 elements)."""

    num_workers: int
    buffer_size: int = 0  # float model buffers each worker publishes (batch-norm running statistics)
    num_servers: int = 1

    HEADER = HEADER_SIZE

    @property
    def buffers_offset(self) -> int:
        return RowField.HISTOGRAM + STALENESS_BINS

    @property
    def row_size(self) -> int:
        return self.buffers_offset + self.buffer_size

    @property
    def clocks_offset(self) -> int:
        """Offset of the workers' clocks (one per worker), followed by their exclusion flags."""
        return HEADER_SIZE + self.num_workers * self.row_size

    @property
    def signals_offset(self) -> int:
        """Offset of the stop signals, one per world rank (servers, then workers)."""
        return self.clocks_offset + 2 * self.num_workers

    @property
    def size(self) -> int:
        return self.signals_offset + self.num_servers + self.num_workers

    def row(self, worker_index: int) -> int:
        """Offset of worker ``worker_index``'s row."""
        return HEADER_SIZE + worker_index * self.row_size


class BoardHeader:
    """A copy of the header as read (or last written), with named fields."""

    def __init__(self, values: np.ndarray | None = None) -> None:
        self.values = np.zeros(HEADER_SIZE, dtype=np.float64) if values is None else values

    @property
    def phase(self) -> Phase:
        return Phase(int(self.values[Header.PHASE]))

    @property
    def stop_reason(self) -> StopReason:
        return StopReason(int(self.values[Header.STOP_REASON]))

    @property
    def warm_open(self) -> bool:
        return bool(self.values[Header.WARM_OPEN])

    @property
    def exit_code(self) -> int:
        return int(self.values[Header.EXIT_CODE])

    @property
    def checkpoint_requests(self) -> int:
        return int(self.values[Header.CHECKPOINT_REQUESTS])

    @property
    def abort(self) -> bool:
        return bool(self.values[Header.ABORT])

    @property
    def stop_at(self) -> float:
        """sync-ps: 0 (no stop), :data:`STOP_PENDING`, or the last step before a preemption stop."""
        return float(self.values[Header.STOP_AT])


class _Column:
    """One row field of every worker, as a read-only attribute of :class:`WorkerRows`."""

    def __init__(self, field: RowField) -> None:
        self.field = field

    def __get__(self, rows: WorkerRows, owner: type) -> np.ndarray:
        return rows.values[:, self.field]


class WorkerRows:
    """A copy of every worker's row, as columns with names (one entry per worker)."""

    heartbeats = _Column(RowField.HEARTBEAT)
    steps = _Column(RowField.STEPS)
    pushes = _Column(RowField.PUSHES)
    nonfinite = _Column(RowField.NONFINITE)
    states = _Column(RowField.STATE)
    loss_sums = _Column(RowField.LOSS_SUM)
    loss_counts = _Column(RowField.LOSS_COUNT)

    def __init__(self, values: np.ndarray, layout: BoardLayout) -> None:
        self.values = values.reshape(layout.num_workers, layout.row_size)
        self.layout = layout

    def staleness_histogram(self) -> np.ndarray:
        """The workers' staleness counts added up, one per bin."""
        return self.values[:, RowField.HISTOGRAM:RowField.HISTOGRAM + STALENESS_BINS].sum(axis=0)

    def mean_buffers(self) -> np.ndarray | None:
        """The model buffers averaged over the workers that reported at least once (None: nobody did)."""
        reported = self.values[self.heartbeats > 0]
        return reported[:, self.layout.buffers_offset:].mean(axis=0) if len(reported) else None

    def copy(self) -> WorkerRows:
        return WorkerRows(self.values.copy(), self.layout)


@dataclass(frozen=True)
class WorkerClocks:
    """The clocks of bounded staleness as read: steps finished per worker, and who is counted dead."""

    clocks: np.ndarray
    excluded: np.ndarray

    def live(self) -> np.ndarray:
        """Clocks of the workers that still train and are not counted dead."""
        return self.clocks[~self.excluded & np.isfinite(self.clocks)]

    def slowest(self) -> float:
        """The fewest steps a live worker has finished (``inf`` when none is live)."""
        live = self.live()
        return float(live.min()) if len(live) else float("inf")

    def spread(self) -> int:
        """Max - min of the live workers' clocks (0 with fewer than two)."""
        live = self.live()
        return int(live.max() - live.min()) if len(live) else 0


class WorkerReport:
    """One worker's own row, kept locally and written whole at each report (the heartbeat)."""

    def __init__(self, layout: BoardLayout, worker_index: int, *, steps: int = 0) -> None:
        self.offset = layout.row(worker_index)
        self.buffers_offset = layout.buffers_offset
        self.values = np.zeros(layout.row_size, dtype=np.float64)
        self.values[RowField.STEPS] = steps

    def add(self, field: RowField, amount: float = 1.0) -> None:
        self.values[field] += amount

    def set(self, field: RowField, value: float) -> None:
        self.values[field] = value

    def count_staleness(self, staleness: Sequence[int] | np.ndarray) -> None:
        for value in staleness:
            self.values[RowField.HISTOGRAM + min(max(int(value), 0), STALENESS_BINS - 1)] += 1

    def set_buffers(self, values: np.ndarray) -> None:
        self.values[self.buffers_offset:self.buffers_offset + len(values)] = values


class JobBoard:
    """This rank's access to the board (through RMA to server 0, server 0 itself included).

    Args:
        client: this rank's :class:`~mpisgd.downpour.ParameterClient` (the board's RMA operations).
    """

    def __init__(self, client: ParameterClient) -> None:
        self.client = client
        self.windows: ParameterServerWindows = client.windows
        self.layout: BoardLayout = self.windows.board_layout
        self._rows = np.zeros(self.layout.num_workers * self.layout.row_size, dtype=np.float64)
        self._clocks = np.zeros(2 * self.layout.num_workers, dtype=np.float64)
        self._signals = np.zeros(self.layout.num_servers + self.layout.num_workers, dtype=np.float64)
        self._signal_sent = False

    # ---- server 0 ---------------------------------------------------------------------------
    def initialize(self, *, warm_open: bool) -> BoardHeader:
        """Server 0, before any other rank touches the board: zero it, phase TRAINING, the warm-start
        gate as given (window memory from Win.Allocate starts undefined)."""
        board = self.windows.local_board()
        board[:] = 0
        board[Header.PHASE] = Phase.TRAINING
        board[Header.WARM_OPEN] = float(warm_open)
        self.windows.board.Sync()
        return BoardHeader(board[:HEADER_SIZE].copy())

    def set_header(self, header: BoardHeader, field: Header, value: float) -> None:
        """Publish one header field (server 0 only), and keep ``header`` in step with it."""
        header.values[field] = value
        self.client.write_board(field, header.values[field:field + 1].copy())

    def read_rows(self) -> WorkerRows:
        """Every worker's row (a view of one buffer, overwritten by the next read: copy to keep)."""
        self.client.read_board(HEADER_SIZE, len(self._rows), out=self._rows)
        return WorkerRows(self._rows, self.layout)

    def set_excluded(self, worker_index: int, excluded: bool) -> None:
        """Server 0: count worker ``worker_index`` out of (or back into) bounded staleness (it is dead)."""
        offset = self.layout.clocks_offset + self.layout.num_workers + worker_index
        self.client.write_board(offset, np.array([float(excluded)]))

    def read_signals(self) -> dict:
        """Server 0: {world rank: stop signal number} of the ranks that published one."""
        self.client.read_board(self.layout.signals_offset, len(self._signals), out=self._signals)
        return {int(rank): int(self._signals[rank]) for rank in np.flatnonzero(self._signals)}

    # ---- everybody ----------------------------------------------------------------------------
    def forward_signal(self, rank: int) -> None:
        """Publish the stop signal this process received, once (cheap to call often: nothing is sent
        before a signal): server 0 sees it on the board and stops the job."""
        signum = preemption.received()
        if signum is None or self._signal_sent:
            return
        self._signal_sent = True
        self.client.write_board(self.layout.signals_offset + rank, np.array([float(signum)]))

    def read_clocks(self) -> WorkerClocks:
        """Every worker's clock and exclusion flag, in one read."""
        self.client.read_board(self.layout.clocks_offset, 2 * self.layout.num_workers, out=self._clocks)
        return WorkerClocks(self._clocks[:self.layout.num_workers], self._clocks[self.layout.num_workers:] > 0)

    def read_header(self, header: BoardHeader | None = None) -> BoardHeader:
        """The header (into ``header`` when given)."""
        header = header or BoardHeader()
        self.client.read_board(0, HEADER_SIZE, out=header.values)
        return header

    # ---- a worker ------------------------------------------------------------------------------
    def report(self, row: WorkerReport, header: BoardHeader) -> BoardHeader:
        """Write ``row`` with its heartbeat advanced, and read the header into ``header`` in the same
        round trip."""
        row.add(RowField.HEARTBEAT)
        self.client.write_board(row.offset, row.values, read_offset=0, read_into=header.values)
        return header

    def publish_clock(self, worker_index: int, clock: float) -> None:
        """This worker's clock: the steps it has finished (``inf``: it holds nobody back any more)."""
        self.client.write_board(self.layout.clocks_offset + worker_index, np.array([float(clock)]))
