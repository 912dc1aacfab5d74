"""``mpisgd train`` with model parallelism: the CLI's entry point, ``train_model_parallel(cfg, comm)``.

It reads the common settings (model, hidden, data, val, batch_size per *replica*, lr, weight_decay,
epochs, max_steps, seed, checkpoint_dir, resume, log_every) and the model-parallel ones of
:class:`ModelParallelSettings` (``cfg.stages``, ``cfg.micro_batches``, ``cfg.pipeline_schedule``,
``cfg.balance``, ``cfg.tensor_parallel``; defaults where the config has no such setting yet). Each
replica reads its own shard of the data (every rank of a replica the same batches); plain SGD with
``cfg.momentum`` (0.9 when absent) steps on each rank's sub-module. Checkpoints use the unsplit
model's names, so a run can resume at another number of stages, or be evaluated unsplit.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpisgd import checkpoint as ckpt
from mpisgd import faults
from mpisgd.comm import Communicator
from mpisgd.errors import ConfigError, SharedConfigError
from mpisgd.metrics import MetricsWriter
from mpisgd.modelparallel.grid import GridShape
from mpisgd.modelparallel.model_parallel import ModelParallel
from mpisgd.modelparallel.partition import BALANCES
from mpisgd.modelparallel.schedules import SCHEDULES
from mpisgd.models import build_model
from mpisgd.training import preemption

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelParallelSettings:
    """The flags ``--stages K --micro-batches M --pipeline-schedule gpipe|1f1b --balance ...
    --tensor-parallel T``; validated on construction (the same on every rank)."""

    stages: int = 1
    micro_batches: int = 1
    pipeline_schedule: str = "gpipe"
    balance: Union[str, tuple] = "params"  # or layers per stage, e.g. (2, 3)
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("stages", "micro_batches", "tensor_parallel"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.pipeline_schedule not in SCHEDULES:
            raise ConfigError(f"unknown pipeline schedule {self.pipeline_schedule!r}; valid: {', '.join(SCHEDULES)}")
        if isinstance(self.balance, str) and self.balance not in BALANCES:
            raise ConfigError(f"unknown balance {self.balance!r}; valid: {', '.join(BALANCES)} or layer counts")

    @classmethod
    def from_config(cls, cfg: Any) -> ModelParallelSettings:
        """The settings of ``cfg`` by name (missing names: the defaults)."""
        values = {}
        for f in fields(cls):
            try:
                values[f.name] = getattr(cfg, f.name)
            except AttributeError:
                continue
        if isinstance(values.get("balance"), str) and "," in values["balance"]:
            values["balance"] = tuple(int(n) for n in values["balance"].split(","))
        return cls(**values)


def _setting(cfg: Any, name: str, default: Any) -> Any:
    try:
        return getattr(cfg, name)
    except AttributeError:
        return default


@preemption.catching_stop_signals
def train_model_parallel(cfg: Any, comm: Communicator) -> dict:
    """Train per ``cfg`` with the model split across ranks; returns a summary (identical on every rank)."""
    from mpisgd.training.loop import open_datasets  # the data layer of the other strategies, shared

    settings = ModelParallelSettings.from_config(cfg)
    if _setting(cfg, "device", "cpu") != "cpu":
        raise SharedConfigError("model parallelism runs on the CPU for now (activations travel through host memory)")
    if cfg.batch_size % settings.micro_batches:
        raise SharedConfigError(f"--batch-size {cfg.batch_size} is not divisible by --micro-batches "
                                f"{settings.micro_batches}")
    per_replica = settings.stages * settings.tensor_parallel
    replicas = GridShape(comm.size, settings.stages, settings.tensor_parallel).replicas  # refuses a bad world
    replica = comm.rank // per_replica
    data = open_datasets(cfg, comm, rank=replica, size=replicas)
    train, val = data.train, data.val
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, seed=cfg.seed)
    mp = ModelParallel(model, stages=settings.stages, micro_batches=settings.micro_batches,
                       schedule=settings.pipeline_schedule, balance=settings.balance,
                       tensor_parallel=settings.tensor_parallel, comm=comm)
    from mpisgd.sync.trainer import build_optimizer_and_schedule  # the same recipe as unsplit sync SGD

    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    if mp.has_parameters:
        optimizer, scheduler, _ = build_optimizer_and_schedule(cfg, mp.module, cfg.batch_size * mp.replicas,
                                                               train.num_batches)
    step = 0
    if cfg.resume:
        step = _resume(cfg, comm, mp, optimizer, train)
        for _ in range(step if scheduler is not None else 0):  # the schedule is a function of the step alone
            scheduler.step()
    summary: dict[str, Any] = {"steps": step, "stopped": "epochs", "val_accuracy": None, "stages": mp.stages,
                               "replicas": mp.replicas, "tensor_parallel": mp.splits,
                               "global_batch": cfg.batch_size * mp.replicas, "layers_per_stage": list(mp.layer_counts)}
    max_steps = _setting(cfg, "max_steps", None)
    started, loss = time.perf_counter(), float("nan")
    metrics_path = _setting(cfg, "metrics", None)
    metrics = MetricsWriter(metrics_path, append=bool(cfg.resume)) if metrics_path and comm.rank == 0 else None
    interval = _Interval(time.perf_counter(), mp.seconds_waited)

    def log_metrics(**values: Any) -> None:
        if metrics is not None:  # the loss is already the mean over the replicas, on every rank
            lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.lr
            metrics.write(step=step, epoch=step / max(train.num_batches, 1), lr=lr, **values)

    def save(tag: Optional[str] = None) -> None:
        if cfg.checkpoint_dir:
            if comm.rank == 0:
                Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            comm.barrier()
            path = Path(cfg.checkpoint_dir) / f"{tag}.h5" if tag else ckpt.checkpoint_path(cfg.checkpoint_dir, step)
            mp.save_checkpoint(path, optimizer, extra={"step": step, "strategy": "modelparallel",
                                                       "data_position": train.state_dict(), "model": cfg.model,
                                                       "hidden": list(cfg.hidden), "num_classes": data.num_classes,
                                                       "input_shape": list(data.input_shape)})

    stop = preemption.StopAgreement(comm.mpi, wait=functools.partial(comm.wait, name="stop flags (preemption)"))
    fault = faults.model_parallel_fault(MPI.COMM_WORLD.Get_rank())  # test-only, read on every rank
    try:
        while train.epoch < cfg.epochs and not (max_steps is not None and step >= max_steps):
            for x, y in train:
                if len(x) % settings.micro_batches:  # a short last batch every replica has: skipped by all
                    continue
                stop.start()  # every rank of every replica learns at the same step whether any was signalled
                if fault is not None:
                    fault.strike(step)
                if optimizer is not None:
                    optimizer.zero_grad()
                loss = mp.train_replica_step(x, y, F.cross_entropy)
                if optimizer is not None:
                    optimizer.step()
                    scheduler.step()
                step += 1
                interval.add(loss)
                if step % _setting(cfg, "log_every", 10) == 0:
                    if comm.rank == 0:
                        logger.info("step %d: loss %.4f", step, loss)
                    now = time.perf_counter()
                    log_metrics(loss=interval.mean_loss(),
                                samples_per_s=interval.steps * summary["global_batch"] / max(now - interval.start, 1e-9),
                                pipeline_wait_s=mp.seconds_waited - interval.waited, bytes_sent=mp.bytes_sent)
                    interval = _Interval(now, mp.seconds_waited)
                if stop.finish() is not None:
                    summary["stopped"] = preemption.PREEMPTED
                    break
                if max_steps is not None and step >= max_steps:
                    summary["stopped"] = "max_steps"
                    break
            if summary["stopped"] == preemption.PREEMPTED:
                break
            if val is not None:
                summary["val_accuracy"] = evaluate(mp, val, comm)
                log_metrics(val_accuracy=summary["val_accuracy"])
            if train.batch == 0:
                save()
    finally:
        stop.cancel()
        summary["wall_time_s"] = time.perf_counter() - started
        if metrics is not None:
            metrics.close()
    summary.update(steps=step, train_loss=loss)
    save()  # collective: every rank is past it when it returns
    if summary["stopped"] != preemption.PREEMPTED:
        save("final")
    mp.free()
    return summary


class _Interval:
    """Losses and pipeline waits since the last metrics record."""

    def __init__(self, start: float, waited: float) -> None:
        self.start, self.waited, self.loss_sum, self.steps = start, waited, 0.0, 0

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.steps += 1

    def mean_loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")


def evaluate(mp: ModelParallel, val: Any, comm: Communicator) -> float:
    """Validation accuracy: each replica scores its shard through the pipeline; one sum at the end."""
    faults.evaluation_started(MPI.COMM_WORLD.Get_rank())  # test-only hook (MPISGD_TEST_EVALUATION_FAULT)
    counts = np.zeros(2)
    for x, y in val.iter_evaluation():
        output = mp.predict(x)
        if output is not None and mp.split == 0:
            counts += (int((output.argmax(dim=1) == y).sum()), len(y))
    counts = comm.allreduce_numbers(counts, "sum", name="evaluation (correct, seen)")
    return float(counts[0] / counts[1]) if counts[1] else float("nan")


def _resume(cfg: Any, comm: Communicator, mp: ModelParallel, optimizer: Optional[torch.optim.Optimizer],
            train: Any) -> int:
    """Load the checkpoint to resume from (written at any K or T) on every rank; returns its step (0:
    ``--resume auto`` found none)."""
    from mpisgd.checkpoint import read_writer
    from mpisgd.training.config import SERVER_STRATEGIES
    from mpisgd.training.loop import resume_from_checkpoint  # verified, with --resume auto's fallback

    def load(path: Any) -> dict:
        try:
            strategy = read_writer(path).get("strategy")
        except Exception:  # unreadable: the verified load says what is wrong with the file
            strategy = None
        if strategy in SERVER_STRATEGIES:  # shards and worker rows, not one model's optimizer and data position
            raise ConfigError(f"it was written by strategy {strategy!r}; resume it with that strategy")
        return mp.load_checkpoint(path, optimizer)

    resumed = resume_from_checkpoint(cfg, comm, lambda sections: sections, load=load)
    if resumed is None:  # --resume auto and no checkpoint yet
        return 0
    sections = resumed[0]
    saved_replicas = sections["extra"].get("model_parallel", {}).get("replicas", mp.replicas)
    if saved_replicas != mp.replicas:  # other shards now: the epoch restarts (the model and optimizer are exact)
        logger.warning("resuming with %d replicas instead of %d: the data position restarts its epoch",
                       mp.replicas, saved_replicas)
    train.load_state_dict(sections["extra"]["data_position"], strict=saved_replicas == mp.replicas)
    return int(sections["extra"]["step"])
