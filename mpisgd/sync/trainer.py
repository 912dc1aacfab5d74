"""Synchronous large-minibatch SGD (Goyal et al. 2017): every rank a worker, gradients averaged by
the all-reduce each step, linear learning-rate scaling with gradual warm-up, optional LARS.

The replicas start from rank 0's parameters and receive bitwise-identical averaged gradients, so
they stay identical without re-broadcasting; batch norm statistics stay per worker ("independent
BN", as in the paper). Only rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from mpisgd import checkpoint as ckpt
from mpisgd import faults
from mpisgd.comm import Communicator
from mpisgd.devices import select_device
from mpisgd.errors import ConfigError
from mpisgd.metrics import MetricsWriter
from mpisgd.models import build_model
from mpisgd.optim import (
    LARS,
    MomentumCorrectedScheduler,
    linear_scaling_factor,
    make_scheduler,
    scaled_lr,
    split_decay_groups,
)
from mpisgd.sync.optimizer import (
    DistributedOptimizer,
    NonFiniteGradientError,
    broadcast_parameters,
    global_mean,
)
from mpisgd.training import preemption
from mpisgd.training.config import TrainConfig
from mpisgd.training.loop import (
    checkpoint_metadata,
    evaluate,
    open_datasets,
    resume_from_checkpoint,
    write_checkpoint,
    write_final_model,
)

logger = logging.getLogger(__name__)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD or LARS at the scaled learning rate; biases and norm layers optionally exempt from decay."""
    if cfg.no_decay_bias_bn:
        groups = split_decay_groups(model, cfg.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_optimizer_and_schedule(cfg: TrainConfig, model: torch.nn.Module, global_batch: int,
                                 steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any, float]:
    """Goyal et al.'s recipe: the optimizer at the lr scaled linearly to ``global_batch``, and the
    per-iteration warm-up + decay schedule. Returns (optimizer, scheduler, scaled lr); model-parallel
    replicas use it too, so a split run follows the same recipe as an unsplit one."""
    k = linear_scaling_factor(global_batch, cfg.reference_batch)
    lr = scaled_lr(cfg.lr, global_batch, cfg.reference_batch)
    optimizer = build_optimizer(cfg, model, lr)
    start_factor = cfg.warmup_start_factor or min(1.0, 1.0 / k)
    scheduler: Any = make_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                                    warmup_epochs=cfg.warmup_epochs, schedule=cfg.schedule,
                                    milestones=cfg.milestones, gamma=cfg.gamma,
                                    warmup_start_factor=start_factor if cfg.warmup_epochs > 0 else None)
    if cfg.optimizer == "lars":  # LARS keeps the lr inside its momentum buffer (Goyal et al. §2.2)
        scheduler = MomentumCorrectedScheduler(scheduler)
    return optimizer, scheduler, lr


def train_sync(cfg: TrainConfig, comm: Communicator) -> dict:
    """Train per ``cfg`` on all ranks of ``comm``; returns a summary (identical on every rank).

    With ``--stages`` or ``--tensor-parallel`` above 1 each replica is split over several ranks
    (DistBelief model parallelism, :mod:`mpisgd.modelparallel`), and the replicas average each stage's
    gradients among themselves.

    SIGTERM, SIGUSR1 or SIGINT on any rank (:mod:`mpisgd.training.preemption`) stops every rank after
    the same step, with a checkpoint of that step and ``stopped="preempted"``.
    """
    with preemption.handling_signals():
        if cfg.stages > 1 or cfg.tensor_parallel > 1:
            from mpisgd.modelparallel.trainer import train_model_parallel
            return train_model_parallel(cfg, comm)
        return _train_sync(cfg, comm)


