"""Emulated accelerators, for benchmarks: each forward pass of a model in training mode is padded with a
sleep of ``MPISGD_EMULATED_STEP_SECONDS`` (times a per-rank factor from ``MPISGD_EMULATED_SLOW_RANKS``,
e.g. ``3:4`` makes world rank 3 four times slower).

Why a sleep: with one accelerator per worker the CPU is idle while the device computes, so workers
overlap; on a machine with fewer cores than ranks they instead time-share the cores, which hides what
asynchrony and backup workers buy. A sleeping rank leaves its core to the others, as a rank waiting for
its GPU would. The sleep is a forward pre-hook that :func:`mpisgd.models.build_model` attaches when the
variable is set, so every strategy gets it alike (one step = one forward pass of a worker; Sandblaster:
one portion). Evaluation (``model.eval()``) is not padded. The rank comes from the launcher's variables
(:data:`mpisgd.faults.RANK_VARIABLES`), so no MPI is needed to know it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch

from mpisgd import environment
from mpisgd.errors import ConfigError

logger = logging.getLogger(__name__)

STEP_VARIABLE = "MPISGD_EMULATED_STEP_SECONDS"
SLOW_VARIABLE = "MPISGD_EMULATED_SLOW_RANKS"


def slow_factors(spec: str) -> dict[int, float]:
    """``rank:factor[,rank:factor...]`` -> {rank: factor}; a ConfigError naming the variable otherwise."""
    factors = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            rank, factor = part.split(":")
            factors[int(rank)] = float(factor)
        except ValueError:
            raise ConfigError(f"{SLOW_VARIABLE} must be rank:factor[,rank:factor...], got {spec!r}") from None
        if not factors[int(rank)] > 0:
            raise ConfigError(f"{SLOW_VARIABLE}: factors must be positive, got {spec!r}")
    return factors


def world_rank() -> Optional[int]:
    """This process's world rank as the launcher set it, or None outside a launcher."""
    from mpisgd.faults import RANK_VARIABLES
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def emulated_step_seconds(rank: Optional[int] = None) -> float:
    """Seconds to pad each training forward pass of this rank with (0: no emulation)."""
    base = float(environment.read(STEP_VARIABLE, 0.0) or 0.0)
    if not base:
        return 0.0
    rank = world_rank() if rank is None else rank
    factors = slow_factors(str(environment.read(SLOW_VARIABLE, "") or ""))
    return base * factors.get(rank, 1.0) if rank is not None else base


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """Pad ``model``'s training forward passes with the emulated compute time, if one is set."""
    seconds = emulated_step_seconds()
    if seconds > 0:
        def pad(module: torch.nn.Module, inputs: Any) -> None:
            if module.training:
                time.sleep(seconds)

        model.register_forward_pre_hook(pad)
        logger.debug("emulated accelerator: %.4f s per training step", seconds)
    return model
