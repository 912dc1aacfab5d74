"""A partition's own slice of the parameter server: pull and push only the elements its stage (and split) holds.

DistBelief (Dean et al. 2012, Fig. 2): "each machine [of a model replica] needs to communicate with just the
subset of parameter server shards that hold the model parameters relevant to its partition". Here a
partition (one rank of a split replica) reads its :class:`~mpisgd.modelparallel.slices.Piece` ranges from
the shards holding them with ``Get`` on the job's parameter window, and adds its gradient to them with
``Accumulate(SUM)`` on the shards' accumulation windows, exactly as :class:`~mpisgd.downpour.ParameterClient`
does for the whole vector (same windows, same one ``Lock_all`` epoch, a ``Flush`` per operation); only the
shards it touches count its push, and its staleness is theirs.

Read your own pushes: before a pull, a partition waits until the shards it pushed to have applied its
previous push (:class:`AppliedPushes`, published by :class:`PartitionShardServer`). Without it the stages
of one replica would compute on a nondeterministic mix (stage 0 with its last update applied, stage 1
without); with it, one replica with ``--server-rule sgd`` and ``--n-fetch 1 --n-push 1`` is plain SGD step
for step, and the staleness a partition sees counts other replicas' updates only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
from mpi4py import MPI

from mpisgd.comm.blocking import blocking_collective
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.downpour.client import NonFinitePushError
from mpisgd.downpour.rules import UpdateRule
from mpisgd.downpour.server import ShardServer
from mpisgd.downpour.windows import CONTROL_SLOTS, PUSHES, VERSION, ParameterServerWindows, window_array
from mpisgd.modelparallel.slices import Piece
from mpisgd.training.layout import ShardLayout

OWN_PUSH_FIRST_SLEEP_S = 2e-5
OWN_PUSH_LONGEST_SLEEP_S = 5e-4


class Transfer(NamedTuple):
    """One RMA operation: ``length`` elements at ``offset`` of ``shard``, at ``local`` of the partition's vector."""

    shard: int
    offset: int
    local: int
    length: int


def transfers(pieces: list[Piece], layout: ShardLayout, *, pushed_only: bool) -> list[Transfer]:
    """The pieces cut at shard boundaries: what a pull (or, with ``pushed_only``, a push) moves."""
    bounds = layout.bounds
    out = []
    for piece in pieces:
        if pushed_only and not piece.pushed:
            continue
        start, stop = piece.start, piece.start + piece.length
        for shard in range(layout.num_shards):
            lo, hi = max(start, bounds[shard]), min(stop, bounds[shard + 1])
            if lo < hi:
                out.append(Transfer(shard, lo - bounds[shard], piece.local + lo - start, hi - lo))
    return out


class AppliedPushes:
    """Per server, one int64 counter: the pushes its last applied update included (collective to create).

    Args:
        comm: every rank of the job; duplicated.
        servers: world ranks of the shards, in shard order.
    """

    def __init__(self, comm: MPI.Intracomm, servers: tuple) -> None:
        self.servers = servers
        info = MPI.Info.Create({"which_accumulate_ops": "replace,no_op"})
        try:
            with blocking_collective("model-parallel parameter server: create the counters' window"):
                self.comm = comm.Dup()
                own = 1 if self.comm.Get_rank() in servers else 0
                self.win = MPI.Win.Allocate(own * 8, 8, info=info, comm=self.comm)
        finally:
            info.Free()
        self.win.Lock_all(MPI.MODE_NOCHECK)
        if own:  # before any reader: the job's setup ends with a barrier
            window_array(self.win, np.int64)[:] = 0
            self.win.Sync()
        self._value = np.zeros(1, dtype=np.int64)
        self._ignored = np.zeros(1, dtype=np.int64)
        self._freed = False

    def publish(self, shard: int, pushes: int) -> None:
        """Server ``shard``: its update that included the first ``pushes`` pushes is applied."""
        rank = self.servers[shard]
        self._value[0] = pushes
        self.win.Accumulate([self._value, MPI.INT64_T], rank, (0, 1, MPI.INT64_T), op=MPI.REPLACE)
        self.win.Flush(rank)

    def read(self, shard: int) -> int:
        rank = self.servers[shard]
        out = np.zeros(1, dtype=np.int64)
        self.win.Get_accumulate([self._ignored, MPI.INT64_T], [out, MPI.INT64_T], rank, (0, 1, MPI.INT64_T),
                                op=MPI.NO_OP)
        self.win.Flush(rank)
        return int(out[0])

    def free(self) -> None:
        """Collective: end the epoch and free the window."""
        if self._freed or MPI.Is_finalized():
            return
        self.win.Unlock_all()
        with blocking_collective("model-parallel parameter server: free the counters' window"):
            self.win.Free()
        self.comm.Free()
        self._freed = True


class PartitionShardServer(ShardServer):
    """A :class:`~mpisgd.downpour.ShardServer` that also publishes how many pushes its updates have applied,
    so that a partition can wait for its own push before its next pull."""

    def __init__(self, windows: ParameterServerWindows, rule: UpdateRule, applied: AppliedPushes,
                 **options: float) -> None:
        super().__init__(windows, rule, **options)  # type: ignore[arg-type]
        self.applied = applied
        self._taken_pushes = 0

    def take_gradients(self) -> np.ndarray:
        taken = super().take_gradients()
        self._taken_pushes = self.pushes_seen  # every push counted before the take is in it
        return taken

    def apply_update(self) -> bool:
        changed = super().apply_update()
        self.applied.publish(self.shard, self._taken_pushes)  # rejected or all-zero sums are handled too
        return changed


