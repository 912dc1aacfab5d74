"""Asynchronous Downpour SGD (Dean et al. 2012) and DC-ASGD (Zheng et al. 2017) on a sharded parameter
server over one-sided MPI.

Roles: world ranks 0..S-1 are parameter-server shards (``--servers S``), the other ranks are workers
(model replicas), each reading its own shard of the training data. The model's flat parameter vector
is split into S contiguous shards (:class:`mpisgd.downpour.ShardLayout`) held in RMA windows
(:mod:`mpisgd.downpour.windows`). A worker pulls all shards every ``--n-fetch`` steps, and pushes its
accrued gradient every ``--n-push`` steps (Downpour's client loop; between fetches it also takes local
SGD steps, as in the paper). Servers apply ``--server-rule`` (sgd or adagrad) to what was pushed.

How long: ``--epochs`` passes over the data, counted for the whole job: the workers claim training
steps one at a time from a shared counter (an atomic fetch-and-add on shard 0), so the fastest workers
do more of them and a straggler holds nobody back; ``--max-steps`` caps each worker's own steps. The
metrics' ``step`` (and ``--log-every``, ``--eval-every``, ``--checkpoint-every``) counts pushes.
``--strategy dcasgd`` is Downpour whose workers correct each gradient for its delay before pushing
(:class:`mpisgd.downpour.DelayCompensation`; see there why on the worker) and whose servers apply SGD.

Nobody waits for anybody: workers and servers only touch each other's memory with RMA, inside one
``Lock_all`` epoch per window. Coordination goes through server 0's board window: workers write
heartbeats, step/push counts, loss sums, a staleness histogram and their batch-norm statistics into
their row; server 0 (the coordinator) reads it to log metrics, to count a worker as dead after
``--worker-timeout`` seconds without a heartbeat, to open the ``--warmstart-steps`` gate, and to publish
the phase of the job: TRAINING -> STOPPING (target accuracy reached, or a non-finite gradient with
``--on-nonfinite stop``) -> DRAINING (every worker done, failed or dead: servers apply what is left)
-> FINISHED (final model written: with a target accuracy, the evaluated parameters that reached
it). Server 0 also evaluates the current parameters on the validation
set every ``--eval-every`` pushes (default: once per epoch of data) and writes checkpoints; the
servers gather their shards for it with collectives among servers only.

Ending with a hung worker, measured with the MPICH wheel and its hydra mpiexec: ``Win.Free`` is
collective and ``MPI_Finalize`` waits for every rank, so with one worker stopped (SIGSTOP) or sleeping the
other ranks hang in either and mpiexec never returns. So: when every worker finished (or failed with an
exception, which it reports and survives), all ranks free the windows and exit normally; when a worker
is dead, server 0 writes the final model, the metrics and the summary line, gives hydra 0.5 s to forward
the output, and calls ``MPI_Abort`` on COMM_WORLD with the job's exit code (0 on success). MPICH hands
an abort on COMM_WORLD to the process manager, and mpiexec exits with exactly that code (48 of 48
runs); an abort on a duplicate communicator reaches the ranks as messages instead, hydra kills the hung
rank itself, and that SIGKILL leaked into mpiexec's exit status in about half of the runs. mpiexec
prints an "application called MPI_Abort(..., 0)" line. A worker *process* killed by a signal is
different: hydra's proxy kills every rank when it collects a child that died from a signal (measured,
with and without ``-disable-auto-cleanup``), so under mpiexec such a death ends the job; an exception in
a worker is caught in its loop and does not.

Test-only fault injection (``MPISGD_TEST_WORKER_FAULT=rank:step:action[:seconds]``, read only in the
worker loop here): at that step the worker of that world rank exits its loop (``exit``), sleeps
without entering MPI (``sleep``), raises (``raise``) or pushes a NaN gradient (``nan``). The tests
also stop workers from outside with SIGSTOP; see tests/e2e/test_downpour.py.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpisgd import checkpoint as ckpt
from mpisgd.arrays import select_device
from mpisgd.comm import Communicator
from mpisgd.comm.abort import abort_world
from mpisgd.data.sharding import samples_per_rank
from mpisgd.downpour import (
    DONE,
    DRAINING,
    FAILED,
    FINISHED,
    RUNNING,
    STALENESS_BINS,
    STOP_REASONS,
    STOPPING,
    TRAINING,
    BoardLayout,
    DelayCompensation,
    NonFinitePushError,
    ParameterClient,
    ParameterServerWindows,
    Roles,
    ShardLayout,
    ShardServer,
    make_rule,
)
from mpisgd.downpour.server import idle_sleep_for, lower_cpu_priority, network_path
from mpisgd.downpour.windows import PUSHES, REJECTED, VERSION
from mpisgd.errors import ConfigError, MpisgdError
from mpisgd.metrics import MetricsWriter
from mpisgd.models import build_model
from mpisgd.training.config import TrainConfig
from mpisgd.training.loop import open_datasets

FAULT_VARIABLE = "MPISGD_TEST_WORKER_FAULT"
BOARD_CHECK_S = 0.01  # how often servers look at the board
MONITOR_S = 0.05  # how often server 0 reads the workers' rows
WAIT_SLEEP_S = 0.01  # waiting workers (warm start, end of job) report this often


def _every_rank(error: ConfigError) -> ConfigError:
    """Mark an error that every rank raises identically (from the same config), so the CLI exits 2
    on all ranks instead of aborting the job."""
    error.every_rank = True
    return error


class _Snapshot(NamedTuple):
    """Evaluated parameters, with the board rows (batch-norm statistics) they were evaluated with."""
    params: np.ndarray
    rows: np.ndarray
    accuracy: float | None
    step: int


@dataclass
class _Job:
    cfg: TrainConfig
    comm: Communicator
    roles: Roles
    layout: ShardLayout
    windows: ParameterServerWindows
    client: ParameterClient
    role_comm: MPI.Intracomm
    model: torch.nn.Module
    device: str
    data: Any
    buffers: list
    rule_name: str
    num_batches: int  # per worker and epoch
    resumed: dict = field(default_factory=dict)

    @property
    def step_budget(self) -> int:
        """Training steps of the whole job: --epochs passes over the data, shared by the workers (each
        claims its steps one by one, so a straggler holds nobody back)."""
        return self.cfg.epochs * self.num_workers * self.num_batches

    @property
    def board(self) -> BoardLayout:
        return self.windows.board_layout

    @property
    def num_workers(self) -> int:
        return len(self.roles.workers)

    def log(self, text: str) -> None:
        print(f"mpisgd {self.cfg.strategy} [rank {self.comm.rank}]: {text}", file=sys.stderr, flush=True)


# ---- setup ----------------------------------------------------------------------------------------

def assign_roles(world_size: int, servers: int) -> Roles:
    """Roles for ``servers`` shards; the same ConfigError on every rank when they do not fit."""
    try:
        return Roles.assign(world_size, servers)
    except ConfigError as exc:
        raise _every_rank(exc) from None


def _float_buffers(model: torch.nn.Module) -> list:
    return [b for _, b in model.named_buffers() if b.is_floating_point()]


def train_downpour(cfg: TrainConfig, comm: Communicator) -> dict:
    """Train per ``cfg`` (strategy downpour or dcasgd) on all ranks of ``comm``.

    Returns:
        A summary; server 0's (world rank 0) is the job's: steps (pushes applied), stopped (reason),
        val_accuracy, and per-job counts (dead, failed workers; non-finite gradients; rejected updates).
    """
    roles = assign_roles(comm.size, cfg.servers)
    is_server = comm.rank in roles.servers
    num_workers = len(roles.workers)
    rule_name = "sgd" if cfg.strategy == "dcasgd" else cfg.server_rule
    try:
        device = "cpu" if is_server else select_device(
            comm.local_rank, comm.local_size, want_gpu=cfg.device == "cuda", share_gpus=cfg.share_gpus)
        error = None
    except ConfigError as exc:
        device, error = "cpu", exc
    comm.raise_together(error)
    if is_server:  # server 0 evaluates on the whole validation set; no server reads training batches
        data = open_datasets(cfg, comm, rank=0, size=1)
    else:
        data = open_datasets(cfg, comm, rank=roles.worker_index(comm.rank), size=num_workers)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, seed=cfg.seed).to(device)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().astype(np.float32)
    if len(flat) < cfg.servers:
        raise _every_rank(ConfigError(f"--servers {cfg.servers} is more than the model's {len(flat)} "
                                      "parameters: every shard needs at least one"))
    layout = ShardLayout(len(flat), cfg.servers)
    if cfg.strategy == "dcasgd":  # validates lambda, variant and momentum the same way on every rank
        try:
            DelayCompensation(0, lam=cfg.dc_lambda, variant=cfg.dc_variant, momentum=cfg.dc_momentum)
        except ConfigError as exc:
            raise _every_rank(exc) from None
    resumed = _load_resume_state(cfg, comm, model, layout, rule_name) if cfg.resume else {}
    if resumed:
        flat = resumed["params"]
    buffers = _float_buffers(model)
    if is_server:
        samples = samples_per_rank(data.train.num_samples, num_workers)
    else:
        samples = data.train.samples_per_rank
    num_batches = -(-samples // cfg.batch_size)

    # which node each rank is on (named by its lowest world rank): a server with workers on other nodes
    # must react to their RMA operations quickly
    nodes = comm.mpi.allgather(comm.local.allreduce(comm.rank, op=MPI.MIN))
    remote_workers = any(nodes[w] != nodes[comm.rank] for w in roles.workers)
    try:
        idle_sleep, error = idle_sleep_for(remote_workers=remote_workers), None
    except ConfigError as exc:
        idle_sleep, error = 0.0, exc
    comm.raise_together(error)
    role_comm = comm.mpi.Split(0 if is_server else 1, comm.rank)
    windows = ParameterServerWindows(comm.mpi, roles, layout, buffer_size=sum(b.numel() for b in buffers))
    job = _Job(cfg, comm, roles, layout, windows, ParameterClient(windows), role_comm, model, device, data,
               buffers, rule_name, num_batches, resumed)
    server = None
    if is_server:
        shard = windows.shard
        rule = make_rule(rule_name, layout.shard_size(shard), lr=cfg.lr, eps=cfg.adagrad_eps)
        where = layout.shard_slice(shard)
        for name in rule.state_names:
            saved = resumed.get("rule_state", {}).get(name)
            if saved is not None:
                rule.state[name][:] = saved[where]
        if not network_path(remote_workers=remote_workers):
            lower_cpu_priority(cfg.server_nice)
        elif cfg.server_nice:
            job.log("--server-nice ignored: workers reach this server over the network path, where their "
                    "RMA operations need the server's CPU time")
        server = ShardServer(windows, rule, idle_sleep_s=idle_sleep)
        server.initialize(flat[where], claimed_steps=sum(resumed.get("worker_steps", [])))
        if shard == 0:
            _initialize_board(job)
    comm.mpi.Barrier()  # every shard and the board hold their initial values before any pull
    try:
        if is_server:
            summary = _Coordinator(job, server).run() if windows.shard == 0 else _run_server(job, server)
        else:
            summary = _Worker(job).run()
    finally:
        role_comm.Free()
    return _finish(job, summary)


def _initialize_board(job: _Job) -> None:
    board = np.frombuffer(job.windows.board.tomemory(), dtype=np.float64)
    board[:] = 0
    board[BoardLayout.PHASE] = TRAINING
    warm = job.cfg.warmstart_steps > 0 and job.num_workers > 1 and not job.resumed
    board[BoardLayout.WARM_OPEN] = 0.0 if warm else 1.0
    job.windows.board.Sync()


def _load_resume_state(cfg: TrainConfig, comm: Communicator, model: torch.nn.Module, layout: ShardLayout,
                       rule_name: str) -> dict:
    """Every rank reads the latest checkpoint (the same file): parameters, the server rule's state,
    and how far each worker got; problems are raised on every rank together."""
    path = ckpt.latest_checkpoint(cfg.checkpoint_dir)
    error: Exception | None = None
    if not path:
        error = ConfigError(f"--resume: no checkpoint in {cfg.checkpoint_dir}")
    comm.raise_together(error)
    state: dict = {}
    try:
        saved = ckpt.load_checkpoint(path)
        extra = saved["extra"] or {}
        if extra.get("strategy") not in ("downpour", "dcasgd"):
            raise ConfigError(f"it was written by strategy {extra.get('strategy')!r}, not downpour/dcasgd")
        model.load_state_dict(saved["model_state"])
        state["params"] = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy() \
            .astype(np.float32)
        optimizer = saved["optimizer_state"] or {}
        if optimizer.get("rule") == rule_name:
            state["rule_state"] = {name: np.asarray(value, dtype=np.float32)
                                   for name, value in optimizer.get("state", {}).items()}
            for name, value in state["rule_state"].items():
                if value.shape != (layout.num_params,):
                    raise ConfigError(f"rule state {name!r} has shape {value.shape}, "
                                      f"the model has {layout.num_params} parameters")
        state["step"] = int(extra.get("step", 0))
        state["worker_steps"] = [int(s) for s in extra.get("worker_steps", [])]
        error = None
    except (ConfigError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        error = ConfigError(f"--resume from {path}: {exc}")
    comm.raise_together(error)
    return state


# ---- workers -------------------------------------------------------------------------------------

def _parse_fault(rank: int) -> tuple | None:
    """The test-only fault for this rank from MPISGD_TEST_WORKER_FAULT, or None."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        fault_rank, step, action = int(parts[0]), int(parts[1]), parts[2]
        seconds = float(parts[3]) if len(parts) > 3 else 0.0
    except (IndexError, ValueError):
        raise ConfigError(f"{FAULT_VARIABLE} must be rank:step:action[:seconds], got {spec!r}") from None
    if action not in ("exit", "sleep", "raise", "nan"):
        raise ConfigError(f"{FAULT_VARIABLE}: action must be exit, sleep, raise or nan, got {action!r}")
    return (step, action, seconds) if fault_rank == rank else None


