"""Downpour SGD and DC-ASGD with split model replicas (DistBelief, Dean et al. 2012, Figs. 1-2).

World = S servers + R replicas x K stages x T splits: ranks 0..S-1 serve the shards of the *unsplit* model's
flat parameter vector (as in :mod:`mpisgd.downpour`), and each following group of K*T ranks is one model
replica, split as :class:`~mpisgd.modelparallel.ModelParallel` splits it (rank ``S + (a*K + s)*T + t``
holds split t of stage s of replica a). Each partition pulls and pushes only its own slice of the vector,
from and to the shards holding it (:mod:`mpisgd.modelparallel.partition_client`); the replicas never wait
for each other, the partitions of one replica meet in the pipeline every step.

What is reused unchanged: the windows, the job board and its heartbeats (one row per partition), the shard
servers (:class:`~mpisgd.modelparallel.partition_client.PartitionShardServer` also publishes the pushes it
applied), server 0's :class:`~mpisgd.downpour.coordinator.Coordinator` (liveness, warm start, evaluation
of the unsplit model, checkpoints and ``final.h5`` with the unsplit names, metrics) and the end of the job.
What is per replica: the first partition (stage 0, split 0) claims each step from the job's budget, and
the partitions agree on going on with a small nonblocking all-reduce over their replica only.

Failures: a partition that raises ends its replica's step on every rank of the replica together (the
failure channel of ``ModelParallel``); a partition that hangs makes its neighbours give up after a quarter
of ``--worker-timeout``. Either way every rank of that replica reports FAILED on its row and the other
replicas go on; a hung rank is counted dead by the coordinator as in Downpour. The metrics add, per
partition, its mean staleness and histogram (``partitions``, ``partition_staleness_mean``,
``partition_staleness_hist``: one entry per worker rank, in rank order).

Test-only fault: ``MPISGD_TEST_WORKER_FAULT=rank:step:action`` (:class:`mpisgd.faults.WorkerFault`) strikes
inside that partition's step ``step`` (before its first forward), so ``raise`` is a partition dying mid-step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpisgd import faults
from mpisgd.comm import Communicator
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.data.sharding import samples_per_rank
from mpisgd.downpour.board import (
    STALENESS_BINS,
    BoardHeader,
    JobBoard,
    Phase,
    RowField,
    WorkerReport,
    WorkerRows,
    WorkerState,
)
from mpisgd.downpour.client import NonFinitePushError, ParameterClient
from mpisgd.downpour.context import JobContext
from mpisgd.downpour.coordinator import Coordinator, follow_coordinator
from mpisgd.downpour.delay_compensation import DelayCompensation
from mpisgd.downpour.job import assign_roles, finish_job, load_resume_state, restore_rule_state, server_pacing
from mpisgd.downpour.rules import make_rule
from mpisgd.downpour.server import lower_cpu_priority, network_path
from mpisgd.downpour.windows import ParameterServerWindows
from mpisgd.downpour.worker import GradientAccrual
from mpisgd.errors import ConfigError, SharedConfigError
from mpisgd.modelparallel.grid import GridShape
from mpisgd.modelparallel.model_parallel import ModelParallel
from mpisgd.modelparallel.partition_client import AppliedPushes, PartitionClient, PartitionShardServer
from mpisgd.modelparallel.slices import partition_pieces
from mpisgd.modelparallel.trainer import ModelParallelSettings
from mpisgd.models import build_model
from mpisgd.training.layout import Roles, ShardLayout
from mpisgd.training.loop import open_datasets

logger = logging.getLogger(__name__)

PIPELINE_TIMEOUT_FRACTION = 0.25  # of --worker-timeout: a neighbour waited on that long is given up
REPORT_WHILE_WAITING_S = 0.01


def _float_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]


def _buffer_offsets(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{float buffer name: (offset, numel)} in the board rows' buffer area (the unsplit model's order)."""
    offsets, offset = {}, 0
    for name, b in _float_buffers(model):
        offsets[name] = (offset, b.numel())
        offset += b.numel()
    return offsets


