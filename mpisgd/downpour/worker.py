"""A Downpour worker: one model replica running Downpour's client loop (Dean et al. 2012, 'Downpour SGD
client'): pull every ``--n-fetch`` steps, compute a gradient, accrue it, take a local SGD step between
fetches, push the accrued gradient every ``--n-push`` steps (DC-ASGD: compensated for its delay first).

With ``--max-staleness s`` (bounded staleness, Ho et al. 2013) the worker publishes its clock (steps
finished) after every step and does not start step t+s+1 before every live worker has finished step t:
it waits in :meth:`Worker.wait_for_the_slowest`, reporting its heartbeat, sleeping between looks. A
worker done, failed, or counted dead by the coordinator holds nobody back.

The worker claims each training step from the job's shared budget, reports to the board after every
step (its heartbeat, with the header read back in the same round trip) and stops when the budget is
used up, at ``--max-steps``, or when the coordinator's phase says so. An exception in the loop is
reported (state FAILED) and survived: the job goes on without this replica.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mpisgd import faults
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.downpour.board import BoardHeader, Phase, RowField, WorkerReport, WorkerState
from mpisgd.downpour.client import NonFinitePushError
from mpisgd.downpour.context import JobContext
from mpisgd.downpour.delay_compensation import DelayCompensation
from mpisgd.training.config import TrainConfig

logger = logging.getLogger(__name__)

REPORT_WHILE_WAITING_S = 0.01  # waiting workers (warm start, end of job) report this often
SSP_FIRST_WAIT_S = 1e-4  # a worker held by --max-staleness looks again this soon, then ever less often


def _endless(train: Iterable) -> Iterator:
    """Batches of the worker's data shard, epoch after epoch (the position advances as they are taken)."""
    while True:
        yield from train


class GradientAccrual:
    """What a Downpour client (a worker, or one partition of a split replica) keeps between pushes: its
    gradient, the sum accrued since the last push, and DC-ASGD's compensation with its vectors."""

    cfg: TrainConfig
    row: WorkerReport
    step: int

    def init_accrual(self, n: int) -> None:
        """The buffers for ``n`` parameters (this client's part of the model)."""
        self.grads = np.zeros(n, dtype=np.float32)
        self.accrued = np.zeros(n, dtype=np.float32)
        self.accrued_steps = 0
        self.fetched = False
        self.compensation: Optional[DelayCompensation] = None
        if self.cfg.strategy == "dcasgd":
            self.compensation = DelayCompensation(n, lam=self.cfg.dc_lambda, variant=self.cfg.dc_variant,
                                                  momentum=self.cfg.dc_momentum)
            # w_reference: the parameters this push's gradient was computed at (the Taylor point)
            self.w_reference, self.w_now = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
            self.compensated = np.zeros(n, dtype=np.float32)

    def fetch_due(self) -> bool:
        """Whether this step starts with a pull: every --n-fetch steps, and always this process's first
        (a resumed client's step need not be a multiple of --n-fetch; it holds no parameters yet)."""
        due = not self.fetched or self.step % self.cfg.n_fetch == 0
        self.fetched = True
        return due

    def accrue_at(self, local: np.ndarray, loss: float) -> None:
        """Add this step's (finite) gradient, computed at ``local`` (this client's parameters), to what the
        next push sends; with --n-fetch > 1, Downpour's local step on ``local``."""
        if self.compensation is not None and self.accrued_steps == 0:
            # with --n-fetch > 1 the client has stepped locally since its pull: the gradient was computed
            # here, not at the pulled parameters (later ones of an --n-push accrual at nearby points)
            self.w_reference[:] = local
        self.accrued += self.grads
        self.accrued_steps += 1
        if self.cfg.n_fetch > 1:  # Downpour's local step between fetches
            local -= np.float32(self.cfg.lr) * self.grads
        self.row.add(RowField.LOSS_SUM, loss)
        self.row.add(RowField.LOSS_COUNT)

    def nonfinite_stops(self, what: str) -> bool:
        """Count this step's non-finite gradient; True with --on-nonfinite stop: ``what`` (this client's
        part of the job) stops, and the job with it."""
        self.row.add(RowField.NONFINITE)
        if self.cfg.on_nonfinite != "stop":
            return False
        logger.error("step %d: non-finite gradient; %s stops and the job with it (use --on-nonfinite skip to "
                     "skip such steps)", self.step, what)
        self.row.set(RowField.FAILED_STEP, self.step)
        self.row.set(RowField.STEPS, self.step)
        return True


