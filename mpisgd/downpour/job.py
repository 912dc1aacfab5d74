"""Asynchronous Downpour SGD (Dean et al. 2012) and DC-ASGD (Zheng et al. 2017) on a sharded parameter
server over one-sided MPI: setting up a job, resuming it, giving every rank its role, and ending it.

Roles: world ranks 0..S-1 are parameter-server shards (``--servers S``), the other ranks are workers
(model replicas, :mod:`mpisgd.downpour.worker`), each reading its own shard of the training data. The
model's flat parameter vector is split into S contiguous shards (:class:`mpisgd.downpour.ShardLayout`)
held in RMA windows (:mod:`mpisgd.downpour.windows`). A worker pulls all shards every ``--n-fetch``
steps, and pushes its accrued gradient every ``--n-push`` steps (Downpour's client loop; between fetches
it also takes local SGD steps, as in the paper). Servers apply ``--server-rule`` (sgd or adagrad) to what
was pushed; server 0 also runs the job (:mod:`mpisgd.downpour.coordinator`).

How long: ``--epochs`` passes over the data, counted for the whole job: the workers claim training
steps one at a time from a shared counter (an atomic fetch-and-add on shard 0), so the fastest workers
do more of them and a straggler holds nobody back; ``--max-steps`` caps each worker's own steps. The
metrics' ``step`` (and ``--log-every``, ``--eval-every``, ``--checkpoint-every``) counts pushes.
``--strategy dcasgd`` is Downpour whose workers correct each gradient for its delay before pushing
(:class:`mpisgd.downpour.DelayCompensation`; see there why on the worker) and whose servers apply SGD.

Nobody waits for anybody: workers and servers only touch each other's memory with RMA, inside one
``Lock_all`` epoch per window. Coordination goes through the job board on server 0
(:mod:`mpisgd.downpour.board`).

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

Test-only fault injection (``MPISGD_TEST_WORKER_FAULT=rank:step:action[:seconds]``): see
:class:`mpisgd.faults.WorkerFault`; the worker loop only calls its hooks. The tests also stop workers
from outside with SIGSTOP; see tests/e2e/test_downpour.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd import faults
from mpisgd import log as mpisgd_log
from mpisgd.comm import Communicator, objects
from mpisgd.comm.abort import abort_world
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.data.sharding import samples_per_rank
from mpisgd.devices import select_device
from mpisgd.downpour.board import JobBoard
from mpisgd.downpour.client import ParameterClient
from mpisgd.downpour.context import JobContext
from mpisgd.downpour.coordinator import Coordinator, follow_coordinator
from mpisgd.downpour.delay_compensation import DelayCompensation
from mpisgd.downpour.rules import UpdateRule, make_rule
from mpisgd.downpour.server import ShardServer, idle_sleep_for, lower_cpu_priority, network_path
from mpisgd.downpour.windows import ParameterServerWindows
from mpisgd.downpour.worker import Worker
from mpisgd.errors import ConfigError, JobFailedError, SharedConfigError
from mpisgd.models import build_model
from mpisgd.training import preemption
from mpisgd.training.config import TrainConfig
from mpisgd.training.layout import Roles, ShardLayout
from mpisgd.training.loop import open_datasets, resume_from_checkpoint
from mpisgd.training.registry import TrainResult

logger = logging.getLogger(__name__)

END_OF_JOB_POLL_S = 0.01  # how often a rank looks whether every rank reached the end of the job


@dataclass(frozen=True)
class System:
    """What a system built on these windows, this board and this coordinator supplies: its server rule,
    server, worker and coordinator classes, and windows of its own (``setup``: collective, on every rank,
    returns an object with ``free()``, or None). Downpour/DC-ASGD is :data:`DOWNPOUR`; synchronous SGD on
    the parameter server (:mod:`mpisgd.syncps`) is another."""

    rule_name: Callable[[TrainConfig], str]
    make_rule: Callable[[JobContext, int], UpdateRule]  # (job, shard size)
    make_server: Callable[[JobContext, UpdateRule, float], ShardServer]  # (job, rule, idle sleep)
    worker: type = Worker
    coordinator: type = Coordinator
    setup: Callable[[JobContext], Any] = lambda job: None
    resumes: tuple = ("downpour", "dcasgd")  # strategies whose checkpoints it continues


DOWNPOUR = System(
    rule_name=lambda cfg: "sgd" if cfg.strategy == "dcasgd" else cfg.server_rule,
    make_rule=lambda job, size: make_rule(job.rule_name, size, lr=job.cfg.lr, eps=job.cfg.adagrad_eps),
    make_server=lambda job, rule, idle_sleep: ShardServer(job.windows, rule, idle_sleep_s=idle_sleep))


# ---- setup ----------------------------------------------------------------------------------------

def assign_roles(world_size: int, servers: int) -> Roles:
    """Roles for ``servers`` shards; the same error on every rank when they do not fit."""
    try:
        return Roles.assign(world_size, servers)
    except ConfigError as exc:
        raise SharedConfigError(str(exc)) from None


def _float_buffers(model: torch.nn.Module) -> list:
    return [b for _, b in model.named_buffers() if b.is_floating_point()]


def _flat_parameters(model: torch.nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().astype(np.float32)


@preemption.catching_stop_signals
def train_downpour(cfg: TrainConfig, comm: Communicator, system: Optional[System] = None) -> dict:
    """Train per ``cfg`` (strategy downpour or dcasgd) on all ranks of ``comm``.

    Returns:
        A summary; server 0's (world rank 0) is the job's: steps (pushes applied), stopped (reason),
        val_accuracy, and per-job counts (dead, failed workers; non-finite gradients; rejected updates).

    With ``--stages`` or ``--tensor-parallel`` above 1 each replica is split over several ranks, each
    partition pulling and pushing its own slice (:mod:`mpisgd.modelparallel.downpour`).
    """
    if cfg.stages > 1 or cfg.tensor_parallel > 1:
        from mpisgd.modelparallel.downpour import train_partitioned_downpour
        return train_partitioned_downpour(cfg, comm)
    roles = assign_roles(comm.size, cfg.servers)
    is_server = comm.rank in roles.servers
    num_workers = len(roles.workers)
    system = system or DOWNPOUR
    rule_name = system.rule_name(cfg)
    fault = faults.worker_fault(comm.rank)  # on every rank: a malformed value fails on all of them
    signal_fault = faults.signal_at_step(comm.rank)
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
    flat = _flat_parameters(model)
    if len(flat) < cfg.servers:
        raise SharedConfigError(f"--servers {cfg.servers} is more than the model's {len(flat)} parameters: "
                                "every shard needs at least one")
    layout = ShardLayout(len(flat), cfg.servers)
    if cfg.strategy == "dcasgd":  # validates lambda, variant and momentum the same way on every rank
        try:
            DelayCompensation(0, lam=cfg.dc_lambda, variant=cfg.dc_variant, momentum=cfg.dc_momentum)
        except ConfigError as exc:
            raise SharedConfigError(str(exc)) from None
    resumed = load_resume_state(cfg, comm, model, layout, rule_name, system.resumes) if cfg.resume else {}
    if resumed:
        flat = resumed["params"]
    buffers = _float_buffers(model)
    samples = samples_per_rank(data.train.num_samples, num_workers) if is_server else data.train.samples_per_rank
    num_batches = -(-samples // cfg.batch_size)

    world = comm.mpi
    assert isinstance(world, MPI.Intracomm)  # the library's duplicate of COMM_WORLD
    remote_workers, idle_sleep = server_pacing(comm, roles)
    with comm.watchdog.blocking("parameter server: split the ranks by role"):
        role_comm = world.Split(0 if is_server else 1, comm.rank)
    windows = ParameterServerWindows(world, roles, layout, buffer_size=sum(b.numel() for b in buffers))
    client = ParameterClient(windows)
    job = JobContext(cfg, comm, roles, layout, windows, client, JobBoard(client), role_comm, model, device,
                     data, buffers, rule_name, num_batches, resumed, signal_fault=signal_fault)
    job.extension = system.setup(job)  # collective: the system's own windows
    server = _start_server(job, system, flat, remote_workers, idle_sleep) if is_server else None
    header = None
    if job.is_coordinator:
        warm = cfg.warmstart_steps > 0 and job.num_workers > 1 and not resumed
        header = job.board.initialize(warm_open=not warm)
    comm.barrier(name="parameter server start")  # every shard and the board hold their initial values before any pull
    try:
        if server is None:
            summary = system.worker(job, fault=fault).run()
        elif header is not None:
            summary = system.coordinator(job, server, header).run()
        else:
            summary = follow_coordinator(job, server)
    finally:
        role_comm.Free()
    return finish_job(job, summary)


def server_pacing(comm: Communicator, roles: Roles) -> tuple[bool, float]:
    """Collective: whether any worker is on another node than this rank, and the idle sleep of a server
    here (a server with workers on other nodes must react to their RMA operations quickly); a bad
    setting is raised on every rank together."""
    lowest_here = objects.allreduce_numbers(objects.Watched(comm.local, comm.wait), comm.rank, "min",
                                            name="node of each rank")[0]
    nodes = comm.allgather_objects(int(lowest_here), name="node of each rank")  # a node: its lowest world rank
    remote_workers = any(nodes[w] != nodes[comm.rank] for w in roles.workers)
    try:
        idle_sleep, error = idle_sleep_for(remote_workers=remote_workers), None
    except ConfigError as exc:
        idle_sleep, error = 0.0, exc
    comm.raise_together(error)
    return remote_workers, idle_sleep


def _start_server(job: JobContext, system: System, flat: np.ndarray, remote_workers: bool,
                  idle_sleep: float) -> ShardServer:
    """This rank's shard server, its rule state restored when resuming, its shard initialized."""
    cfg, windows, layout = job.cfg, job.windows, job.layout
    shard = windows.shard
    assert shard is not None  # a server rank
    rule = system.make_rule(job, layout.shard_size(shard))
    where = layout.shard_slice(shard)
    restore_rule_state(rule, job.resumed, where)
    if not network_path(remote_workers=remote_workers):
        lower_cpu_priority(cfg.server_nice)
    elif cfg.server_nice:
        logger.warning("--server-nice ignored: workers reach this server over the network path, where their "
                       "RMA operations need the server's CPU time")
    server = system.make_server(job, rule, idle_sleep)
    server.initialize(flat[where], claimed_steps=job.resumed_claims)
    return server