def usable_batches(samples: int, batch_size: int, micro_batches: int) -> int:
    """Batches per epoch a replica trains on: a short last batch that does not cut into M micro-batches is
    skipped (by every replica alike)."""
    full, rest = divmod(samples, batch_size)
    return full + (1 if rest and rest % micro_batches == 0 else 0)


def worker_grid(roles: Roles, stages: int, splits: int) -> GridShape:
    """The grid of the worker ranks; the same clear error on every rank when they do not factor."""
    try:
        return GridShape(len(roles.workers), stages, splits)
    except SharedConfigError as exc:
        servers, per_replica = len(roles.servers), stages * splits
        works = ", ".join(str(servers + per_replica * n) for n in range(1, 5))
        raise SharedConfigError(
            f"world = servers + replicas x stages x tensor_parallel: {servers + len(roles.workers)} ranks leave "
            f"{len(roles.workers)} worker ranks after --servers {servers}, and {exc}; with --servers {servers} "
            f"launch {works}, ... ranks") from None


def train_partitioned_downpour(cfg: Any, comm: Communicator) -> dict:
    """``mpisgd train --strategy downpour|dcasgd`` with ``--stages`` or ``--tensor-parallel`` above 1.

    Returns:
        A summary; server 0's (world rank 0) is the job's, as :func:`mpisgd.downpour.job.train_downpour`'s.
    """
    settings = ModelParallelSettings.from_config(cfg)
    if cfg.device != "cpu":
        raise SharedConfigError("model parallelism runs on the CPU for now (activations travel through host memory)")
    if cfg.batch_size % settings.micro_batches:
        raise SharedConfigError(f"--batch-size {cfg.batch_size} is not divisible by --micro-batches "
                                f"{settings.micro_batches}")
    roles = assign_roles(comm.size, cfg.servers)
    shape = worker_grid(roles, settings.stages, settings.tensor_parallel)
    is_server = comm.rank in roles.servers
    rule_name = "sgd" if cfg.strategy == "dcasgd" else cfg.server_rule
    fault = faults.worker_fault(comm.rank)  # on every rank: a malformed value fails on all of them
    where = None if is_server else shape.coordinates(roles.worker_index(comm.rank))
    if where is None:  # server 0 evaluates on the whole validation set
        data = open_datasets(cfg, comm, rank=0, size=1)
    else:
        data = open_datasets(cfg, comm, rank=where.replica, size=shape.replicas)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, seed=cfg.seed)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().astype(np.float32)
    if len(flat) < cfg.servers:
        raise SharedConfigError(f"--servers {cfg.servers} is more than the model's {len(flat)} parameters: "
                                "every shard needs at least one")
    layout = ShardLayout(len(flat), cfg.servers)
    error: Optional[BaseException] = None
    if cfg.strategy == "dcasgd":
        try:
            DelayCompensation(0, lam=cfg.dc_lambda, variant=cfg.dc_variant, momentum=cfg.dc_momentum)
        except ConfigError as exc:
            error = exc
    comm.raise_together(error)
    # the checkpoint holds the unsplit model (written at any K, T, or by unsplit Downpour): loaded before
    # the replicas cut it, so every stage starts from its batch-norm statistics
    resumed = load_resume_state(cfg, comm, model, layout, rule_name) if cfg.resume else {}
    if resumed:
        flat = resumed["params"]

    world = comm.mpi
    assert isinstance(world, MPI.Intracomm)
    with comm.watchdog.blocking("model-parallel Downpour: split the ranks by role and replica"):
        role_comm = world.Split(0 if is_server else 1, comm.rank)
        replica_comm = None if where is None else role_comm.Split(where.replica, comm.rank)
    mp: Optional[ModelParallel] = None
    try:  # each replica cuts its own model (collective over its ranks); a bad setting fails everywhere
        if replica_comm is not None and where is not None:
            mp = ModelParallel(model, stages=settings.stages, micro_batches=settings.micro_batches,
                               schedule=settings.pipeline_schedule, balance=settings.balance,
                               tensor_parallel=settings.tensor_parallel, comm=replica_comm,
                               timeout=cfg.worker_timeout * PIPELINE_TIMEOUT_FRACTION,
                               name=f"world rank {comm.rank} (replica {where.replica}, stage {where.stage}, "
                                    f"split {where.split})")
    except ConfigError as exc:
        error = exc
    comm.raise_together(error)
    stage_layers = comm.allgather_objects(None if mp is None else (mp.layers.start, mp.layers.stop, mp.split),
                                          name="layers of each partition")

    remote_workers, idle_sleep = server_pacing(comm, roles)
    buffers = [b for _, b in _float_buffers(model)]
    windows = ParameterServerWindows(world, roles, layout, buffer_size=sum(b.numel() for b in buffers))
    applied = AppliedPushes(world, roles.servers)
    client = ParameterClient(windows)
    samples = (samples_per_rank(data.train.num_samples, shape.replicas) if is_server
               else data.train.samples_per_rank)
    num_batches = usable_batches(samples, cfg.batch_size, settings.micro_batches)
    job = JobContext(cfg, comm, roles, layout, windows, client, JobBoard(client), role_comm, model, "cpu", data,
                     buffers, rule_name, num_batches, resumed)
    server = None
    if is_server:
        shard = windows.shard
        assert shard is not None
        if not network_path(remote_workers=remote_workers):
            lower_cpu_priority(cfg.server_nice)
        rule = make_rule(rule_name, layout.shard_size(shard), lr=cfg.lr, eps=cfg.adagrad_eps)
        restore_rule_state(rule, resumed, layout.shard_slice(shard))
        server = PartitionShardServer(windows, rule, applied, idle_sleep_s=idle_sleep)
        server.initialize(flat[layout.shard_slice(shard)], claimed_steps=job.resumed_claims)
    header = None
    if job.is_coordinator:
        warm = cfg.warmstart_steps > 0 and shape.replicas > 1 and not resumed
        header = job.board.initialize(warm_open=not warm)
    comm.barrier(name="parameter server start")  # every shard and the board hold their initial values before any pull
    try:
        if mp is not None:
            partition = PartitionClient(windows, partition_pieces(model, mp.module, mp.split), applied,
                                        timeout=cfg.worker_timeout * PIPELINE_TIMEOUT_FRACTION)
            summary = PartitionWorker(job, mp, partition, replica_comm, shape, fault=fault).run()
        elif header is not None:
            assert server is not None
            summary = PartitionCoordinator(job, server, header, shape, stage_layers[len(roles.servers):]).run()
        else:
            assert server is not None
            summary = follow_coordinator(job, server)
    finally:
        role_comm.Free()
    try:
        return finish_job(job, summary)
    finally:  # reached by every rank together (finish_job met them all, or all raise the job's error)
        applied.free()
        if mp is not None:
            mp.free()
        if replica_comm is not None:
            replica_comm.Free()


