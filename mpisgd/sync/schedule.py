"""Learning-rate schedules for large-minibatch SGD (Goyal et al. 2017, "Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour"): the linear scaling rule, gradual warm-up per iteration composed with a
decay (constant, step or cosine), and momentum correction.

Why per iteration: with k times the reference batch the target lr is k times larger, and jumping to it at
step 0 diverges; Goyal et al. raise the lr linearly at every iteration over the first epochs. The schedule
is a `torch.optim.lr_scheduler.LambdaLR` driven by `WarmupDecay`, so it composes with anything that knows
torch schedulers and its state round-trips through `state_dict()` (the factor's settings included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from mpisgd.errors import ConfigError

SCHEDULES = ("constant", "step", "cosine")


def linear_scaling_factor(global_batch: int, reference_batch: int) -> float:
    """k = global_batch / reference_batch: how much larger the batch is than the one the base lr was tuned
    for. Goyal et al.'s warm-up starts at lr / k, i.e. pass ``warmup_start_factor=1 / k`` to
    `make_scheduler`."""
    if not (isinstance(global_batch, int) and global_batch > 0):
        raise ConfigError(f"global_batch must be a positive int, got {global_batch!r}")
    if not (isinstance(reference_batch, int) and reference_batch > 0):
        raise ConfigError(f"reference_batch must be a positive int, got {reference_batch!r}")
    return global_batch / reference_batch


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule: "when the minibatch size is multiplied by k, multiply the learning rate
    by k" (Goyal et al. §2.1).

    Args:
        base_lr: lr tuned for `reference_batch` samples per step (Goyal et al.: 0.1 for 256), > 0.
        global_batch: samples per synchronous step summed over all ranks.
        reference_batch: the batch `base_lr` belongs to.

    Returns:
        base_lr * global_batch / reference_batch.
    """
    if not base_lr > 0:
        raise ConfigError(f"base_lr must be > 0, got {base_lr!r}")
    return base_lr * linear_scaling_factor(global_batch, reference_batch)


class WarmupDecay:
    """The lr multiplier at iteration t: linear warm-up, then a decay. A callable object (not a closure)
    so that `LambdaLR.state_dict()` saves its settings.

    * warm-up, for t < W = round(warmup_epochs * steps_per_epoch):
      ``start + (1 - start) * t / W``, reaching 1 at t = W;
    * ``constant``: 1;
    * ``step``: ``gamma ** (number of milestones m with t >= m * steps_per_epoch)``; milestones are in
      epochs counted from the start of training, as in Goyal et al. (30, 60, 80), and multiply the
      warm-up factor if one falls inside it;
    * ``cosine``: ``final + (1 - final) * (1 + cos(pi * (t - W) / (T - W))) / 2`` after warm-up,
      T = epochs * steps_per_epoch, and `final` from T on.
    """

    def __init__(
        self,
        *,
        steps_per_epoch: int,
        epochs: float,
        warmup_epochs: float = 0.0,
        schedule: str = "constant",
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        warmup_start_factor: float | None = None,
        final_factor: float = 0.0,
    ) -> None:
        if not (isinstance(steps_per_epoch, int) and steps_per_epoch > 0):
            raise ConfigError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        if not epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {epochs!r}")
        if not 0 <= warmup_epochs <= epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        milestones = [float(m) for m in milestones]
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ConfigError(f"milestones must be strictly increasing, got {milestones}")
        if any(m <= 0 for m in milestones):
            raise ConfigError(f"milestones must be > 0 epochs, got {milestones}")
        if schedule != "step" and milestones:
            raise ConfigError(f"milestones are only used by schedule='step', got schedule={schedule!r}")
        if not gamma > 0:
            raise ConfigError(f"gamma must be > 0, got {gamma!r}")
        warmup_steps = round(warmup_epochs * steps_per_epoch)
        if warmup_steps > 0:
            if warmup_start_factor is None:
                raise ConfigError(
                    "warmup_start_factor is required with warm-up; Goyal et al. start at lr / k: pass "
                    "1 / linear_scaling_factor(global_batch, reference_batch)"
                )
            if not 0 <= warmup_start_factor <= 1:
                raise ConfigError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor!r}")
        if not 0 <= final_factor <= 1:
            raise ConfigError(f"final_factor must be in [0, 1], got {final_factor!r}")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = round(epochs * steps_per_epoch)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.milestone_steps = [m * steps_per_epoch for m in milestones]
        self.gamma = float(gamma)
        self.warmup_start_factor = 1.0 if warmup_start_factor is None else float(warmup_start_factor)
        self.final_factor = float(final_factor)

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        start = self.warmup_start_factor
        return start + (1.0 - start) * step / self.warmup_steps

    def decay(self, step: int) -> float:
        if self.schedule == "step":
            return self.gamma ** sum(1 for m in self.milestone_steps if step >= m)
        if self.schedule == "cosine":
            span = self.total_steps - self.warmup_steps
            if step < self.warmup_steps or span <= 0:
                return 1.0
            progress = min(1.0, (step - self.warmup_steps) / span)
            final = self.final_factor
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.decay(step)