def restore_rule_state(rule: UpdateRule, resumed: dict, where: slice) -> None:
    """This shard's part (``where``) of the resumed server rule's state (Adagrad's sums), if it was saved."""
    for name in rule.state_names:
        saved = resumed.get("rule_state", {}).get(name)
        if saved is not None:
            rule.state[name][:] = saved[where]


def load_resume_state(cfg: TrainConfig, comm: Communicator, model: torch.nn.Module, layout: ShardLayout,
                       rule_name: str, resumes: tuple = DOWNPOUR.resumes) -> dict:
    """Every rank reads the latest checkpoint (the same file): parameters, the server rule's state,
    and how far each worker got; problems are raised on every rank together."""

    def restore(saved: dict) -> dict:
        extra = saved["extra"] or {}
        if extra.get("strategy") not in resumes:
            raise ConfigError(f"it was written by strategy {extra.get('strategy')!r}, not {'/'.join(resumes)}")
        model.load_state_dict(saved["model_state"])
        state: dict = {"params": _flat_parameters(model)}
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
        split = extra.get("model_parallel") or {}  # split replicas: a row per partition
        state["partitions_per_replica"] = every = int(split.get("stages", 1)) * int(split.get("tensor_parallel", 1))
        if len(state["worker_steps"]) % every:
            raise ConfigError(f"it lists {len(state['worker_steps'])} worker steps, not a multiple of its "
                              f"{every} partitions per replica")
        if "batches_per_epoch" in extra:
            state["batches_per_epoch"] = int(extra["batches_per_epoch"])
        return state

    resumed = resume_from_checkpoint(cfg, comm, restore)
    if resumed is None:  # --resume auto found no checkpoint
        return {}
    if comm.rank == 0:
        logger.info("resuming %s at step %d (workers at steps %s)", cfg.strategy, resumed[1]["step"],
                    resumed[1]["worker_steps"])
    return resumed[1]