def _endless(train: Iterable) -> Iterator:
    while True:
        yield from train


class PartitionWorker(GradientAccrual):
    """One partition (stage, split) of one replica in a Downpour job; :meth:`run` trains and returns the
    job's outcome as the board tells it."""

    def __init__(self, job: JobContext, mp: ModelParallel, client: PartitionClient, replica_comm: Any,
                 shape: GridShape, *, fault: Optional[faults.WorkerFault] = None) -> None:
        self.job, self.cfg, self.mp, self.client, self.board = job, job.cfg, mp, client, job.board
        self.replica_comm, self.shape, self.fault = replica_comm, shape, fault
        self.index = job.roles.worker_index(job.comm.rank)
        self.leader = mp.stage == 0 and mp.split == 0
        self.step = job.resumed_replica_steps(shape.replicas)[shape.coordinates(self.index).replica]
        train = job.data.train
        train.epoch, train.batch = job.resumed_position(self.step)
        n = client.size
        self.local = np.zeros(n, dtype=np.float32)  # the partition's parameters are views into it
        flat, offset = torch.from_numpy(self.local), 0
        self.params = list(mp.module.parameters())
        for p in self.params:
            p.data = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.init_accrual(n)
        self.row = WorkerReport(job.board.layout, self.index, steps=self.step)
        self.header = BoardHeader()
        offsets = _buffer_offsets(job.model)
        self.buffers = [(offsets[name][0], b) for name, b in _float_buffers(mp.module)] if mp.split == 0 else []
        self._strike_pending = False
        if fault is not None:
            mp.module.register_forward_pre_hook(self._strike)

    # ---- the board and the replica ------------------------------------------------------------
    def report(self) -> BoardHeader:
        """Write this partition's row (its heartbeat, its stage's batch-norm statistics) and read the header;
        a stop signal this process received goes to server 0 first."""
        self.board.forward_signal(self.job.comm.rank)
        for offset, b in self.buffers:
            start = self.row.buffers_offset + offset
            self.row.values[start:start + b.numel()] = b.detach().reshape(-1).numpy()
        return self.board.report(self.row, self.header)

    def report_until(self, done: Any) -> BoardHeader:
        wait_until(lambda: done(self.report()), what="the coordinator",
                   backoff=Backoff(first=REPORT_WHILE_WAITING_S, longest=REPORT_WHILE_WAITING_S))
        return self.header

    def agree(self, vote: bool) -> bool:
        """Whether every partition of the replica votes to take another step (nonblocking, with a deadline)."""
        mine, everyone = np.array([int(vote)], dtype=np.int32), np.zeros(1, dtype=np.int32)
        request = self.replica_comm.Iallreduce(mine, everyone, op=MPI.MIN)
        wait_until(request.Test, timeout=self.cfg.worker_timeout * PIPELINE_TIMEOUT_FRACTION,
                   what="the other partitions of this replica", backoff=Backoff(first=2e-5, longest=1e-3))
        return bool(everyone[0])

    def vote(self, header: BoardHeader) -> bool:
        """This partition's vote; the leader claims the replica's step from the job's budget (one claim for
        the K*T partitions)."""
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return False
        if header.phase != Phase.TRAINING:
            return False
        if self.leader:
            budget = self.job.step_budget // (self.shape.stages * self.shape.splits)
            return self.job.client.claim_step() < budget
        return True

    def _strike(self, module: Any, inputs: Any) -> None:
        """Test fault, inside the step (so the replica ends it together): once, before the first forward."""
        if self._strike_pending and self.fault is not None:
            self._strike_pending = False
            if self.fault.strike(self.step + 1):
                raise RuntimeError(f"test fault: partition left at step {self.step + 1}")

    # ---- parameters and gradients ----------------------------------------------------------------
    def pull_parameters(self) -> None:
        self.client.pull(self.local)

    def collect_gradient(self) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            self.grads[offset:offset + n] = 0 if p.grad is None else p.grad.detach().reshape(-1).numpy()
            offset += n
        if self.cfg.weight_decay:
            self.grads += np.float32(self.cfg.weight_decay) * self.local

    def push_gradients(self) -> None:
        gradient = self.accrued
        if self.compensation is not None:  # w_now: a fresh pull right before the push
            self.client.pull(self.w_now, as_reference=False)
            gradient = self.compensation.compensate(self.accrued, self.w_now, self.w_reference, out=self.compensated)
        try:
            if self.client.push_shards:
                self.row.count_staleness(self.client.push(gradient))
                self.row.add(RowField.PUSHES)
        except NonFinitePushError:
            self.row.add(RowField.NONFINITE)
        self.accrued[:] = 0
        self.accrued_steps = 0

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self, header: BoardHeader) -> WorkerState:
        cfg, state = self.cfg, WorkerState.DONE
        for x, y in _endless(self.job.data.train):
            if len(x) % self.mp.micro_batches:
                continue
            if not self.agree(state == WorkerState.DONE and self.vote(header)):
                break
            if self.fetch_due():
                self.pull_parameters()
            for p in self.params:
                p.grad = None
            self._strike_pending = True
            loss = self.mp.train_replica_step(x, y, F.cross_entropy)
            self.step += 1
            self.collect_gradient()
            if self.fault and self.fault.corrupts_gradient(self.step) and len(self.grads):
                self.grads[0] = np.nan
            if np.isfinite(self.grads).all():
                self.accrue_at(self.local, loss)
            elif self.nonfinite_stops(f"{self.mp.where}, its replica,"):
                state = WorkerState.FAILED  # voted against the next step: the replica stops together
            if self.step % cfg.n_push == 0 and self.accrued_steps:
                self.push_gradients()
            self.row.set(RowField.STEPS, self.step)
            header = self.report()
        if self.accrued_steps and state == WorkerState.DONE:
            self.push_gradients()
        return state

    def run(self) -> dict:
        header = self.report()
        if self.index >= self.shape.stages * self.shape.splits:  # a replica after the first: warm start
            header = self.report_until(lambda h: h.warm_open or h.phase != Phase.TRAINING)
        try:
            state = self.train(header)
        except Exception:  # noqa: BLE001 -- a failing partition takes its replica out, not the job
            logger.exception("%s failed; its replica leaves the job, the others go on", self.mp.where)
            self.row.set(RowField.FAILED_STEP, self.step)
            state = WorkerState.FAILED
        self.row.set(RowField.STEPS, self.step)
        self.row.set(RowField.STATE, state)
        header = self.report_until(lambda h: h.phase == Phase.FINISHED)
        return {"steps": self.step, "stopped": header.stop_reason.label, "exit_code": header.exit_code,
                "abort": header.abort}


