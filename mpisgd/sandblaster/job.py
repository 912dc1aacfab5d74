"""Sandblaster L-BFGS (Dean et al. 2012): batch L-BFGS on parameters that never sit on one rank.

``mpiexec -n P mpisgd train --strategy sandblaster --servers S``: ranks 0..S-1 are parameter-server
shards, rank S is the coordinator (a rank of its own that drives L-BFGS and schedules portions), the
other P-S-1 ranks are workers (at least one).

* The shards hold the parameters and every L-BFGS vector (gradient, direction, the m history
  pairs) in contiguous slices (`mpisgd.training.layout.ShardLayout`) and run the coordinator's vector
  commands on them (`mpisgd.sandblaster.shard`); only scalars go back to the coordinator.
* The coordinator runs L-BFGS with a strong-Wolfe line search (`mpisgd.sandblaster.lbfgs`, no MPI in it)
  on vectors it never holds (`mpisgd.sandblaster.workspace`) and, for each evaluation of the
  objective, hands small portions of the training set (``--portion-size`` rows) to whichever worker
  is free; at the end of a pass, portions out for unusually long get a backup copy
  (``--backup-tasks``), the first copy winning (`mpisgd.sandblaster.scheduler`). The messages are
  in `mpisgd.sandblaster.protocol`.
* Workers pull the pass's point from the shards, compute portion loss sums and gradients with torch
  in float64, and push each shard its gradient slice (`mpisgd.sandblaster.worker`).

The objective (logged every iteration as ``train_objective``, also as ``loss``) is

    f(w) = (1/N) * sum_i cross_entropy(model(x_i; w), y_i) + (weight_decay / 2) * sum_W ||W||^2

over the N training samples, where the penalty covers the weights (parameters with more than one
dimension) and not the biases; for ``--model linear`` this is L2-regularized softmax regression,
convex, so the run converges to the same objective as scipy's L-BFGS-B. ``mlp`` trains too
(non-convex: a local minimum). Models with buffers (batch norm) are rejected: their loss would depend
on how samples are grouped into portions. The optimization runs in float64 (curvature pairs and
Wolfe tests need it near the optimum); the final checkpoint holds the model in its usual float32.
Stops: ``--max-iterations``, max |gradient| <= ``--gradient-tolerance``, a relative decrease of f
below scipy's default ftol (2.2e-9), or a line search that can no longer decrease f.

Results are reproducible bitwise whatever the timing: shards add portion gradients in portion-id
order and the coordinator adds loss sums exactly (math.fsum), so stragglers, backup copies and lost
workers change the wall time, not the numbers.

Preemption (:mod:`mpisgd.training.preemption`): SIGTERM or SIGINT on any rank stops the run after the
current L-BFGS iteration (a shard or worker forwards it to the coordinator, ``Tag.SIGNAL``); the
coordinator gathers the iterate, the gradient and the history pairs from the shards and writes them
with the scalars of :class:`mpisgd.sandblaster.state.LBFGSState` into a numbered checkpoint, and the
job exits 75. ``--resume auto`` puts the vectors back on the shards and continues with the next
iteration, bitwise as if never stopped. SIGUSR1 is not a stop signal here (see below): the Slurm script
forwards its SIGUSR1 as SIGTERM. Test hook ``MPISGD_TEST_SIGNAL_AT=n:SIG:rank``: the coordinator signals
itself after iteration n, a shard at its n-th pass, a worker after its n-th portion.

Lost workers and the end of the job. A worker that does not return a portion within
``--worker-timeout`` seconds is counted as lost and its work re-issued; the run finishes without it.
MPI_Finalize would then wait for that rank forever (measured with MPICH 5: a dead rank makes it hang,
a stuck rank keeps mpiexec waiting), so such a run ends the job on purpose: after the final model is
written and every surviving rank has finished (including rank 0's summary line), the coordinator calls
``MPI_Abort(MPI_COMM_WORLD, 0)`` from an ``atexit`` hook; MPICH's mpiexec then returns 0 (the exit
code given to MPI_Abort; 1 if the run failed). What MPICH's launcher lets a job survive: a worker that
hangs or stops (SIGSTOP), and, with ``mpiexec -disable-auto-cleanup``, a worker process that exits
(hydra then sends SIGUSR1 to the others, which this strategy ignores while it runs). A rank killed by
a signal (kill -9, a crash) always makes hydra's proxy SIGKILL every rank of the node, whatever the
flags (src/pm/hydra/proxy/pmip.c: ``if (WIFSIGNALED(ret_status)) PMIP_bcast_signal(SIGKILL)``).
Shards hold the only copy of the state: losing one ends the run. Not covered: a worker that exits
in the middle of transferring a gradient large enough for MPI's rendezvous protocol can leave its
shard inside MPI_Recv, which has no timeout.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd import faults, log
from mpisgd.comm import Communicator
from mpisgd.comm.abort import abort_world
from mpisgd.comm.wait import wait_until
from mpisgd.errors import ConfigError, JobFailedError
from mpisgd.metrics import MetricsWriter
from mpisgd.models import build_model
from mpisgd.sandblaster.lbfgs import (
    IterationRecord,
    LBFGSResult,
    LBFGSSettings,
    NonFiniteObjectiveError,
    minimize,
)
from mpisgd.sandblaster.protocol import Ending, Portions, Tag, WorkerCommand, polite_backoff
from mpisgd.sandblaster.scheduler import PortionScheduler
from mpisgd.sandblaster.shard import VectorShard
from mpisgd.sandblaster.state import LBFGSState
from mpisgd.sandblaster.worker import PortionWorker
from mpisgd.sandblaster.workspace import ShardedWorkspace
from mpisgd.training import preemption
from mpisgd.training.config import TrainConfig
from mpisgd.training.layout import COORDINATOR, SERVER, WORKER, Roles, ShardLayout
from mpisgd.training.loop import (
    Datasets,
    checkpoint_metadata,
    evaluate,
    open_datasets,
    resume_from_checkpoint,
    write_checkpoint,
    write_final_model,
)

logger = logging.getLogger(__name__)


class _Preempted(Exception):
    """A stop signal reached the coordinator; raised out of L-BFGS after the iteration ``record``."""

    def __init__(self, record: IterationRecord) -> None:
        super().__init__(record)
        self.record = record


@preemption.catching_stop_signals
def train_sandblaster(cfg: TrainConfig, comm: Communicator) -> dict:
    """Run Sandblaster L-BFGS per ``cfg`` on ``comm``; returns the summary (the same on every rank).

    Raises:
        ConfigError: bad input, on every rank together.
        JobFailedError: the run failed (a non-finite objective); the coordinator told every rank.
    """
    error: Optional[ConfigError] = None
    fault = signal_fault = None
    try:
        roles = Roles.assign(comm.size, cfg.servers, with_coordinator=True)
        if cfg.device != "cpu":
            raise ConfigError("--strategy sandblaster computes on the CPU only; drop --device cuda")
        fault = faults.sandblaster_fault(comm.rank)
        signal_fault = faults.signal_at_step(comm.rank)
    except ConfigError as exc:
        error = exc
    comm.raise_together(error)
    # every rank sees the whole sets: the coordinator hands out rows, and scores the validation set alone
    data = open_datasets(cfg, comm, rank=0, size=1)
    model: Optional[torch.nn.Module] = None
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, seed=cfg.seed)
        if any(True for _ in model.buffers()):
            raise ConfigError(f"--model {cfg.model} has buffers (batch norm): its loss depends on how "
                              "samples are grouped into portions, which L-BFGS cannot work with; "
                              "use linear or mlp")
    except ConfigError as exc:
        error = exc
    comm.raise_together(error)
    assert model is not None and roles.coordinator is not None  # raise_together raised otherwise

    initial = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    layout = ShardLayout(len(initial), cfg.servers)
    resumed: Optional[tuple[LBFGSState, dict]] = None
    if cfg.resume:
        loaded = resume_from_checkpoint(cfg, comm, lambda saved: _restore(cfg, saved, layout.num_params))
        resumed = None if loaded is None else loaded[1]
    portions = Portions(data.train.num_samples, cfg.portion_size)
    with comm.watchdog.blocking("sandblaster: duplicate the communicator"):
        run_comm = comm.mpi.Dup()  # the run's own message space: no tag can meet another component's
    role = roles.role_of(comm.rank)
    with _survive_hydra_notifications():
        if role == SERVER:
            shard = roles.servers.index(comm.rank)
            piece = layout.shard_slice(shard)
            vectors = {} if resumed is None else {name: values[piece] for name, values in resumed[1].items()}
            ending = VectorShard(run_comm, coordinator=roles.coordinator, initial=initial[piece],
                                 decay_mask=weight_decay_mask(model)[piece], weight_decay=cfg.weight_decay,
                                 num_samples=portions.num_samples, num_portions=portions.count,
                                 worker_timeout=cfg.worker_timeout, resumed=vectors,
                                 signal_fault=signal_fault).serve()
        elif role == WORKER:
            worker_model = copy.deepcopy(model).double()
            ending = PortionWorker(run_comm, coordinator=roles.coordinator, shards=roles.servers,
                                   layout=layout, model=worker_model, data=data.train, fault=fault,
                                   signal_fault=signal_fault).serve()
        else:
            ending = _coordinate(cfg, run_comm, roles, layout, portions, model, data,
                                 None if resumed is None else resumed[0], signal_fault)
    if ending.lost:
        _end_job_at_exit(run_comm, roles.coordinator, role, ending.lost, exit_code=0 if ending.failure is None else 1)
    else:
        run_comm.Free()
    if ending.failure is not None:
        raise JobFailedError(ending.failure)  # the coordinator sent it to everyone: each rank reports it
    assert ending.summary is not None
    return ending.summary


def weight_decay_mask(model: torch.nn.Module) -> np.ndarray:
    """1.0 on weights (parameters with more than one dimension), 0.0 on biases, in flat order."""
    return np.concatenate([np.full(p.numel(), 1.0 if p.dim() > 1 else 0.0) for p in model.parameters()])


def _restore(cfg: TrainConfig, saved: dict, num_params: int) -> tuple[LBFGSState, dict]:
    """What a checkpoint of a preempted run holds: the L-BFGS state and its vectors (float64, whole)."""
    extra = saved["extra"] or {}
    if extra.get("strategy") != "sandblaster":
        raise ConfigError(f"it was written by strategy {extra.get('strategy')!r}, not sandblaster")
    if "lbfgs" not in extra:
        raise ConfigError("it holds no L-BFGS state")
    state = LBFGSState.from_json(extra["lbfgs"], history=cfg.history)
    stored = (saved["optimizer_state"] or {}).get("state", {})
    vectors = {name: torch.as_tensor(stored[name]).numpy().astype(np.float64) for name in state.vector_names}
    for name, values in vectors.items():
        if values.shape != (num_params,):
            raise ConfigError(f"L-BFGS vector {name!r} has shape {values.shape}, the model has {num_params} "
                              "parameters")
    return state, vectors


class _Signals:
    """The stop signals that reached the coordinator: its own, or one a shard or worker forwarded."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm, self.who = comm, ""

    def received(self) -> bool:
        if self.who:
            return True
        if preemption.received() is not None:
            self.who = f"{preemption.signal_name(preemption.received())} received"
        status = MPI.Status()
        if not self.who and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=Tag.SIGNAL, status=status):
            signum = self.comm.recv(source=status.Get_source(), tag=Tag.SIGNAL)
            self.who = f"{preemption.signal_name(signum)} received by rank {status.Get_source()}"
        return bool(self.who)