# ---- the end of the job ------------------------------------------------------------------------------

def _failure_message(summary: dict) -> str:
    if summary.get("stopped") == "nonfinite":
        return ("a worker computed a non-finite gradient; training stopped (the final model holds the last "
                "finite parameters; use --on-nonfinite skip to skip such steps)")
    return "every worker failed; see their messages above"


def _print_finished(job: JobContext, summary: dict) -> None:
    """The line the ``mpisgd`` command prints at the end (to stdout, as the command's result), printed by
    server 0 itself when the job ends with MPI_Abort and the command never gets to print it."""
    print(TrainResult.from_summary(job.cfg.strategy, summary, 0.0).finished_line(), flush=True)


def _abort_job(job: JobContext, summary: dict, why: str) -> None:
    """Server 0, the final model written: end the job with MPI_Abort on COMM_WORLD and the job's exit code.

    COMM_WORLD, not the library's duplicate: MPICH sends an abort on COMM_WORLD to the process manager,
    and hydra's mpiexec then exits with exactly this code. An abort on any other communicator is
    delivered to its members as messages; they exit, hydra kills the hung rank, and its SIGKILL status
    leaked into mpiexec's exit status in about half of the runs (measured).
    """
    _print_finished(job, summary)
    logger.warning("%s; the final model is written, ending the job with MPI_Abort(errorcode=%d) so that "
                   "mpiexec does not wait for them", why, summary["exit_code"])
    if summary["exit_code"]:
        logger.error("%s", _failure_message(summary))
    mpisgd_log.flush()
    abort_world(summary["exit_code"])