def _train_sync(cfg: TrainConfig, comm: Communicator) -> dict:
    device = select_device(comm.local_rank, comm.local_size, want_gpu=cfg.device == "cuda",
                           share_gpus=cfg.share_gpus)
    data = open_datasets(cfg, comm, rank=comm.rank, size=comm.size)
    train, val = data.train, data.val
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, seed=cfg.seed).to(device)
    broadcast_parameters(model, comm=comm)

    global_batch = cfg.batch_size * comm.size
    optimizer, scheduler, lr = build_optimizer_and_schedule(cfg, model, global_batch, train.num_batches)
    dist_opt = DistributedOptimizer(optimizer, model.named_parameters(), comm=comm, algorithm=cfg.algorithm)

    step = _resume(cfg, comm, model, optimizer, scheduler, train) if cfg.resume else 0
    dist_opt.steps_done = step  # the step the collective watchdog names in its reports
    metrics = MetricsWriter(cfg.metrics, append=bool(cfg.resume)) if cfg.metrics and comm.rank == 0 else None
    bar = _progress_bar(cfg, comm, train.num_batches * cfg.epochs, step)
    summary = {"steps": step, "skipped_steps": 0, "val_accuracy": None, "stopped": "epochs",
               "global_batch": global_batch, "lr": lr}
    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
    stop = preemption.StopAgreement(comm.mpi, wait=comm.watchdog.wait)
    signal_fault = faults.signal_at_step(comm.rank)  # on every rank: a malformed value fails on all

    def save(final: bool = False) -> None:
        if cfg.checkpoint_dir and comm.rank == 0:
            sections: dict[str, Any] = dict(
                model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(), rng_states=ckpt.capture_rng_states(),
                data_position=train.state_dict(), extra=checkpoint_metadata(cfg, comm, step, data))
            if final:
                write_final_model(cfg, **sections)
            else:
                write_checkpoint(cfg, step, **sections)

    try:
        while train.epoch < cfg.epochs and not _done(cfg, step):
            epoch = train.epoch
            for x, y in train:
                stop.start()  # overlaps the step: every rank learns the same answer at its end
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x), y)
                dist_opt.zero_grad()
                loss.backward()
                try:
                    dist_opt.step()
                except NonFiniteGradientError as exc:
                    if cfg.on_nonfinite == "stop":
                        raise NonFiniteGradientError(f"step {step}: {exc} (use --on-nonfinite skip to skip "
                                                     "such steps)") from None
                    summary["skipped_steps"] += 1
                    logger.warning("step %d: skipped, %s", step, exc)
                scheduler.step()
                step += 1
                interval_loss += float(loss.detach())
                interval_steps += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0:
                    mean_loss = global_mean(interval_loss / interval_steps, comm=comm)
                    elapsed = time.perf_counter() - interval_start
                    if metrics:
                        metrics.write(step=step, epoch=epoch, loss=mean_loss, lr=scheduler.get_last_lr()[0],
                                      samples_per_s=interval_steps * global_batch / elapsed)
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}")
                    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save()
                if signal_fault is not None:
                    signal_fault.strike(step)
                signum = stop.finish()
                if signum is not None:
                    summary["stopped"] = preemption.PREEMPTED
                    if comm.rank == 0:
                        logger.warning("%s received: stopping after step %d with a checkpoint (resume with "
                                       "--resume auto)", preemption.signal_name(signum), step)
                    break
                if _done(cfg, step):
                    summary["stopped"] = "max_steps"
                    break
            if summary["stopped"] == preemption.PREEMPTED:
                break
            if val is not None and (train.batch == 0 or summary["stopped"] == "max_steps"):
                accuracy = evaluate(model, val, comm, device)
                summary["val_accuracy"] = accuracy
                if metrics:
                    metrics.write(step=step, epoch=epoch, val_accuracy=accuracy, lr=scheduler.get_last_lr()[0])
                if cfg.target_accuracy is not None and accuracy >= cfg.target_accuracy:
                    summary["stopped"] = "target_accuracy"
                    break
            if train.batch == 0:
                save()
    finally:
        stop.cancel()
        if bar is not None:
            bar.close()
        if metrics:
            metrics.close()
    summary["steps"] = step
    save()  # resumable checkpoint of where the run stopped (rewritten atomically if it exists)
    if summary["stopped"] == preemption.PREEMPTED:
        _everyone_past_the_checkpoint(comm)
        return summary
    save(final=True)  # the trained model under a stable name
    return summary


def _everyone_past_the_checkpoint(comm: Communicator) -> None:
    """No rank exits before rank 0 has written the checkpoint: a launcher may kill the others as soon as
    one rank has exited."""
    from mpisgd.comm.wait import wait_until
    wait_until(comm.mpi.Ibarrier().Test, what="rank 0's checkpoint")


def _done(cfg: TrainConfig, step: int) -> bool:
    return cfg.max_steps is not None and step >= cfg.max_steps


def _resume(cfg: TrainConfig, comm: Communicator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, train: Any) -> int:
    """Load the checkpoint to resume from on every rank (same file, same state); returns its step (0 for
    a fresh start with ``--resume auto``)."""
    def restore(state: dict) -> int:
        ranks = state["writer"].get("layout", {}).get("ranks", comm.size)
        if ranks != comm.size:
            raise ConfigError(f"it was written by a job of {ranks} ranks and this one has {comm.size}: sync "
                              "training resumes only at the same number of ranks (the data order and the "
                              "global batch depend on it)")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        train.load_state_dict(state["data_position"])
        return int(state["extra"]["step"])

    resumed = resume_from_checkpoint(cfg, comm, restore)
    if resumed is None:  # --resume auto and no checkpoint yet
        return 0
    state, step = resumed
    ckpt.restore_rng_states(state["rng_states"])
    return step


def _progress_bar(cfg, comm, total: int, initial: int):
    if not cfg.progress or comm.rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