def _coordinate(cfg: TrainConfig, comm: MPI.Comm, roles: Roles, layout: ShardLayout, portions: Portions,
                model: torch.nn.Module, data: Datasets, resumed: Optional[LBFGSState] = None,
                signal_fault: Optional[faults.SignalAtStep] = None) -> Ending:
    """The coordinator rank: drive L-BFGS (from ``resumed``, the state of a preempted run, if given), write
    metrics and the final model (preempted: a checkpoint with the whole L-BFGS state), then stop every rank."""
    reply_timeout = 60.0 + 4 * cfg.worker_timeout
    scheduler = PortionScheduler(comm, workers=roles.workers, portions=portions,
                                 backup_tasks=cfg.backup_tasks, worker_timeout=cfg.worker_timeout)
    workspace = ShardedWorkspace(comm, shards=roles.servers, layout=layout, scheduler=scheduler,
                                 num_samples=portions.num_samples, reply_timeout=reply_timeout)
    metrics = MetricsWriter(cfg.metrics, append=resumed is not None) if cfg.metrics else None
    if resumed is not None:
        logger.info("resuming L-BFGS after iteration %d (objective %r, %d history pairs)", resumed.iteration,
                    resumed.objective, len(resumed.pairs))
    signals = _Signals(comm)
    states: list[LBFGSState] = []

    def log_iteration(record: IterationRecord) -> None:
        counters = workspace.take_counters()
        if metrics:
            metrics.write(step=record.iteration, loss=record.objective, train_objective=record.objective,
                          gradient_norm=record.gradient_max_norm, step_size=record.step_size,
                          step_length=record.step_norm, function_evaluations=record.function_evaluations,
                          line_search_evaluations=record.line_search_evaluations,
                          line_search=record.line_search_status or None, lost_workers=sorted(scheduler.lost),
                          **counters)
        if signal_fault is not None:
            signal_fault.strike(record.iteration)
        if signals.received():  # between iterations: the iterate is consistent
            raise _Preempted(record)

    def keep_last(state: LBFGSState) -> None:  # what a checkpoint holds if a signal stops the run here
        states[:] = [state]

    settings = LBFGSSettings(history=cfg.history, max_iterations=cfg.max_iterations,
                             gradient_tolerance=cfg.gradient_tolerance)
    summary: Optional[dict[str, Any]] = None
    failure: Optional[str] = None
    try:
        result = minimize(workspace, settings, callback=log_iteration, start=resumed,
                          on_state=keep_last)
    except NonFiniteObjectiveError as exc:
        failure = f"sandblaster: {exc}"
    except _Preempted as stop:
        record = stop.record
        message = f"{signals.who} after iteration {record.iteration}"
        logger.warning("%s: writing a checkpoint with the L-BFGS state and stopping every rank (resume with "
                       "--resume auto)", message)
        result = LBFGSResult(record.iteration, record.objective, record.gradient_max_norm,
                             record.function_evaluations, preemption.PREEMPTED, message)
    if failure is None:
        preempted = result.stopped == preemption.PREEMPTED
        vectors = workspace.gather_vectors(states[-1].vector_names if preempted else ["x"])
        flat = vectors["x"]
        torch.nn.utils.vector_to_parameters(torch.from_numpy(flat).to(torch.float32), model.parameters())
        # the whole validation set, on this rank alone (the others need not be alive)
        accuracy = None if data.val is None else evaluate(model, data.val, MPI.COMM_SELF, "cpu")
        if metrics and accuracy is not None:
            metrics.write(step=result.iterations, val_accuracy=accuracy)
        if cfg.checkpoint_dir:  # preempted: numbered, with the L-BFGS state (final.h5: the run completed)
            extra = checkpoint_metadata(cfg, comm, result.iterations, data, iterations=result.iterations,
                                        train_objective=result.objective, stopped=result.stopped)
            if preempted:
                write_checkpoint(cfg, result.iterations, model_state=model.state_dict(), extra={
                    **extra, "lbfgs": states[-1].to_json()}, optimizer_state={
                    "rule": "lbfgs", "state": {name: torch.from_numpy(v) for name, v in vectors.items()}})
            else:
                write_final_model(cfg, model_state=model.state_dict(), extra=extra)
        summary = {"steps": result.iterations, "stopped": result.stopped, "message": result.message,
                   "val_accuracy": accuracy, "train_objective": result.objective,
                   "gradient_norm": result.gradient_max_norm,
                   "function_evaluations": result.function_evaluations}
    if metrics:
        metrics.close()
    lost = scheduler.stop_workers(reply_timeout=cfg.worker_timeout)
    if summary is not None:
        summary["lost_workers"] = lost
    ending = Ending(summary, failure, lost)
    workspace.stop_shards(ending)
    for worker in roles.workers:
        if worker not in lost:
            comm.send((WorkerCommand.EXIT, ending), dest=worker, tag=Tag.ASSIGN)
    return ending


