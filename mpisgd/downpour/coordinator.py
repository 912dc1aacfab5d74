"""Server 0's duties besides serving shard 0: it runs the job. It reads the workers' rows on the board to
count a worker as dead after ``--worker-timeout`` seconds without a heartbeat, to open the
``--warmstart-steps`` gate, and to log metrics; it evaluates the current parameters every
``--eval-every`` pushes, writes checkpoints, and publishes the phase of the job:
TRAINING -> STOPPING (target accuracy reached, or a non-finite gradient with ``--on-nonfinite stop``)
-> DRAINING (every worker done, failed or dead: servers apply what is left) -> FINISHED (final model
written: with a target accuracy, the evaluated parameters that reached it).

The other servers follow it (:func:`follow_coordinator`): they serve their shard, hand in their shard
when server 0 asks for a checkpoint, and drain at the end. Shards are assembled with collectives among
the servers only (``role_comm``), which no worker ever has to join.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd import faults
from mpisgd.comm import objects
from mpisgd.downpour.board import BoardHeader, Header, Phase, StopReason, WorkerRows, WorkerState
from mpisgd.downpour.context import JobContext
from mpisgd.downpour.server import ShardServer
from mpisgd.downpour.windows import Counter
from mpisgd.metrics import MetricsWriter
from mpisgd.training import preemption
from mpisgd.training.loop import checkpoint_metadata, evaluate, write_checkpoint, write_final_model

logger = logging.getLogger(__name__)

BOARD_CHECK_S = 0.01  # how often the other servers look at the board
MONITOR_S = 0.05  # how often server 0 reads the workers' rows
EVALUATION_BATCH = 256


class Snapshot(NamedTuple):
    """Evaluated parameters, with the board rows (batch-norm statistics) they were evaluated with."""

    params: np.ndarray
    rows: WorkerRows
    accuracy: Optional[float]
    step: int


class Shards(NamedTuple):
    """Every server's shard assembled on server 0 (params and rule state None on the other servers; every
    server gets every server's counters)."""

    params: Optional[np.ndarray]
    rule_state: dict
    counters: Optional[list]


def gather_shards(job: JobContext, server: ShardServer) -> Shards:
    """Collective over the servers: shard values and rule state, assembled on server 0."""
    faults.shard_gather_started(MPI.COMM_WORLD.Get_rank())
    counts = [job.layout.shard_size(s) for s in range(job.layout.num_shards)]
    parts = {"params": server.params, **server.rule.state}
    servers = among_servers(job)
    assembled = {}
    for name, local in parts.items():
        target = np.empty(job.layout.num_params, dtype=np.float32) if job.windows.shard == 0 else None
        request = job.role_comm.Igatherv(np.ascontiguousarray(local), [target, counts, MPI.FLOAT]
                                         if target is not None else None, root=0)
        servers.wait([request], f"shard {name}")
        assembled[name] = target
    counters = objects.allgather_objects(servers, server.counters(), name="shard counters")
    return Shards(assembled.pop("params"), assembled, counters)


def among_servers(job: JobContext) -> objects.Watched:
    """The servers' own collectives, each wait under the collective timeout naming the other servers."""
    return objects.among(job.comm, job.role_comm, what="parameter servers")


def follow_coordinator(job: JobContext, server: ShardServer) -> dict:
    """A shard other than 0: serve, answer server 0's checkpoint requests, drain at the end; returns the
    job's outcome as server 0 broadcasts it."""
    header = BoardHeader()
    checkpoints_done = 0
    while True:
        server.serve_for(BOARD_CHECK_S)
        job.board.forward_signal(job.comm.rank)
        job.board.read_header(header)
        while checkpoints_done < header.checkpoint_requests:
            gather_shards(job, server)
            checkpoints_done += 1
        if header.phase >= Phase.DRAINING:
            break
    server.drain()
    gather_shards(job, server)
    return objects.bcast_object(among_servers(job), None, root=0, name="job outcome")


class _ServingWhileEvaluating:
    """The validation set, handed to :func:`mpisgd.training.loop.evaluate`, with shard 0 served between
    its batches: workers on the network path stall while server 0 computes without entering MPI."""

    def __init__(self, val: Any, server: ShardServer, batch_size: int) -> None:
        self.val, self.server, self.batch_size = val, server, batch_size

    def iter_evaluation(self, batch_size: Optional[int] = None) -> Iterator:
        for batch in self.val.iter_evaluation(batch_size=batch_size or self.batch_size):
            yield batch
            self.server.serve_once()
            self.server.poll()


