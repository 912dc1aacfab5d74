"""Optimizers and lr schedules with no communication in them (LARS, warm-up + linear scaling, momentum
correction). Distributed training wraps these; they never import MPI."""

from mpisgd.sync.lars import LARS, is_no_decay_parameter, split_decay_groups, trust_ratio
from mpisgd.sync.schedule import (
    SCHEDULES,
    MomentumCorrectedScheduler,
    WarmupDecay,
    WarmupDecayLR,
    linear_scaling_factor,
    make_scheduler,
    momentum_correction,
    scaled_lr,
)

__all__ = [
    "LARS",
    "SCHEDULES",
    "MomentumCorrectedScheduler",
    "WarmupDecay",
    "WarmupDecayLR",
    "is_no_decay_parameter",
    "linear_scaling_factor",
    "make_scheduler",
    "momentum_correction",
    "scaled_lr",
    "split_decay_groups",
    "trust_ratio",
]
