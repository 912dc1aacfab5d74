"""What every training strategy shares: opening the data collectively, building the model, and
evaluating on the validation set. Written once so sync, downpour and sandblaster agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd.comm import Communicator
from mpisgd.data import ShardedHDF5, default_dataset
from mpisgd.errors import ConfigError
from mpisgd.training.config import TrainConfig


@dataclass
class Datasets:
    train: ShardedHDF5
    val: Optional[ShardedHDF5]
    input_shape: tuple
    num_classes: int


def open_datasets(cfg: TrainConfig, comm: Communicator, *, rank: int, size: int) -> Datasets:
    """Open this rank's shards of the training and validation files, failing on every rank together.

    ``rank``/``size`` are the data-parallel position (workers only, in strategies with servers).
    A problem only one rank can see (a label out of range in its block, say) is gathered and
    raised on all ranks, so no rank waits in a collective for a rank that has already failed.
    """
    train_path, val_path = cfg.data, cfg.val
    if train_path is None:
        error = None
        if comm.rank == 0:  # generate the built-in set once, then everyone reads it
            try:
                files = default_dataset()
                train_path, val_path = str(files.train_path), val_path or str(files.val_path)
            except (OSError, ConfigError) as exc:
                error = exc
        comm.raise_together(error)
        train_path, default_val = comm.mpi.bcast((train_path, val_path), root=0)
        val_path = val_path or default_val
    train = val = None
    error = None
    try:
        train = ShardedHDF5(train_path, rank, size, batch_size=cfg.batch_size, seed=cfg.seed,
                            check_contents=False)
        problems = train.content_problems()
        if val_path is not None:
            val = ShardedHDF5(val_path, rank, size, batch_size=cfg.batch_size, num_classes=train.num_classes,
                              shuffle=False, check_contents=False)
            problems += val.content_problems()
            if val.input_shape != train.input_shape:
                problems.append(f"validation x has shape {val.input_shape}, training x has {train.input_shape}")
        if problems:
            raise ConfigError("; ".join(problems))
    except ConfigError as exc:
        error = exc
    comm.raise_together(error)
    # the number of classes must agree even if label ranges differ between files
    num_classes = comm.mpi.allreduce(train.num_classes, op=MPI.MAX)
    return Datasets(train, val, train.input_shape, num_classes)


def evaluate(model: torch.nn.Module, val: ShardedHDF5, comm: MPI.Comm, device: str) -> float:
    """Validation accuracy over the whole set: each rank scores its samples, one sum at the end."""
    model.eval()
    counts = np.zeros(2)
    with torch.no_grad():
        for x, y in val.iter_evaluation():
            predictions = model(x.to(device)).argmax(dim=1).cpu()
            counts += (int((predictions == y).sum()), len(y))
    model.train()
    comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return float(counts[0] / counts[1]) if counts[1] else float("nan")