class Coordinator:
    """Server 0: serves shard 0 with ``server`` and runs the job ``job``; :meth:`run` returns its summary."""

    def __init__(self, job: JobContext, server: ShardServer, header: BoardHeader) -> None:
        self.job, self.server, self.cfg, self.board = job, server, job.cfg, job.board
        cfg = job.cfg
        self.header = header
        self.last_heartbeat = np.full(job.num_workers, -1.0)
        self.last_seen = np.full(job.num_workers, time.perf_counter())
        self.dead = np.zeros(job.num_workers, dtype=bool)
        self.start_step = int(job.resumed.get("step", 0))
        epoch_pushes = max(1, job.num_workers * job.num_batches // cfg.n_push)
        self.eval_every = cfg.eval_every or epoch_pushes
        self.checkpoint_every = cfg.checkpoint_every or epoch_pushes
        self.next_log = self.start_step + cfg.log_every
        self.next_eval = self.start_step + self.eval_every
        self.next_checkpoint = self.start_step + self.checkpoint_every
        self.stop_reason: Optional[StopReason] = None
        self.val_accuracy: Optional[float] = None
        self.metrics = MetricsWriter(cfg.metrics, append=cfg.resume) if cfg.metrics else None
        self.interval = _Interval(time.perf_counter())
        self.eval_params = np.zeros(job.layout.num_params, dtype=np.float32)
        self.eval_model = job.model
        self.target_snapshot: Optional[Snapshot] = None  # what reached --target-accuracy

    def step(self) -> int:
        """Pushes received so far (shard 0 counts every push), across resumes."""
        return self.start_step + int(self.server.counters()[Counter.PUSHES])

    # ---- main loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        job = self.job
        try:
            while True:
                self.server.serve_for(MONITOR_S)
                rows = self.board.read_rows()
                self._check_liveness(rows)
                self._open_warm_start(rows)
                self._stop_if_preempted()
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
            self.board.set_header(self.header, Header.PHASE, Phase.DRAINING)
            self.server.drain()
            return self._finish(gather_shards(job, self.server))
        finally:
            if self.metrics:
                self.metrics.close()

    # ---- the workers --------------------------------------------------------------------------
    def _check_liveness(self, rows: WorkerRows) -> None:
        now = time.perf_counter()
        workers = self.job.roles.workers
        for index, (heartbeat, state, nonfinite) in enumerate(zip(rows.heartbeats, rows.states,
                                                                   rows.nonfinite)):
            if heartbeat != self.last_heartbeat[index]:
                self.last_heartbeat[index] = heartbeat
                self.last_seen[index] = now
                if self.dead[index]:
                    self.dead[index] = False
                    self.board.set_excluded(index, False)
                    logger.warning("worker rank %d is back", workers[index])
            elif (not self.dead[index] and state == WorkerState.RUNNING
                  and now - self.last_seen[index] > self.cfg.worker_timeout):
                self.dead[index] = True
                self.board.set_excluded(index, True)  # bounded staleness no longer waits for it
                logger.warning("worker rank %d: no heartbeat for %.1f s (--worker-timeout %s); counted as "
                               "dead, training goes on without it", workers[index], now - self.last_seen[index],
                               self.cfg.worker_timeout)
            if (state == WorkerState.FAILED and nonfinite > 0 and self.cfg.on_nonfinite == "stop"
                    and self.stop_reason is None):
                self._request_stop(StopReason.NONFINITE)

    def _open_warm_start(self, rows: WorkerRows) -> None:
        """Let the other workers join once the first one's row shows its warm-start pushes (the row, not
        the push counter: the pushes logged with the gate's opening are then the ones that opened it),
        or once it cannot get there (done, failed, dead, or the job stopping)."""
        if self.header.warm_open:
            return
        warm_pushes = -(-self.cfg.warmstart_steps // self.cfg.n_push)
        if (rows.pushes[0] >= warm_pushes or rows.states[0] != WorkerState.RUNNING
                or self.dead[0] or self.stop_reason is not None):
            self.board.set_header(self.header, Header.WARM_OPEN, 1.0)
            pushes = [int(v) for v in rows.pushes]
            logger.info("warm start done, pushes per worker %s; the others join", pushes)

    def _received_signal(self) -> Optional[str]:
        """Who received a stop signal, in words (server 0 itself, or any rank that published one on
        the board), or None."""
        signum = preemption.received()
        if signum is not None:
            return f"{preemption.signal_name(signum)} received"
        signals = self.board.read_signals()
        if not signals:
            return None
        rank, signum = min(signals.items())
        return f"{preemption.signal_name(signum)} received by rank {rank}"

    def _stop_if_preempted(self) -> None:
        """A stop signal on any rank: the workers stop, the servers drain and write a checkpoint."""
        if self.stop_reason is not None:
            return
        received = self._received_signal()
        if received is not None:
            logger.warning("%s: stopping the workers; the servers write a checkpoint (resume with "
                           "--resume auto)", received)
            self._preempt()

    def _preempt(self) -> None:
        """Stop the job for a signal (sync-ps stops at a step that every shard completes)."""
        self._request_stop(StopReason.PREEMPTED)

    def _request_stop(self, reason: StopReason) -> None:
        self.stop_reason = reason
        self.board.set_header(self.header, Header.STOP_REASON, float(reason))
        self.board.set_header(self.header, Header.PHASE, Phase.STOPPING)

    def _all_workers_finished(self, rows: WorkerRows) -> bool:
        return bool(np.all((rows.states != WorkerState.RUNNING) | self.dead))

    # ---- metrics and evaluation -----------------------------------------------------------------
    def _log_metrics(self, rows: WorkerRows, step: int, **extra: Any) -> None:
        if not self.metrics:
            return
        now = time.perf_counter()
        counters = self.job.client.read_counters()
        versions = counters[:, Counter.VERSION].astype(float)
        interval = self.interval
        elapsed = max(now - interval.time, 1e-9)
        loss_sum, loss_count = float(rows.loss_sums.sum()), float(rows.loss_counts.sum())
        steps = float(rows.steps.sum())
        previous_versions = interval.versions if interval.versions is not None else np.zeros_like(versions)
        interval_count = loss_count - interval.loss_count
        loss = (loss_sum - interval.loss_sum) / interval_count if interval_count > 0 else None
        epoch = steps / (self.job.num_workers * self.job.num_batches)
        self.metrics.write(
            step=step, epoch=epoch, loss=loss, lr=self.cfg.lr,
            samples_per_s=(steps - interval.steps) * self.cfg.batch_size / elapsed,
            updates=[int(v) for v in versions],
            updates_per_s=[float(v) for v in (versions - previous_versions) / elapsed],
            pushes_per_worker=[int(v) for v in rows.pushes],
            worker_steps=[int(v) for v in rows.steps],
            staleness_hist=[int(v) for v in rows.staleness_histogram()],
            dead_workers=[self.job.roles.workers[i] for i in np.flatnonzero(self.dead)],
            worker_clock_spread=self.board.read_clocks().spread(),
            nonfinite_gradients=int(rows.nonfinite.sum()),
            rejected_updates=int(counters[:, Counter.REJECTED].sum()),
            refused_pushes=int(counters[:, Counter.REFUSED].sum()), **extra)
        self.interval = _Interval(now, loss_sum, loss_count, steps, versions)

    def _load_eval_model(self, params: np.ndarray, rows: WorkerRows) -> None:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), self.eval_model.parameters())
        values = rows.mean_buffers() if self.job.buffers else None
        if values is not None:  # batch-norm statistics: mean over the workers that reported any
            start = 0
            for buffer in self.job.buffers:
                n = buffer.numel()
                buffer.copy_(torch.from_numpy(values[start:start + n]).view_as(buffer).to(buffer.dtype))
                start += n

    def _evaluate(self) -> float:
        """Validation accuracy of the eval model on the whole set; shard 0 is served between batches."""
        serving = _ServingWhileEvaluating(self.job.data.val, self.server, max(self.cfg.batch_size, EVALUATION_BATCH))
        return evaluate(self.eval_model, serving, MPI.COMM_SELF, "cpu")  # type: ignore[arg-type]

    def _evaluate_current(self, step: int) -> None:
        self.job.client.pull_parameters(self.eval_params, as_reference=False)
        rows = self.board.read_rows().copy()  # workers keep writing theirs (batch-norm statistics among them)
        self._load_eval_model(self.eval_params, rows)
        self.val_accuracy = self._evaluate()
        if self.metrics:
            self.metrics.write(step=step, val_accuracy=self.val_accuracy, lr=self.cfg.lr)
        target = self.cfg.target_accuracy
        if target is not None and self.val_accuracy >= target and self.stop_reason is None:
            logger.info("validation accuracy %.4f >= %s after %d pushes: stopping", self.val_accuracy, target,
                        step)
            self.target_snapshot = Snapshot(self.eval_params.copy(), rows, self.val_accuracy, step)
            self._request_stop(StopReason.TARGET_ACCURACY)

    # ---- checkpoints --------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        """Ask the other servers for their shards (collective among servers) and write a checkpoint."""
        self.board.set_header(self.header, Header.CHECKPOINT_REQUESTS, self.header.checkpoint_requests + 1)
        shards = gather_shards(self.job, self.server)
        write_checkpoint(self.cfg, step, **self._checkpoint_sections(shards, step, self.board.read_rows()))

    def _checkpoint_sections(self, shards: Shards, step: int, rows: WorkerRows,
                             model: Optional[Snapshot] = None) -> dict:
        """What a checkpoint of ``step`` holds. ``model``: an earlier snapshot to write as the model
        instead; the rest (rule state, counts) is the servers' state at ``step``."""
        job = self.job
        assert shards.params is not None and shards.counters is not None  # server 0 holds them
        model = model or Snapshot(shards.params, rows, self.val_accuracy, step)
        self._load_eval_model(model.params, model.rows)
        rule_state = {name: torch.from_numpy(value) for name, value in shards.rule_state.items()}
        extra = checkpoint_metadata(
            self.cfg, job.comm, step, job.data, servers=job.layout.num_shards, workers=job.num_workers,
            worker_steps=[int(v) for v in rows.steps], batches_per_epoch=job.num_batches,
            shard_versions=[int(c[Counter.VERSION]) for c in shards.counters],
            val_accuracy=model.accuracy, model_step=model.step)
        return {"model_state": self.eval_model.state_dict(),
                "optimizer_state": {"rule": job.rule_name, "state": rule_state}, "extra": extra}

    # ---- the end ------------------------------------------------------------------------------
    def _final_stop_reason(self, rows: WorkerRows, failed: list) -> StopReason:
        if self.stop_reason is not None:
            return self.stop_reason
        if len(failed) == self.job.num_workers:
            return StopReason.NO_WORKERS
        limited = self.cfg.max_steps is not None and rows.steps.sum() < self.job.step_budget
        return StopReason.MAX_STEPS if limited else StopReason.EPOCHS

    def _finish(self, shards: Shards) -> dict:
        cfg, job = self.cfg, self.job
        assert shards.params is not None and shards.counters is not None  # server 0 holds them
        rows = self.board.read_rows()
        step = self.step()
        failed = [job.roles.workers[i] for i in np.flatnonzero(rows.states == WorkerState.FAILED)]
        dead = [job.roles.workers[i] for i in np.flatnonzero((rows.states == WorkerState.RUNNING) & self.dead)]
        self.stop_reason = reason = self._final_stop_reason(rows, failed)
        exit_code = 1 if reason in (StopReason.NONFINITE, StopReason.NO_WORKERS) else 0
        # the other servers learn the outcome now, not after the evaluation and the checkpoint writes below,
        # which may outlast --collective-timeout: they wait for the end of the job as the workers do
        objects.bcast_object(among_servers(job), {"steps": step, "stopped": reason.label, "exit_code": exit_code,
                                                  "abort": bool(dead)}, root=0, name="job outcome")
        self._load_eval_model(shards.params, rows)
        if job.data.val is not None:
            self.val_accuracy = self._evaluate()
        # the resumable checkpoint holds the servers' state as drained; the final model is the evaluated
        # snapshot that reached --target-accuracy, where there is one: the updates still in flight when
        # the workers were told to stop would otherwise move it off the target (seen in CI: 0.85 -> 0.74)
        final_model = self.target_snapshot if reason == StopReason.TARGET_ACCURACY else None
        if cfg.checkpoint_dir:
            write_checkpoint(cfg, step, **self._checkpoint_sections(shards, step, rows))
            if reason != StopReason.PREEMPTED:  # final.h5 means the job is complete
                write_final_model(cfg, **self._checkpoint_sections(shards, step, rows, model=final_model))
        drained = {}
        if final_model is not None:
            drained = {"drained_val_accuracy": self.val_accuracy}
            self.val_accuracy = final_model.accuracy
        self._log_metrics(rows, step, val_accuracy=self.val_accuracy, **drained)
        counters = shards.counters
        summary = {"steps": step, "stopped": reason.label, "val_accuracy": self.val_accuracy,
                   "servers": job.layout.num_shards, "workers": job.num_workers, "dead_workers": dead,
                   "failed_workers": failed, "nonfinite_gradients": int(rows.nonfinite.sum()),
                   "rejected_updates": int(sum(int(c[Counter.REJECTED]) for c in counters)),
                   "refused_pushes": int(sum(int(c[Counter.REFUSED]) for c in counters)),
                   "shard_versions": [int(c[Counter.VERSION]) for c in counters],
                   "exit_code": exit_code, "abort": bool(dead)}
        self.board.set_header(self.header, Header.STOP_REASON, float(reason))
        self.board.set_header(self.header, Header.EXIT_CODE, float(exit_code))
        self.board.set_header(self.header, Header.ABORT, float(bool(dead)))
        self.board.set_header(self.header, Header.PHASE, Phase.FINISHED)
        return summary


class _Interval(NamedTuple):
    """Totals at the last metrics record, for the rates of the next one."""

    time: float
    loss_sum: float = 0.0
    loss_count: float = 0.0
    steps: float = 0.0
    versions: Optional[np.ndarray] = None