class _WorkerReport:
    """This worker's row on the board, written at every step (the heartbeat) with the header read back
    in the same round trip."""

    def __init__(self, job: _Job, worker_index: int, start_steps: int) -> None:
        self.job = job
        self.offset = job.board.row(worker_index)
        self.row = np.zeros(job.board.row_size, dtype=np.float64)
        self.row[BoardLayout.STEPS] = start_steps
        self.header = np.zeros(BoardLayout.HEADER, dtype=np.float64)

    def count_staleness(self, staleness: np.ndarray) -> None:
        for value in staleness:
            self.row[BoardLayout.HISTOGRAM + min(max(int(value), 0), STALENESS_BINS - 1)] += 1

    def send(self) -> np.ndarray:
        """Write the row (heartbeat + 1) and return the board header (phase, warm-start gate)."""
        self.row[BoardLayout.HEARTBEAT] += 1
        if self.job.buffers:
            start = self.job.board.buffers_offset
            for buffer in self.job.buffers:
                n = buffer.numel()
                self.row[start:start + n] = buffer.detach().reshape(-1).cpu().numpy()
                start += n
        self.job.client.write_board(self.offset, self.row, read_offset=0, read_into=self.header)
        return self.header


def _endless(train) -> Iterator:
    """Batches of the worker's data shard, epoch after epoch (the position advances as they are taken)."""
    while True:
        yield from train


