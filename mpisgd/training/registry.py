"""Training strategies: one training loop per paper, sharing data, models, metrics and checkpoints."""

from __future__ import annotations

from mpisgd.comm import Communicator
from mpisgd.training.config import TrainConfig


def run_strategy(cfg: TrainConfig, comm: Communicator) -> dict:
    """Run ``cfg.strategy`` on ``comm``; returns its summary (the same on every rank)."""
    if cfg.strategy == "sync":
        from mpisgd.sync.trainer import train_sync
        return train_sync(cfg, comm)
    if cfg.strategy in ("downpour", "dcasgd"):
        from mpisgd.downpour.job import train_downpour
        return train_downpour(cfg, comm)
    if cfg.strategy == "sandblaster":
        from mpisgd.sandblaster.job import train_sandblaster
        return train_sandblaster(cfg, comm)
    raise NotImplementedError(cfg.strategy)  # TrainConfig only admits implemented strategies