@contextmanager
def _survive_hydra_notifications() -> Iterator[None]:
    """Ignore SIGUSR1 while the run lasts: MPICH's hydra, under -disable-auto-cleanup, sends it to every
    rank when one exits; its default action would kill the survivors the run can do without."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _end_job_at_exit(comm: MPI.Comm, coordinator: int, role: str, lost: list, exit_code: int) -> None:
    """After a run that lost workers, end the MPI job at interpreter exit (see the module docstring)."""
    if role == COORDINATOR:
        waiting = {rank for rank in range(comm.Get_size()) if rank != coordinator and rank not in lost}

        def everyone_reported() -> bool:
            status = MPI.Status()
            while comm.Iprobe(source=MPI.ANY_SOURCE, tag=Tag.EXIT, status=status):
                comm.recv(source=status.Get_source(), tag=Tag.EXIT)
                waiting.discard(status.Get_source())
            return not waiting

        def abort_when_everyone_is_done() -> None:
            wait_until(everyone_reported, timeout=120.0, what="survivors' exits", backoff=polite_backoff(),
                       on_timeout=lambda: None)  # a survivor that does not report in time is aborted too
            logger.warning("sandblaster lost worker rank(s) %s and finished without them; ending the job with "
                           "MPI_Abort(%d) because MPI_Finalize would wait for them forever",
                           ", ".join(map(str, lost)), exit_code)
            log.flush()
            abort_world(exit_code)
        atexit.register(abort_when_everyone_is_done)
    else:
        def report_done_and_wait() -> None:
            sys.stdout.flush()
            log.flush()
            comm.send(None, dest=coordinator, tag=Tag.EXIT)
            time.sleep(300.0)  # the coordinator's MPI_Abort ends this process long before
            os._exit(exit_code)
        atexit.register(report_done_and_wait)