class _Worker:
    """One model replica: Downpour's client loop (Dean et al. 2012, 'Downpour SGD client'): pull every
    n_fetch steps, compute a gradient, accrue it, take a local SGD step between fetches, push the accrued
    gradient every n_push steps (DC-ASGD: compensated for its delay first)."""

    def __init__(self, job: _Job) -> None:
        self.job, self.cfg, self.client = job, job.cfg, job.client
        self.index = job.roles.worker_index(job.comm.rank)
        worker_steps = job.resumed.get("worker_steps") or []
        if len(worker_steps) == job.num_workers:
            self.step = worker_steps[self.index]
        else:  # resumed with another number of workers: the same amount of data behind each of them
            self.step = sum(worker_steps) // job.num_workers if worker_steps else 0
        train = job.data.train
        train.epoch, train.batch = divmod(self.step, train.num_batches)
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
        self.grads = np.zeros(n, dtype=np.float32)
        self.accrued = np.zeros(n, dtype=np.float32)
        self.accrued_steps = 0
        self.compensation = None
        if self.cfg.strategy == "dcasgd":
            self.compensation = DelayCompensation(n, lam=self.cfg.dc_lambda, variant=self.cfg.dc_variant,
                                                  momentum=self.cfg.dc_momentum)
            # w_reference: the parameters this push's gradient was computed at (the Taylor point)
            self.w_reference, self.w_now = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
            self.compensated = np.zeros(n, dtype=np.float32)
        self.report = _WorkerReport(job, self.index, self.step)
        self.fault = _parse_fault(job.comm.rank)

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
            self.report.row[BoardLayout.ROW_PUSHES] += 1
            self.report.count_staleness(staleness)
        except NonFinitePushError:  # a finite gradient can still compensate to Inf: never pushed, counted
            self.report.row[BoardLayout.NONFINITE] += 1
        self.accrued[:] = 0
        self.accrued_steps = 0

    def compute_gradient(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Into self.grads (weight decay included); returns the loss."""
        x, y = x.to(self.job.device), y.to(self.job.device)
        loss = F.cross_entropy(self.job.model(x), y)
        for p in self.params:
            p.grad = None
        loss.backward()
        self.grads[:] = torch.cat([p.grad.reshape(-1) for p in self.params]).detach().cpu().numpy()
        if self.cfg.weight_decay:
            self.grads += np.float32(self.cfg.weight_decay) * self.pulled
        return float(loss.detach())

    def train(self, header: np.ndarray) -> float:
        """Train until the job's step budget is used up, --max-steps, or the coordinator says stop;
        returns the state to report (DONE or FAILED)."""
        cfg, row = self.cfg, self.report.row
        budget = self.job.step_budget
        for x, y in _endless(self.job.data.train):
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            if header[BoardLayout.PHASE] != TRAINING or self.client.claim_step() >= budget:
                break
            if self.step % cfg.n_fetch == 0:
                self.pull_parameters()
            loss = self.compute_gradient(x, y)
            self.step += 1
            if self.fault and self.fault[0] == self.step and self.fault[1] == "nan":
                self.grads[0] = np.nan
            if np.isfinite(self.grads).all():
                if self.compensation is not None and self.accrued_steps == 0:
                    # with --n-fetch > 1 the worker has stepped locally since its pull: the gradient
                    # was computed here, not at the pulled parameters (later ones of an --n-push
                    # accrual at nearby points)
                    self.w_reference[:] = self.pulled
                self.accrued += self.grads
                self.accrued_steps += 1
                if cfg.n_fetch > 1:  # Downpour's local step between fetches
                    self.pulled -= np.float32(cfg.lr) * self.grads
                    if self.job.device != "cpu":
                        self.flat.copy_(torch.from_numpy(self.pulled))
                row[BoardLayout.LOSS_SUM] += loss
                row[BoardLayout.LOSS_COUNT] += 1
            else:
                row[BoardLayout.NONFINITE] += 1
                if cfg.on_nonfinite == "stop":
                    self.job.log(f"step {self.step}: non-finite gradient; this worker stops and the job "
                                 "with it (use --on-nonfinite skip to skip such steps)")
                    row[BoardLayout.FAILED_STEP] = row[BoardLayout.STEPS] = self.step
                    return FAILED
            if self.step % cfg.n_push == 0 and self.accrued_steps:
                self.push_gradients()
            row[BoardLayout.STEPS] = self.step
            header = self.report.send()
            if self.fault and self.fault[0] == self.step and self._inject_fault():
                break
        if self.accrued_steps:
            self.push_gradients()
        return DONE

    def _inject_fault(self) -> bool:
        """The test-only fault of MPISGD_TEST_WORKER_FAULT; True: leave the training loop."""
        _, action, seconds = self.fault
        if action == "exit":
            self.job.log(f"test fault: leaving the training loop at step {self.step}")
            return True
        if action == "sleep":
            self.job.log(f"test fault: sleeping {seconds} s at step {self.step} without entering MPI")
            time.sleep(seconds)
        if action == "raise":
            raise RuntimeError(f"test fault at step {self.step}")
        return False

    def run(self) -> dict:
        report = self.report
        header = report.send()
        while header[BoardLayout.WARM_OPEN] == 0 and header[BoardLayout.PHASE] == TRAINING and self.index > 0:
            time.sleep(WAIT_SLEEP_S)  # warm start: the first replica trains alone
            header = report.send()
        try:
            state = self.train(header)
        except Exception:  # noqa: BLE001 -- a failing worker must not take the job down: report it, leave
            self.job.log("worker failed; the job goes on without it:\n" + traceback.format_exc())
            report.row[BoardLayout.FAILED_STEP] = self.step
            state = FAILED
        report.row[BoardLayout.STEPS] = self.step
        report.row[BoardLayout.STATE] = state
        header = report.send()
        while header[BoardLayout.PHASE] != FINISHED:
            time.sleep(WAIT_SLEEP_S)
            header = report.send()
        return {"steps": self.step, "stopped": STOP_REASONS[int(header[BoardLayout.STOP_REASON])],
                "exit_code": int(header[BoardLayout.EXIT_CODE]), "abort": bool(header[BoardLayout.ABORT])}


# ---- servers -------------------------------------------------------------------------------------

def _serve_until(job: _Job, server: ShardServer, seconds: float) -> None:
    """Serve the shard for about ``seconds``, sleeping briefly when nothing was pushed."""
    deadline = time.perf_counter() + seconds
    while True:
        if not server.serve_once():
            server.idle()
        if time.perf_counter() >= deadline:
            return


def _gather_shards(job: _Job, server: ShardServer) -> tuple:
    """Collective over the servers: shard values and rule state, assembled on server 0."""
    counts = [job.layout.shard_size(s) for s in range(job.layout.num_shards)]
    parts = {"params": server.params, **server.rule.state}
    assembled = {}
    for name, local in parts.items():
        target = np.empty(job.layout.num_params, dtype=np.float32) if job.windows.shard == 0 else None
        job.role_comm.Gatherv(np.ascontiguousarray(local), [target, counts, MPI.FLOAT] if target is not None
                              else None, root=0)
        assembled[name] = target
    counters = job.role_comm.gather(server.counters(), root=0)
    return assembled.pop("params"), assembled, counters


def _run_server(job: _Job, server: ShardServer) -> dict:
    """A shard other than 0: serve, answer server 0's checkpoint requests, drain at the end."""
    header = np.zeros(BoardLayout.HEADER, dtype=np.float64)
    checkpoints_done = 0
    while True:
        _serve_until(job, server, BOARD_CHECK_S)
        job.client.read_board(0, BoardLayout.HEADER, out=header)
        while checkpoints_done < int(header[BoardLayout.CHECKPOINT_REQUESTS]):
            _gather_shards(job, server)
            checkpoints_done += 1
        if header[BoardLayout.PHASE] >= DRAINING:
            break
    server.drain()
    _gather_shards(job, server)
    return job.role_comm.bcast(None, root=0)


class _Coordinator:
    """Server 0: serves shard 0 and runs the job (liveness, warm start, metrics, evaluation, checkpoints,
    termination)."""

    def __init__(self, job: _Job, server: ShardServer) -> None:
        self.job, self.server, self.cfg = job, server, job.cfg
        cfg, board = job.cfg, job.board
        self.rows = np.zeros(board.num_workers * board.row_size, dtype=np.float64)
        self.header = job.client.read_board(0, BoardLayout.HEADER)
        self.last_heartbeat = np.full(board.num_workers, -1.0)
        self.last_seen = np.full(board.num_workers, time.perf_counter())
        self.dead = np.zeros(board.num_workers, dtype=bool)
        self.start_step = int(job.resumed.get("step", 0))
        epoch_pushes = max(1, job.num_workers * job.num_batches // cfg.n_push)
        self.eval_every = cfg.eval_every or epoch_pushes
        self.checkpoint_every = cfg.checkpoint_every or epoch_pushes
        self.next_log = self.start_step + cfg.log_every
        self.next_eval = self.start_step + self.eval_every
        self.next_checkpoint = self.start_step + self.checkpoint_every
        self.stop_reason: str | None = None
        self.val_accuracy: float | None = None
        self.metrics = MetricsWriter(cfg.metrics, append=cfg.resume) if cfg.metrics else None
        self.interval = {"time": time.perf_counter(), "loss_sum": 0.0, "loss_count": 0.0, "steps": 0.0,
                         "versions": None}
        self.eval_params = np.zeros(job.layout.num_params, dtype=np.float32)
        self.eval_model = job.model
        self.target_snapshot: _Snapshot | None = None  # what reached --target-accuracy

    # ---- board --------------------------------------------------------------------------------
    def _set_header(self, field_index: int, value: float) -> None:
        self.header[field_index] = value
        self.job.client.write_board(field_index, self.header[field_index:field_index + 1].copy())

    def _read_rows(self) -> np.ndarray:
        self.job.client.read_board(BoardLayout.HEADER, len(self.rows), out=self.rows)
        return self.rows.reshape(self.job.num_workers, self.job.board.row_size)

    def step(self) -> int:
        """Pushes received so far (shard 0 counts every push), across resumes."""
        return self.start_step + int(self.server.counters()[PUSHES])

    # ---- main loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        job = self.job
        try:
            while True:
                _serve_until(job, self.server, MONITOR_S)
                rows = self._read_rows()
                self._check_liveness(rows)
                self._open_warm_start(rows)
                step = self.step()
                if step >= self.next_log:
                    self._log_metrics(rows, step)
                    self.next_log = step + self.cfg.log_every
                if job.data.val is not None and step >= self.next_eval:
                    self.next_eval = step + self.eval_every
                    self._evaluate_current(step)
                if self.cfg.checkpoint_dir and step >= self.next_checkpoint:
                    self.next_checkpoint = step + self.checkpoint_every
                    self._checkpoint(step)
                if self._all_workers_finished(rows):
                    break
            self._set_header(BoardLayout.PHASE, DRAINING)
            self.server.drain()
            params, rule_state, counters = _gather_shards(job, self.server)
            return self._finish(params, rule_state, counters)
        finally:
            if self.metrics:
                self.metrics.close()

    def _check_liveness(self, rows: np.ndarray) -> None:
        now = time.perf_counter()
        for index, row in enumerate(rows):
            if row[BoardLayout.HEARTBEAT] != self.last_heartbeat[index]:
                self.last_heartbeat[index] = row[BoardLayout.HEARTBEAT]
                self.last_seen[index] = now
                if self.dead[index]:
                    self.dead[index] = False
                    self.job.log(f"worker rank {self.job.roles.workers[index]} is back")
            elif (not self.dead[index] and row[BoardLayout.STATE] == RUNNING
                  and now - self.last_seen[index] > self.cfg.worker_timeout):
                self.dead[index] = True
                self.job.log(f"worker rank {self.job.roles.workers[index]}: no heartbeat for "
                             f"{now - self.last_seen[index]:.1f} s (--worker-timeout "
                             f"{self.cfg.worker_timeout}); counted as dead, training goes on without it")
            if (row[BoardLayout.STATE] == FAILED and row[BoardLayout.NONFINITE] > 0
                    and self.cfg.on_nonfinite == "stop" and self.stop_reason is None):
                self._request_stop("nonfinite")

    def _open_warm_start(self, rows: np.ndarray) -> None:
        if self.header[BoardLayout.WARM_OPEN]:
            return
        first = rows[0]
        warm_pushes = -(-self.cfg.warmstart_steps // self.cfg.n_push)
        if (self.server.counters()[PUSHES] >= warm_pushes or first[BoardLayout.STATE] != RUNNING
                or self.dead[0] or self.stop_reason is not None):
            self._set_header(BoardLayout.WARM_OPEN, 1.0)
            pushes = [int(v) for v in rows[:, BoardLayout.ROW_PUSHES]]
            self.job.log(f"warm start done, pushes per worker {pushes}; the others join")

    def _request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self._set_header(BoardLayout.STOP_REASON, float(STOP_REASONS.index(reason)))
        self._set_header(BoardLayout.PHASE, STOPPING)

    def _all_workers_finished(self, rows: np.ndarray) -> bool:
        states = rows[:, BoardLayout.STATE]
        return bool(np.all((states != RUNNING) | self.dead))

    # ---- metrics and evaluation -----------------------------------------------------------------
    def _log_metrics(self, rows: np.ndarray, step: int, **extra: Any) -> None:
        if not self.metrics:
            return
        now = time.perf_counter()
        counters = self.job.client.read_counters()
        versions = counters[:, VERSION].astype(float)
        elapsed = max(now - self.interval["time"], 1e-9)
        loss_sum, loss_count = rows[:, BoardLayout.LOSS_SUM].sum(), rows[:, BoardLayout.LOSS_COUNT].sum()
        steps = rows[:, BoardLayout.STEPS].sum()
        histogram = rows[:, BoardLayout.HISTOGRAM:BoardLayout.HISTOGRAM + STALENESS_BINS]
        previous_versions = self.interval["versions"]
        if previous_versions is None:
            previous_versions = np.zeros_like(versions)
        interval_count = loss_count - self.interval["loss_count"]
        loss = (loss_sum - self.interval["loss_sum"]) / interval_count if interval_count > 0 else None
        epoch = steps / (self.job.num_workers * self.job.num_batches)
        self.metrics.write(
            step=step, epoch=epoch, loss=loss, lr=self.cfg.lr,
            samples_per_s=(steps - self.interval["steps"]) * self.cfg.batch_size / elapsed,
            updates=[int(v) for v in versions],
            updates_per_s=[float(v) for v in (versions - previous_versions) / elapsed],
            pushes_per_worker=[int(v) for v in rows[:, BoardLayout.ROW_PUSHES]],
            worker_steps=[int(v) for v in rows[:, BoardLayout.STEPS]],
            staleness_hist=[int(v) for v in histogram.sum(axis=0)],
            dead_workers=[self.job.roles.workers[i] for i in np.flatnonzero(self.dead)],
            nonfinite_gradients=int(rows[:, BoardLayout.NONFINITE].sum()),
            rejected_updates=int(counters[:, REJECTED].sum()), **extra)
        self.interval.update(time=now, loss_sum=loss_sum, loss_count=loss_count, steps=steps,
                             versions=versions)

    def _load_eval_model(self, params: np.ndarray, rows: np.ndarray) -> None:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), self.eval_model.parameters())
        if self.job.buffers:  # batch-norm statistics: mean over the workers that reported any
            reported = rows[rows[:, BoardLayout.HEARTBEAT] > 0]
            if len(reported):
                values = reported[:, self.job.board.buffers_offset:].mean(axis=0)
                start = 0
                for buffer in self.job.buffers:
                    n = buffer.numel()
                    buffer.copy_(torch.from_numpy(values[start:start + n]).view_as(buffer).to(buffer.dtype))
                    start += n

    def _evaluate(self) -> float:
        """Validation accuracy of the eval model; shard 0 keeps being served between batches."""
        model = self.eval_model
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in self.job.data.val.iter_evaluation(batch_size=max(self.cfg.batch_size, 256)):
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += len(y)
                self.server.serve_once()
                self.server.poll()
        model.train()
        return correct / total if total else float("nan")

    def _evaluate_current(self, step: int) -> None:
        self.job.client.pull_parameters(self.eval_params, as_reference=False)
        rows = self._read_rows().copy()  # workers keep writing theirs (batch-norm statistics among them)
        self._load_eval_model(self.eval_params, rows)
        self.val_accuracy = self._evaluate()
        if self.metrics:
            self.metrics.write(step=step, val_accuracy=self.val_accuracy, lr=self.cfg.lr)
        target = self.cfg.target_accuracy
        if target is not None and self.val_accuracy >= target and self.stop_reason is None:
            self.job.log(f"validation accuracy {self.val_accuracy:.4f} >= {target} after {step} pushes: "
                         "stopping")
            self.target_snapshot = _Snapshot(self.eval_params.copy(), rows, self.val_accuracy, step)
            self._request_stop("target_accuracy")

    # ---- checkpoints --------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        """Ask the other servers for their shards (collective among servers) and write a checkpoint."""
        self._set_header(BoardLayout.CHECKPOINT_REQUESTS, self.header[BoardLayout.CHECKPOINT_REQUESTS] + 1)
        params, rule_state, counters = _gather_shards(self.job, self.server)
        self._write_checkpoint(ckpt.checkpoint_path(self.cfg.checkpoint_dir, step), params, rule_state,
                               counters, step, self._read_rows())

    def _write_checkpoint(self, path: Path, params: np.ndarray, rule_state: dict, counters: list, step: int,
                          rows: np.ndarray, model: _Snapshot | None = None) -> None:
        """``model``: an earlier snapshot to write as the model instead; the rest (rule state, counts)
        is the servers' state at ``step``."""
        cfg, job = self.cfg, self.job
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        model = model or _Snapshot(params, rows, self.val_accuracy, step)
        self._load_eval_model(model.params, model.rows)
        ckpt.save_checkpoint(
            path, model_state=self.eval_model.state_dict(),
            optimizer_state={"rule": job.rule_name,
                             "state": {name: torch.from_numpy(value) for name, value in rule_state.items()}},
            extra={"step": step, "strategy": cfg.strategy, "model": cfg.model, "hidden": list(cfg.hidden),
                   "input_shape": list(job.data.input_shape), "num_classes": job.data.num_classes,
                   "servers": job.layout.num_shards, "workers": job.num_workers,
                   "worker_steps": [int(v) for v in rows[:, BoardLayout.STEPS]],
                   "shard_versions": [int(c[VERSION]) for c in counters],
                   "val_accuracy": model.accuracy, "model_step": model.step})

    # ---- the end ------------------------------------------------------------------------------
    def _finish(self, params: np.ndarray, rule_state: dict, counters: list) -> dict:
        cfg, job = self.cfg, self.job
        rows = self._read_rows()
        step = self.step()
        states = rows[:, BoardLayout.STATE]
        failed = [job.roles.workers[i] for i in np.flatnonzero(states == FAILED)]
        dead = [job.roles.workers[i] for i in np.flatnonzero((states == RUNNING) & self.dead)]
        if self.stop_reason is None:
            if len(failed) == job.num_workers:
                self.stop_reason = "no_workers"
            else:
                steps = rows[:, BoardLayout.STEPS]
                limited = cfg.max_steps is not None and steps.sum() < job.step_budget
                self.stop_reason = "max_steps" if limited else "epochs"
        self._load_eval_model(params, rows)
        if job.data.val is not None:
            self.val_accuracy = self._evaluate()
        # the resumable checkpoint holds the servers' state as drained; the final model is the evaluated
        # snapshot that reached --target-accuracy, where there is one: the updates still in flight when
        # the workers were told to stop would otherwise move it off the target (seen in CI: 0.85 -> 0.74)
        final_model = self.target_snapshot if self.stop_reason == "target_accuracy" else None
        if cfg.checkpoint_dir:
            self._write_checkpoint(ckpt.checkpoint_path(cfg.checkpoint_dir, step), params, rule_state,
                                   counters, step, rows)
            self._write_checkpoint(Path(cfg.checkpoint_dir) / "final.h5", params, rule_state, counters, step,
                                   rows, model=final_model)
        drained = {}
        if final_model is not None:
            drained = {"drained_val_accuracy": self.val_accuracy}
            self.val_accuracy = final_model.accuracy
        self._log_metrics(rows, step, val_accuracy=self.val_accuracy, **drained)
        exit_code = 1 if self.stop_reason in ("nonfinite", "no_workers") else 0
        summary = {"steps": step, "stopped": self.stop_reason, "val_accuracy": self.val_accuracy,
                   "servers": job.layout.num_shards, "workers": job.num_workers, "dead_workers": dead,
                   "failed_workers": failed, "nonfinite_gradients": int(rows[:, BoardLayout.NONFINITE].sum()),
                   "rejected_updates": int(sum(int(c[REJECTED]) for c in counters)),
                   "shard_versions": [int(c[VERSION]) for c in counters],
                   "exit_code": exit_code, "abort": bool(dead)}
        self._set_header(BoardLayout.STOP_REASON, float(STOP_REASONS.index(self.stop_reason)))
        self._set_header(BoardLayout.EXIT_CODE, float(exit_code))
        self._set_header(BoardLayout.ABORT, float(bool(dead)))
        self._set_header(BoardLayout.PHASE, FINISHED)
        job.role_comm.bcast({"steps": step, "stopped": self.stop_reason, "exit_code": exit_code,
                             "abort": bool(dead)}, root=0)
        return summary


# ---- the end of the job ------------------------------------------------------------------------------

def _failure_message(summary: dict) -> str:
    if summary.get("stopped") == "nonfinite":
        return ("a worker computed a non-finite gradient; training stopped (the final model holds the last "
                "finite parameters; use --on-nonfinite skip to skip such steps)")
    return "every worker failed; see their messages above"


def _print_finished(job: _Job, summary: dict) -> None:
    """The line the ``mpisgd`` command prints at the end, printed by server 0 before an MPI_Abort."""
    accuracy = summary.get("val_accuracy")
    accuracy_text = "n/a" if accuracy is None else f"{accuracy:.4f}"
    print(f"mpisgd train: {job.cfg.strategy} finished after {summary['steps']} steps "
          f"({summary['stopped']}); validation accuracy {accuracy_text}", flush=True)


def _meet_before_freeing_windows(job: _Job, summary: dict) -> None:
    """Freeing the windows is collective: a rank that stops (hangs, is frozen) after its last report
    would hold every other rank in MPI_Win_free forever (seen in the tests: a worker frozen right as
    the job ended). So all ranks first meet in an MPI_Ibarrier; if not everyone has arrived within
    --worker-timeout, server 0 (the final model is written) ends the job with MPI_Abort instead."""
    request = job.comm.mpi.Ibarrier()
    deadline = time.monotonic() + job.cfg.worker_timeout
    while not request.Test():
        if job.comm.rank == job.roles.servers[0] and time.monotonic() > deadline:
            _print_finished(job, summary)
            job.log(f"not every rank reached the end of the job within --worker-timeout "
                    f"{job.cfg.worker_timeout:g} s; the final model is written, ending the job with "
                    f"MPI_Abort(errorcode={summary['exit_code']}) so that mpiexec does not wait for them")
            abort_world(summary["exit_code"])
        time.sleep(WAIT_SLEEP_S)


def _finish(job: _Job, summary: dict) -> dict:
    """Free the windows and return, or, with a dead worker, end the job with MPI_Abort (see the module
    docstring): the final model is already written, and the hung process could never join a collective."""
    if job.comm.rank == job.roles.servers[0]:
        for rank in summary.get("failed_workers", []):
            job.log(f"worker rank {rank} failed")
        if summary["abort"]:
            _print_finished(job, summary)
            dead = ", ".join(map(str, summary["dead_workers"]))
            job.log(f"worker rank(s) {dead} never finished; the final model is written, ending the job with "
                    f"MPI_Abort(errorcode={summary['exit_code']}) so that mpiexec does not wait for them")
            if summary["exit_code"]:
                print(f"mpisgd: error: {_failure_message(summary)}", file=sys.stderr, flush=True)
            # COMM_WORLD, not the library's duplicate: MPICH sends an abort on COMM_WORLD to the process
            # manager, and hydra's mpiexec then exits with exactly this code. An abort on any other
            # communicator is delivered to its members as messages; they exit, hydra kills the hung rank,
            # and its SIGKILL status leaked into mpiexec's exit status in about half of the runs (measured).
            abort_world(summary["exit_code"])
    if summary.get("abort"):
        while True:  # server 0 is about to abort the job; a collective here would never complete
            time.sleep(1)
    _meet_before_freeing_windows(job, summary)
    job.windows.free()
    if summary["exit_code"]:
        error = MpisgdError(_failure_message(summary))
        error.every_rank = True
        raise error
    return summary