def _meet_before_freeing_windows(job: JobContext, summary: dict) -> None:
    """Freeing the windows is collective: a rank that stops (hangs, is frozen) after its last report
    would hold every other rank in MPI_Win_free forever (seen in the tests: a worker frozen right as
    the job ended). So all ranks first meet in an MPI_Ibarrier; if not everyone has arrived within
    --worker-timeout, server 0 (the final model is written) ends the job with MPI_Abort instead."""
    request = job.comm.mpi.Ibarrier()
    timeout = job.cfg.worker_timeout if job.is_coordinator else None
    wait_until(request.Test, timeout=timeout, what="every rank at the end of the job",
               backoff=Backoff(first=END_OF_JOB_POLL_S, longest=END_OF_JOB_POLL_S),
               on_timeout=lambda: _abort_job(
                   job, summary, f"not every rank reached the end of the job within --worker-timeout "
                                 f"{job.cfg.worker_timeout:g} s"))


def finish_job(job: JobContext, summary: dict) -> dict:
    """Free the windows and return, or, with a dead worker, end the job with MPI_Abort (see the module
    docstring): the final model is already written, and the hung process could never join a collective."""
    if job.is_coordinator:
        for rank in summary.get("failed_workers", []):
            logger.warning("worker rank %d failed", rank)
        if summary["abort"]:
            dead = ", ".join(map(str, summary["dead_workers"]))
            _abort_job(job, summary, f"worker rank(s) {dead} never finished")
    if summary.get("abort"):  # server 0 is about to abort the job; a collective here would never complete
        wait_until(lambda: False, what="server 0's MPI_Abort", backoff=Backoff(first=1.0, longest=1.0))
    _meet_before_freeing_windows(job, summary)
    if job.extension is not None:
        job.extension.free()
    job.windows.free()
    if summary["exit_code"]:
        raise JobFailedError(_failure_message(summary))
    return summary