class PartitionClient:
    """Pull and push one partition's pieces of the flat parameter vector.

    Args:
        windows: the job's windows.
        pieces: what this partition holds (:func:`~mpisgd.modelparallel.slices.partition_pieces`).
        applied: the servers' applied-push counters.
        timeout: seconds a pull may wait for the partition's own previous push to be applied.
    """

    def __init__(self, windows: ParameterServerWindows, pieces: list[Piece], applied: AppliedPushes, *,
                 timeout: Optional[float] = None) -> None:
        self.windows, self.applied, self.timeout = windows, applied, timeout
        self.size = sum(p.length for p in pieces)
        self.pulls = transfers(pieces, windows.layout, pushed_only=False)
        self.pushes = transfers(pieces, windows.layout, pushed_only=True)
        self.pull_shards = sorted({t.shard for t in self.pulls})
        self.push_shards = sorted({t.shard for t in self.pushes})
        self.pushed_mask = np.zeros(self.size, dtype=bool)
        for t in self.pushes:
            self.pushed_mask[t.local:t.local + t.length] = True
        self.pulled_versions = np.zeros(windows.layout.num_shards, dtype=np.int64)
        self._awaited = np.zeros(windows.layout.num_shards, dtype=np.int64)  # our last push's number per shard
        self._counters = np.zeros((windows.layout.num_shards, CONTROL_SLOTS), dtype=np.int64)
        self._one_push = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._one_push[PUSHES] = 1
        self._ignored = np.zeros(CONTROL_SLOTS, dtype=np.int64)

    def _check(self, vector: np.ndarray, what: str) -> None:
        if not (isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (self.size,)
                and vector.flags.c_contiguous):
            raise ValueError(f"{what} must be a C-contiguous float32 vector of this partition's {self.size} "
                             f"elements, got {getattr(vector, 'dtype', type(vector))} {getattr(vector, 'shape', '')}")

    def wait_for_own_push(self) -> None:
        """Wait (politely, with the deadline) until every shard has applied this partition's last push."""
        def applied() -> bool:
            return all(self.applied.read(shard) >= self._awaited[shard] for shard in self.push_shards)
        wait_until(applied, timeout=self.timeout, what="the shards applying this partition's last push",
                   backoff=Backoff(first=OWN_PUSH_FIRST_SLEEP_S, longest=OWN_PUSH_LONGEST_SLEEP_S))

    def pull(self, out: np.ndarray, *, as_reference: bool = True) -> np.ndarray:
        """Read this partition's pieces from their shards into ``out``; returns the versions read (per shard;
        0 for shards it does not touch). ``as_reference``: staleness of the next push counts from here."""
        self._check(out, "pull buffer")
        self.wait_for_own_push()
        win = self.windows
        for shard in self.pull_shards:
            win.control.Fetch_and_op(self._ignored[:1], self._counters[shard, VERSION:VERSION + 1],
                                     win.server_rank(shard), VERSION, op=MPI.NO_OP)
        for t in self.pulls:
            win.params.Get([out[t.local:t.local + t.length], MPI.FLOAT], win.server_rank(t.shard),
                           (t.offset, t.length, MPI.FLOAT))
        for shard in self.pull_shards:
            win.control.Flush(win.server_rank(shard))
            win.params.Flush(win.server_rank(shard))
        versions = self._counters[:, VERSION].copy()
        if as_reference:
            self.pulled_versions[:] = versions
        return versions

    def push(self, grads: np.ndarray) -> np.ndarray:
        """Add the pushed pieces of ``grads`` to their shards' accumulation buffers, then count the push.

        Returns:
            Staleness per shard pushed to: updates it applied between this partition's pull and this push.

        Raises:
            NonFinitePushError: a pushed element is NaN/Inf; nothing was sent.
        """
        self._check(grads, "gradient")
        if not np.isfinite(grads[self.pushed_mask]).all():
            raise NonFinitePushError(f"the partition's gradient holds {int((~np.isfinite(grads)).sum())} "
                                     "NaN/Inf value(s); not pushed")
        win = self.windows
        for t in self.pushes:
            win.grads[t.shard].Accumulate([grads[t.local:t.local + t.length], MPI.FLOAT], win.server_rank(t.shard),
                                          (t.offset, t.length, MPI.FLOAT), op=MPI.SUM)
        for shard in self.push_shards:
            win.grads[shard].Flush(win.server_rank(shard))
        for shard in self.push_shards:  # counted only once complete at the shard: a server seeing it sees it all
            win.control.Get_accumulate([self._one_push, MPI.INT64_T], [self._counters[shard], MPI.INT64_T],
                                       win.server_rank(shard), (0, CONTROL_SLOTS, MPI.INT64_T), op=MPI.SUM)
        for shard in self.push_shards:
            win.control.Flush(win.server_rank(shard))
            self._awaited[shard] = self._counters[shard, PUSHES] + 1
        return np.array([self._counters[s, VERSION] - self.pulled_versions[s] for s in self.push_shards])
