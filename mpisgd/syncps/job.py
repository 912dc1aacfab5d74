"""``--strategy sync-ps``: Downpour's job (windows, board, coordinator, dead-worker handling, the end of
the job) with the synchronous server of :mod:`mpisgd.syncps.server`, the worker of
:mod:`mpisgd.syncps.worker`, and the optimizer of ``--strategy sync``: momentum SGD at the learning rate
scaled linearly to the global batch (workers x --batch-size; Goyal et al.), weight decay added by the
workers. With ``--backup-workers 0`` it takes the steps ``--strategy sync`` takes on the same data.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mpisgd.comm import Communicator
from mpisgd.downpour.board import STOP_PENDING, BoardHeader, Header, StopReason, WorkerRows
from mpisgd.downpour.context import JobContext
from mpisgd.downpour.coordinator import Coordinator
from mpisgd.downpour.job import System, train_downpour
from mpisgd.downpour.rules import UpdateRule, make_rule
from mpisgd.downpour.server import ShardServer
from mpisgd.downpour.windows import Counter
from mpisgd.errors import SharedConfigError
from mpisgd.optim import scaled_lr
from mpisgd.syncps.server import SyncShardServer
from mpisgd.syncps.windows import SlotCounter, SlotWindows
from mpisgd.syncps.worker import SyncWorker
from mpisgd.training.config import TrainConfig

logger = logging.getLogger(__name__)

class SyncCoordinator(Coordinator):
    """Downpour's coordinator, counting steps as updates (not pushes) and logging what the slots saw."""

    def __init__(self, job: JobContext, server: ShardServer, header: BoardHeader) -> None:
        super().__init__(job, server, header)
        cfg = job.cfg
        self.eval_every = cfg.eval_every or job.num_batches  # an epoch is num_batches steps here
        self.checkpoint_every = cfg.checkpoint_every or job.num_batches
        self.next_eval = self.start_step + self.eval_every
        self.next_checkpoint = self.start_step + self.checkpoint_every

    def step(self) -> int:
        return self.start_step + int(self.server.counters()[Counter.VERSION])

    def _preempt(self) -> None:
        """Stop after a step every worker computes: STOP_PENDING first, then the newest shard version
        plus one. A worker that read the header before the first write pulled before it, so it computes
        for that step at most; one that sees STOP_PENDING waits for the step (:mod:`mpisgd.syncps.worker`).
        The phase stays TRAINING: the workers end as at the last step of --epochs."""
        self.stop_reason = StopReason.PREEMPTED
        self.board.set_header(self.header, Header.STOP_REASON, float(StopReason.PREEMPTED))
        self.board.set_header(self.header, Header.STOP_AT, STOP_PENDING)
        last = int(self.job.client.read_counters()[:, Counter.VERSION].max()) + 1
        self.board.set_header(self.header, Header.STOP_AT, float(last))
        logger.warning("sync-ps stops after step %d (the step every worker computes)", self.start_step + last)

    def slot_counts(self) -> dict:
        """Gradients applied and discarded, and the fewest and most in one update, over every shard."""
        counts = self.job.extension.read_counts()
        return {"gradients_applied": int(counts[:, SlotCounter.APPLIED].sum()),
                "late_gradients": int(counts[:, SlotCounter.LATE].sum()),
                "fewest_gradients_per_update": int(counts[:, SlotCounter.FEWEST].min()),
                "most_gradients_per_update": int(counts[:, SlotCounter.MOST].max())}

    def _log_metrics(self, rows: WorkerRows, step: int, **extra: Any) -> None:
        super()._log_metrics(rows, step, **self.slot_counts(), **extra)

    def _finish(self, shards: Any) -> dict:
        summary = super()._finish(shards)
        return {**summary, **self.slot_counts()}


def _workers(job: JobContext) -> int:
    return job.num_workers


def _rule(job: JobContext, size: int) -> UpdateRule:
    cfg = job.cfg
    lr = scaled_lr(cfg.lr, _workers(job) * cfg.batch_size, cfg.reference_batch)
    return make_rule("momentum", size, lr=lr, momentum=cfg.momentum)


def _server(job: JobContext, rule: UpdateRule, idle_sleep: float) -> ShardServer:
    return SyncShardServer(job.windows, rule, slots=job.extension, board=job.board,
                           backup_workers=job.cfg.backup_workers, idle_sleep_s=idle_sleep)


SYNC_PS = System(rule_name=lambda cfg: "momentum", make_rule=_rule, make_server=_server, worker=SyncWorker,
                 coordinator=SyncCoordinator, setup=lambda job: SlotWindows(job.windows), resumes=("sync-ps",))


def train_syncps(cfg: TrainConfig, comm: Communicator) -> dict:
    """Train per ``cfg`` (strategy sync-ps) on all ranks of ``comm``; the summary is Downpour's, with the
    steps counted as updates and the slot counts added."""
    workers = comm.size - cfg.servers
    problem = None
    if cfg.stages > 1 or cfg.tensor_parallel > 1:
        problem = "--strategy sync-ps trains whole replicas: --stages and --tensor-parallel must be 1"
    elif workers > 0 and cfg.backup_workers >= workers:
        problem = (f"--backup-workers {cfg.backup_workers} leaves no gradient to apply: {workers} worker(s) "
                   "(ranks minus --servers); it must be below that")
    if problem:
        raise SharedConfigError(problem)
    summary = train_downpour(cfg, comm, SYNC_PS)
    return {**summary, "backup_workers": cfg.backup_workers, "shard_versions": summary.get("shard_versions"),
            "lr": float(np.float32(scaled_lr(cfg.lr, max(workers, 1) * cfg.batch_size, cfg.reference_batch)))}