class PartitionCoordinator(Coordinator):
    """Server 0 of a job with split replicas: Downpour's coordinator, with staleness per partition in the
    metrics and each batch-norm buffer averaged over the partitions that hold it.

    Args:
        stage_layers: per worker rank, (first layer, end layer, split) of its stage.
    """

    def __init__(self, job: JobContext, server: PartitionShardServer, header: BoardHeader, shape: GridShape,
                 stage_layers: list) -> None:
        super().__init__(job, server, header)
        # in checkpoints, as ModelParallel.save_checkpoint writes it: their worker rows are partitions
        self.split = {"stages": shape.stages, "tensor_parallel": shape.splits, "replicas": shape.replicas}
        self.labels = [str(shape.coordinates(i)).replace(", ", "/") for i in range(job.num_workers)]
        offsets = _buffer_offsets(job.model)
        size = sum(n for _, n in offsets.values())
        self.buffer_owners = np.zeros((job.num_workers, size), dtype=bool)
        for row, (first, end, split) in enumerate(stage_layers):
            for name, (offset, n) in offsets.items():
                if split == 0 and first <= int(name.split(".")[0]) < end:
                    self.buffer_owners[row, offset:offset + n] = True

    def _log_metrics(self, rows: WorkerRows, step: int, **extra: Any) -> None:
        histograms = rows.values[:, RowField.HISTOGRAM:RowField.HISTOGRAM + STALENESS_BINS]
        counts = histograms.sum(axis=1)
        means = [float(h @ np.arange(STALENESS_BINS) / c) if c else None for h, c in zip(histograms, counts)]
        super()._log_metrics(rows, step, partitions=self.labels, partition_staleness_mean=means,
                             partition_staleness_hist=histograms.astype(int).tolist(), **extra)

    def _checkpoint_sections(self, shards: Any, step: int, rows: WorkerRows, model: Any = None) -> dict:
        sections = super()._checkpoint_sections(shards, step, rows, model)
        sections["extra"]["model_parallel"] = self.split
        return sections

    def _load_eval_model(self, params: np.ndarray, rows: WorkerRows) -> None:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), self.eval_model.parameters())
        if not self.job.buffers:
            return
        holders = self.buffer_owners & (rows.heartbeats > 0)[:, None]
        reported = holders.sum(axis=0)
        if not reported.any():
            return
        values = rows.values[:, rows.layout.buffers_offset:]
        mean = np.where(reported > 0, (values * holders).sum(axis=0) / np.maximum(reported, 1), np.nan)
        start = 0
        for buffer in self.job.buffers:
            n = buffer.numel()
            piece = mean[start:start + n]
            if not np.isnan(piece).any():
                buffer.copy_(torch.from_numpy(piece).view_as(buffer).to(buffer.dtype))
            start += n
