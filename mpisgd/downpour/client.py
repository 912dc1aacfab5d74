"""A rank's one-sided access to the parameter-server shards: pull parameters, push gradients, read the
counters and the board. Used by workers, and by server 0 to assemble the model from all shards.

Every call completes its operations with ``Flush`` before returning, inside the ``Lock_all`` epoch the
windows opened once; no call ever waits for a lock, so a worker never waits for a busy server on the
shared-memory path (on the network path, an operation completes when the target next polls MPI).
Bad input (wrong length, dtype, non-finite values) raises on the calling rank before any RMA call, so
it can never reach a shard. Every target range (shard, displacement, length) is checked against what that
shard's server really exposes (:attr:`ParameterServerWindows.exposed`, exchanged at creation) before the
first ``Accumulate``: a push that would write outside its shard (a worker whose layout or model disagrees
with the servers', a bad partial push) is refused whole, counted in the shard's REFUSED counter and in
:attr:`ParameterClient.refused_pushes`, and raises `PushOutOfShardError`; the shard is untouched.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpisgd.downpour.windows import CLAIMS, CONTROL_SLOTS, PUSHES, REFUSED, VERSION, ParameterServerWindows
from mpisgd.errors import ConfigError, MpisgdError


class NonFinitePushError(MpisgdError, FloatingPointError):
    """A gradient to push holds NaN or Inf; nothing was sent."""


class PushOutOfShardError(MpisgdError, IndexError):
    """A push would have written outside a shard (displacement or length beyond what its server exposes);
    nothing of it was sent, and the refusal was counted."""


def out_of_shard(exposed: tuple, shard: object, offset: object, length: object) -> str | None:
    """Why writing ``length`` elements at ``offset`` of ``shard`` would leave the shard, else None.

    Args:
        exposed: elements each shard's server exposes (`ParameterServerWindows.exposed`).
    """
    if not isinstance(shard, (int, np.integer)) or not 0 <= shard < len(exposed):
        return f"shard {shard!r} does not exist (shards 0..{len(exposed) - 1})"
    if not isinstance(offset, (int, np.integer)) or not isinstance(length, (int, np.integer)):
        return f"displacement {offset!r} and length {length!r} must be ints"
    if offset < 0 or length < 0 or offset + length > exposed[shard]:
        return (f"elements {offset}..{offset + length - 1} are outside shard {shard}, which holds "
                f"{exposed[shard]} (0..{exposed[shard] - 1})")
    return None


class ParameterClient:
    """Pull parameters from and push gradients to every shard.

    Args:
        windows: the job's :class:`ParameterServerWindows` (this rank's side of them).
    """

    def __init__(self, windows: ParameterServerWindows) -> None:
        self.windows = windows
        self.layout = windows.layout
        self.num_params = self.layout.num_params
        self.num_shards = self.layout.num_shards
        self._slices = [self.layout.shard_slice(s) for s in range(self.num_shards)]
        self.pulled_versions = np.zeros(self.num_shards, dtype=np.int64)
        self._one_push = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._one_push[PUSHES] = 1
        self._counters = np.zeros((self.num_shards, CONTROL_SLOTS), dtype=np.int64)
        self._one = np.ones(1, dtype=np.int64)
        self._claimed = np.zeros(1, dtype=np.int64)
        self._ignored = np.zeros(CONTROL_SLOTS, dtype=np.int64)  # origin of NO_OP reads (unused by MPI)
        self._ignored_board = np.zeros(windows.board_layout.size, dtype=np.float64)
        self._one_refusal = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._one_refusal[REFUSED] = 1
        #: pushes this client refused because they would have written outside a shard
        self.refused_pushes = 0

    # ---- validation ---------------------------------------------------------------------------
    def check_vector(self, vector: object, what: str, *, finite: bool) -> np.ndarray:
        """``vector`` if it is a 1-D C-contiguous float32 numpy array of the model's length (and, with
        ``finite``, free of NaN/Inf); otherwise a specific error, before any communication."""
        if not isinstance(vector, np.ndarray):
            raise ConfigError(f"{what} must be a numpy array, got {type(vector).__name__}")
        if vector.dtype != np.float32:
            raise ConfigError(f"{what} must have dtype float32 (the shards' dtype), got {vector.dtype}")
        if vector.ndim != 1 or vector.shape[0] != self.num_params:
            raise ConfigError(f"{what} must be a flat vector of {self.num_params} elements (the model's "
                              f"parameters), got shape {vector.shape}")
        if not vector.flags.c_contiguous:
            raise ConfigError(f"{what} must be C-contiguous")
        if finite and not np.isfinite(vector).all():
            bad = int(np.count_nonzero(~np.isfinite(vector)))
            raise NonFinitePushError(f"{what} holds {bad} NaN/Inf value(s); not pushed")
        return vector

    def check_targets(self, targets: list[tuple[int, int, int]], what: str) -> None:
        """Refuse (count, then raise `PushOutOfShardError`) unless every (shard, displacement, length)
        lies inside its shard; called before the first RMA call of a push, so a refused push sends nothing."""
        for shard, offset, length in targets:
            problem = out_of_shard(self.windows.exposed, shard, offset, length)
            if problem:
                self.refused_pushes += 1
                self._count_refusal(shard)
                raise PushOutOfShardError(f"{what} refused, nothing sent: {problem}")

    def _count_refusal(self, shard: object) -> None:
        """One more in the REFUSED counter of ``shard`` (shard 0 when it does not exist): the control
        window, never the shard's data."""
        valid = isinstance(shard, (int, np.integer)) and 0 <= shard < self.num_shards
        rank = self.windows.server_rank(int(shard) if valid else 0)  # type: ignore[call-overload]
        self.windows.control.Accumulate([self._one_refusal, MPI.INT64_T], rank, (0, CONTROL_SLOTS, MPI.INT64_T),
                                        op=MPI.SUM)
        self.windows.control.Flush(rank)

    # ---- parameters and gradients ---------------------------------------------------------------
    def pull_parameters(self, out: np.ndarray, *, as_reference: bool = True) -> np.ndarray:
        """Read every shard's current parameters into ``out`` (float32, the model's length).

        Args:
            out: the buffer to fill.
            as_reference: remember the versions read as the reference of the next push's staleness
                (False for DC-ASGD's fresh pull right before a push, whose gradient is older).

        Returns:
            The shards' versions (updates applied) read along with the parameters.
        """
        self.check_vector(out, "pull buffer", finite=False)
        win = self.windows
        for shard, where in enumerate(self._slices):
            rank = win.server_rank(shard)
            win.control.Fetch_and_op(self._ignored[:1], self._counters[shard, VERSION:VERSION + 1], rank,
                                     VERSION, op=MPI.NO_OP)
            win.params.Get([out[where], MPI.FLOAT], rank, (0, where.stop - where.start, MPI.FLOAT))
        for shard in range(self.num_shards):
            rank = win.server_rank(shard)
            win.control.Flush(rank)
            win.params.Flush(rank)
        versions = self._counters[:, VERSION].copy()
        if as_reference:
            self.pulled_versions[:] = versions
        return versions

    def push_gradients(self, grads: np.ndarray) -> np.ndarray:
        """Add ``grads`` (float32, the model's length, finite) to every shard's accumulation buffer.

        The gradient is complete at the servers before the push is counted, so a server that sees the
        count also sees the gradient.

        Returns:
            Staleness per shard: updates that shard applied between this rank's last pull and this push.

        Raises:
            ConfigError: wrong type, dtype or length; NonFinitePushError: NaN/Inf; PushOutOfShardError:
                the layout disagrees with what a server exposes. Nothing is sent then.
        """
        self.check_vector(grads, "gradient", finite=True)
        self.check_targets([(shard, 0, where.stop - where.start) for shard, where in enumerate(self._slices)],
                           "gradient push")
        win = self.windows
        for shard, where in enumerate(self._slices):
            win.grads[shard].Accumulate([grads[where], MPI.FLOAT], win.server_rank(shard),
                                        (0, where.stop - where.start, MPI.FLOAT), op=MPI.SUM)
        for shard in range(self.num_shards):
            win.grads[shard].Flush(win.server_rank(shard))
        for shard in range(self.num_shards):
            win.control.Get_accumulate([self._one_push, MPI.INT64_T], [self._counters[shard], MPI.INT64_T],
                                       win.server_rank(shard), (0, CONTROL_SLOTS, MPI.INT64_T), op=MPI.SUM)
        for shard in range(self.num_shards):
            win.control.Flush(win.server_rank(shard))
        return self._counters[:, VERSION] - self.pulled_versions

    def push_range(self, shard: int, offset: int, values: np.ndarray) -> None:
        """Add ``values`` (float32, finite) to elements ``offset..offset+len-1`` of ``shard``'s accumulation
        buffer and count one push there: for pieces of a model that live in one shard.

        Raises:
            ConfigError, NonFinitePushError, PushOutOfShardError (counted): nothing is sent then.
        """
        if not isinstance(values, np.ndarray) or values.ndim != 1:
            raise ConfigError(f"a range push takes a flat numpy vector, got {type(values).__name__}")
        if values.dtype != np.float32 or not values.flags.c_contiguous:
            raise ConfigError(f"a range push takes C-contiguous float32, got {values.dtype}")
        if not np.isfinite(values).all():
            raise NonFinitePushError(f"range push holds {int((~np.isfinite(values)).sum())} NaN/Inf value(s); "
                                     "not pushed")
        self.check_targets([(shard, offset, len(values))], "range push")
        win, rank = self.windows, self.windows.server_rank(shard)
        win.grads[shard].Accumulate([values, MPI.FLOAT], rank, (int(offset), len(values), MPI.FLOAT), op=MPI.SUM)
        win.grads[shard].Flush(rank)
        win.control.Get_accumulate([self._one_push, MPI.INT64_T], [self._counters[shard], MPI.INT64_T], rank,
                                   (0, CONTROL_SLOTS, MPI.INT64_T), op=MPI.SUM)
        win.control.Flush(rank)

    # ---- counters and board ---------------------------------------------------------------------
    def claim_step(self) -> int:
        """Claim one training step of the job's shared budget; returns how many were claimed before
        (atomic fetch-and-add on shard 0), so exactly ``budget`` steps are handed out in total, to
        whichever workers are fastest."""
        win = self.windows
        rank = win.server_rank(0)
        win.control.Fetch_and_op(self._one, self._claimed, rank, CLAIMS, op=MPI.SUM)
        win.control.Flush(rank)
        return int(self._claimed[0])

    def read_counters(self) -> np.ndarray:
        """Every shard's control counters, shape (shards, CONTROL_SLOTS): VERSION, PUSHES, REJECTED, CLAIMS,
        REFUSED."""
        win = self.windows
        for shard in range(self.num_shards):
            win.control.Get_accumulate([self._ignored, MPI.INT64_T], [self._counters[shard], MPI.INT64_T],
                                       win.server_rank(shard), (0, CONTROL_SLOTS, MPI.INT64_T), op=MPI.NO_OP)
        for shard in range(self.num_shards):
            win.control.Flush(win.server_rank(shard))
        return self._counters.copy()

    def read_board(self, offset: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """``count`` float64 values of server 0's board from ``offset`` (atomic per element)."""
        out = np.empty(count, dtype=np.float64) if out is None else out
        win = self.windows
        win.board.Get_accumulate([self._ignored_board[:count], MPI.DOUBLE], [out, MPI.DOUBLE], win.board_rank,
                                 (offset, count, MPI.DOUBLE), op=MPI.NO_OP)
        win.board.Flush(win.board_rank)
        return out

    def write_board(self, offset: int, values: np.ndarray, *, read_offset: int = 0,
                    read_into: np.ndarray | None = None) -> None:
        """Overwrite board values from ``offset`` (atomic per element); optionally read another range
        in the same round trip (a worker's heartbeat also fetches the header)."""
        win = self.windows
        win.board.Accumulate([values, MPI.DOUBLE], win.board_rank, (offset, len(values), MPI.DOUBLE),
                             op=MPI.REPLACE)
        if read_into is not None:
            win.board.Get_accumulate([self._ignored_board[:len(read_into)], MPI.DOUBLE],
                                     [read_into, MPI.DOUBLE], win.board_rank,
                                     (read_offset, len(read_into), MPI.DOUBLE), op=MPI.NO_OP)
        win.board.Flush(win.board_rank)