class Worker(GradientAccrual):
    """One model replica of the job ``job``; :meth:`run` trains and returns the job's outcome."""

    def __init__(self, job: JobContext, *, fault: Optional[faults.WorkerFault] = None) -> None:
        self.job, self.cfg, self.client, self.board = job, job.cfg, job.client, job.board
        self.index = job.roles.worker_index(job.comm.rank)
        self.step = job.resumed_replica_steps(job.num_workers)[self.index]
        train = job.data.train
        train.epoch, train.batch = job.resumed_position(self.step)
        n = job.layout.num_params
        # the model's parameters are views into one flat vector, which pulls overwrite in place
        self.pulled = np.zeros(n, dtype=np.float32)
        if job.device == "cpu":
            self.flat = torch.from_numpy(self.pulled)
        else:
            self.flat = torch.zeros(n, device=job.device)
        offset = 0
        for p in job.model.parameters():
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.params = list(job.model.parameters())
        self.init_accrual(n)
        self.row = WorkerReport(job.board.layout, self.index, steps=self.step)
        self.header = BoardHeader()
        self.fault = fault

    # ---- the board ----------------------------------------------------------------------------
    def report(self) -> BoardHeader:
        """Write this worker's row (its heartbeat, batch-norm statistics included) and read the header;
        a stop signal this process received goes to server 0 first."""
        self.board.forward_signal(self.job.comm.rank)
        if self.job.buffers:
            self.row.set_buffers(np.concatenate([b.detach().reshape(-1).cpu().numpy()
                                                 for b in self.job.buffers]))
        return self.board.report(self.row, self.header)

    def report_until(self, done: Any) -> BoardHeader:
        """Keep reporting (the coordinator must go on seeing this worker alive) until ``done(header)``."""
        wait_until(lambda: done(self.report()), what="the coordinator",
                   backoff=Backoff(first=REPORT_WHILE_WAITING_S, longest=REPORT_WHILE_WAITING_S))
        return self.header

    # ---- bounded staleness --------------------------------------------------------------------------
    def publish_clock(self, finished: bool = False) -> None:
        """This worker's clock for bounded staleness (``finished``: it holds nobody back any more)."""
        self.board.publish_clock(self.index, float("inf") if finished else self.step)

    def wait_for_the_slowest(self) -> BoardHeader:
        """--max-staleness s: before step ``self.step + 1``, wait (reporting, sleeping between looks; a
        fast worker waits politely, it does not spin) until every live worker has finished step
        ``self.step - s``, or the job leaves its training phase. The warm-start replica is not held
        while it trains alone; after the gate opens it waits for the others to come within s steps."""
        staleness = self.cfg.max_staleness
        needed = self.step - staleness
        if staleness is None or needed <= 0 or not self.header.warm_open:  # warm start: this replica is alone
            return self.header
        if self.board.read_clocks().slowest() >= needed:
            return self.header

        def caught_up() -> bool:
            return self.report().phase != Phase.TRAINING or self.board.read_clocks().slowest() >= needed

        wait_until(caught_up, what="the slowest worker",
                   backoff=Backoff(first=SSP_FIRST_WAIT_S, longest=REPORT_WHILE_WAITING_S))
        return self.header

    # ---- parameters and gradients --------------------------------------------------------------
    def pull_parameters(self) -> None:
        self.client.pull_parameters(self.pulled)
        if self.job.device != "cpu":
            self.flat.copy_(torch.from_numpy(self.pulled))

    def push_gradients(self) -> None:
        gradient = self.accrued
        if self.compensation is not None:  # w_now: a fresh pull right before the push
            self.client.pull_parameters(self.w_now, as_reference=False)
            gradient = self.compensation.compensate(self.accrued, self.w_now, self.w_reference,
                                                    out=self.compensated)
        try:
            staleness = self.client.push_gradients(gradient)
            self.row.add(RowField.PUSHES)
            self.row.count_staleness(staleness)
        except NonFinitePushError:  # a finite gradient can still compensate to Inf: never pushed, counted
            self.row.add(RowField.NONFINITE)
        self.accrued[:] = 0
        self.accrued_steps = 0

    def compute_gradient(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Into self.grads (weight decay included); returns the loss."""
        x, y = x.to(self.job.device), y.to(self.job.device)
        loss = F.cross_entropy(self.job.model(x), y)
        for p in self.params:
            p.grad = None
        loss.backward()
        self.grads[:] = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None]) \
            .detach().cpu().numpy()
        if self.cfg.weight_decay:
            self.grads += np.float32(self.cfg.weight_decay) * self.pulled
        return float(loss.detach())

    def accrue(self, loss: float) -> None:
        """Add this step's (finite) gradient to what the next push sends; Downpour's local step."""
        self.accrue_at(self.pulled, loss)
        if self.cfg.n_fetch > 1 and self.job.device != "cpu":
            self.flat.copy_(torch.from_numpy(self.pulled))

    def finish_step(self) -> bool:
        """After a step: its count and clock published, the report made (the header read into
        ``self.header``); the test hooks strike here (``MPISGD_TEST_SIGNAL_AT``: this rank signals itself
        after a known step). True: a test fault ends this worker's training."""
        self.row.set(RowField.STEPS, self.step)
        self.publish_clock()
        if self.job.signal_fault is not None:
            self.job.signal_fault.strike(self.step)
        self.report()
        return bool(self.fault and self.fault.strike(self.step))

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, header: BoardHeader) -> WorkerState:
        """Train until the job's step budget is used up, --max-steps, or the coordinator says stop;
        returns the state to report (DONE or FAILED)."""
        cfg = self.cfg
        budget = self.job.step_budget
        for x, y in _endless(self.job.data.train):
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            if cfg.max_staleness is not None and header.phase == Phase.TRAINING:
                header = self.wait_for_the_slowest()
            if header.phase != Phase.TRAINING or self.client.claim_step() >= budget:
                break
            if self.fetch_due():
                self.pull_parameters()
            loss = self.compute_gradient(x, y)
            self.step += 1
            if self.fault and self.fault.corrupts_gradient(self.step):
                self.grads[0] = np.nan
            if np.isfinite(self.grads).all():
                self.accrue(loss)
            elif self.nonfinite_stops("this worker"):
                return WorkerState.FAILED
            if self.step % cfg.n_push == 0 and self.accrued_steps:
                self.push_gradients()
            if self.finish_step():
                break
            header = self.header
        if self.accrued_steps:
            self.push_gradients()
        return WorkerState.DONE

    def run(self) -> dict:
        """Wait for the warm start (workers after the first), train, report the end, and wait until
        the coordinator has finished the job; returns the job's outcome as the board tells it."""
        self.publish_clock()
        header = self.report()
        if self.index > 0:  # warm start: the first replica trains alone
            header = self.report_until(lambda h: h.warm_open or h.phase != Phase.TRAINING)
        try:
            state = self.train(header)
        except Exception:  # noqa: BLE001 -- a failing worker must not take the job down: report it, leave
            logger.exception("worker failed; the job goes on without it")
            self.row.set(RowField.FAILED_STEP, self.step)
            state = WorkerState.FAILED
        self.row.set(RowField.STEPS, self.step)
        self.row.set(RowField.STATE, state)
        self.publish_clock(finished=True)
        header = self.report_until(lambda h: h.phase == Phase.FINISHED)
        return {"steps": self.step, "stopped": header.stop_reason.label, "exit_code": header.exit_code,
                "abort": header.abort}