class WarmupDecayLR(LambdaLR):
    """`LambdaLR` driven by `WarmupDecay`, whose ``load_state_dict`` also puts the saved lr back into the
    optimizer. (Plain LambdaLR restores only its counters, so the lr is wrong until the next ``step()``
    when the optimizer state is loaded before the scheduler is constructed.)"""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            group["lr"] = lr


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    epochs: float,
    warmup_epochs: float = 0.0,
    schedule: str = "constant",
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_start_factor: float | None = None,
    final_factor: float = 0.0,
) -> WarmupDecayLR:
    """A per-iteration `LambdaLR` (`WarmupDecayLR`): call ``scheduler.step()`` after each
    ``optimizer.step()``.

    The optimizer's lr (per group) is the *target* lr, usually `scaled_lr(...)`; the scheduler multiplies
    it by `WarmupDecay` (see there for the formulas). On construction it sets the lr for iteration 0.

    Args:
        optimizer: any torch optimizer.
        steps_per_epoch: optimizer steps per epoch (every rank takes the same number).
        epochs: length of training, for cosine.
        warmup_epochs: warm-up length in epochs (may be fractional; Goyal et al.: 5); 0 for none.
        schedule: "constant", "step" or "cosine".
        milestones: epochs at which "step" multiplies the lr by `gamma`.
        gamma: step decay factor.
        warmup_start_factor: the first warm-up lr as a fraction of the target; required when
            warmup_epochs > 0. Goyal et al.: 1/k, k = `linear_scaling_factor(global_batch, reference_batch)`.
        final_factor: the lr fraction cosine decays to.

    Returns:
        The scheduler. With `LARS` (lr inside the momentum buffer) wrap it in `MomentumCorrectedScheduler`.
    """
    factor = WarmupDecay(
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        schedule=schedule,
        milestones=milestones,
        gamma=gamma,
        warmup_start_factor=warmup_start_factor,
        final_factor=final_factor,
    )
    return WarmupDecayLR(optimizer, lr_lambda=factor)


def momentum_correction(
    optimizer: torch.optim.Optimizer, old_lrs: Sequence[float], new_lrs: Sequence[float]
) -> bool:
    """Goyal et al. §2.2 momentum correction: rescale momentum buffers by new_lr / old_lr.

    With the update form ``v = m * v + lr * g; w = w - v`` (You et al.'s, used by `LARS`), the buffer
    carries the old lr; when lr changes from lr_t to lr_{t+1} the buffer must be scaled by
    lr_{t+1} / lr_t, otherwise the step after a change is too large (lr drop) or too small (warm-up).

    `torch.optim.SGD` uses ``v = m * v + g; w = w - lr * v``: its buffer holds no lr, so it needs **no**
    correction (the two forms then give the same trajectory), and this function leaves it alone. It acts
    only on optimizers with a true ``lr_in_momentum_buffer`` attribute, so a training loop may call it
    unconditionally.

    Args:
        optimizer: the optimizer, after its lr was changed.
        old_lrs: lr of each param group before the change.
        new_lrs: lr of each param group after the change.

    Returns:
        True when buffers were rescaled (groups whose lr did not change, or whose old lr was 0, are left
        alone; a buffer built with lr 0 holds only history that is already scaled away).
    """
    groups = optimizer.param_groups
    if not len(old_lrs) == len(new_lrs) == len(groups):
        raise ValueError(
            f"momentum_correction: got {len(old_lrs)} old and {len(new_lrs)} new lrs for "
            f"{len(groups)} param groups"
        )
    if not getattr(optimizer, "lr_in_momentum_buffer", False):
        return False
    for group, old_lr, new_lr in zip(groups, old_lrs, new_lrs):
        if old_lr == new_lr or old_lr == 0:
            continue
        ratio = new_lr / old_lr
        for param in group["params"]:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                buffer.mul_(ratio)
    return True


class MomentumCorrectedScheduler:
    """Wraps a torch lr scheduler so that every ``step()`` also applies `momentum_correction`.

    Use it with `LARS`; with `torch.optim.SGD` it is a transparent pass-through. ``state_dict`` and
    ``load_state_dict`` are the wrapped scheduler's, so checkpoints are the same with or without it.
    """

    def __init__(self, scheduler: Any) -> None:
        if not hasattr(scheduler, "optimizer") or not hasattr(scheduler, "step"):
            raise TypeError(f"expected a torch lr scheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.scheduler.optimizer

    @property
    def last_epoch(self) -> int:
        return self.scheduler.last_epoch

    def step(self) -> None:
        old_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scheduler.step()
        new_lrs = [group["lr"] for group in self.optimizer.param_groups]
        momentum_correction(self.optimizer, old_lrs, new_lrs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)
