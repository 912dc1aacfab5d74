"""A sync-ps worker: wait until the shards have passed the step of its last gradient, pull (consistently),
compute one gradient on its next batch, write it into its slot tagged with the step it was computed for.

A worker that was late (its gradient was not among the first N-b) simply goes on from the newest
parameters: it never computes twice for one step, and never for a step already applied. The job ends for
a worker once the shards have applied ``--epochs`` x (batches per worker) steps, or ``--max-steps``.
Everything else (board, heartbeat, warm start, the end of the job) is the Downpour worker's.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from mpisgd import faults
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.downpour.board import STOP_PENDING, BoardHeader, Phase, RowField, WorkerState
from mpisgd.downpour.context import JobContext
from mpisgd.downpour.windows import Counter
from mpisgd.downpour.worker import REPORT_WHILE_WAITING_S, Worker, _endless

logger = logging.getLogger(__name__)

FIRST_WAIT_S = 1e-4  # a worker waiting for its step looks again this soon, then ever less often
LONGEST_WAIT_S = 2e-3  # the step's latency once everybody is there


def total_steps(job: JobContext) -> int:
    """Steps of the whole job (updates of every shard)."""
    steps = job.cfg.epochs * job.num_batches
    return min(steps, job.cfg.max_steps) if job.cfg.max_steps is not None else steps


class SyncWorker(Worker):
    """One model replica of a sync-ps job."""

    def __init__(self, job: JobContext, *, fault: Optional[faults.WorkerFault] = None) -> None:
        super().__init__(job, fault=fault)
        self.slots = job.extension
        # the shards count their versions from 0 in every run: the steps of this run, after a resume
        self.total_steps = total_steps(job) - int(job.resumed.get("step", 0))
        self.pushed = np.zeros(job.layout.num_shards, dtype=np.int64)  # step of the last push, per shard
        self.zeros = np.zeros_like(self.grads)

    def wait_for_the_step(self) -> BoardHeader:
        """Until every shard has passed the step of this worker's last gradient (reporting meanwhile)."""
        def passed() -> bool:
            versions = self.client.read_counters()[:, Counter.VERSION]
            return self.report().phase != Phase.TRAINING or bool((versions >= self.pushed).all())

        if self.pushed.any():
            wait_until(passed, what="the step to complete",
                       backoff=Backoff(first=FIRST_WAIT_S, longest=min(LONGEST_WAIT_S, REPORT_WHILE_WAITING_S)))
        return self.header

    def last_step(self) -> int:
        """The step after which this run ends: the job's last, or the one server 0 chose when a stop
        signal came (read after the pull, waiting while server 0 is choosing it; see
        :meth:`mpisgd.syncps.job.SyncCoordinator._preempt`)."""
        stop_at = self.board.read_header(self.header).stop_at
        if stop_at == STOP_PENDING:
            stop_at = self.report_until(lambda h: h.stop_at != STOP_PENDING).stop_at
        return min(self.total_steps, int(stop_at)) if stop_at > 0 else self.total_steps

    def train(self, header: BoardHeader) -> WorkerState:
        for x, y in _endless(self.job.data.train):
            header = self.wait_for_the_step()
            if header.phase != Phase.TRAINING:
                break
            versions = self.slots.pull_consistent(self.client, self.pulled)
            if versions.min() >= self.last_step():
                break
            if self.job.device != "cpu":
                self.flat.copy_(torch.from_numpy(self.pulled))
            loss = self.compute_gradient(x, y)
            self.step += 1
            if self.fault and self.fault.corrupts_gradient(self.step):
                self.grads[0] = np.nan
            gradient = self.grads
            if np.isfinite(self.grads).all():
                self.row.add(RowField.LOSS_SUM, loss)
                self.row.add(RowField.LOSS_COUNT)
            elif self.nonfinite_stops("this worker"):
                return WorkerState.FAILED
            else:
                gradient = self.zeros  # skipped: counts as a zero gradient in its step's mean
            self.pushed = versions + 1
            self.slots.push(self.index, gradient, self.pushed)
            self.row.add(RowField.PUSHES)
            if self.finish_step():
                break
        return WorkerState.DONE
