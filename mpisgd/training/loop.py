"""What every training strategy shares, written once so sync, downpour and sandblaster agree: opening the
data collectively, evaluating on the validation set, and the checkpoints (what they record about the
run, where they go, how a run resumes from the latest one).

Checkpoints of every strategy hold the same metadata (:func:`checkpoint_metadata`: step, strategy,
model, widths, input shape, classes, ranks), so that any final model can be rebuilt with
`mpisgd.models.build_model` from its own file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch
from mpi4py import MPI

from mpisgd import checkpoint as ckpt
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
    assert train is not None  # raise_together raised otherwise
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


# ---- checkpoints ----------------------------------------------------------------------------------

FINAL_MODEL_NAME = "final.h5"  # the trained model under a stable name, next to the numbered checkpoints
Restored = TypeVar("Restored")


def checkpoint_metadata(cfg: TrainConfig, comm: Union[Communicator, MPI.Comm], step: int, data: Datasets,
                        **extra: Any) -> dict:
    """The ``extra`` section of a checkpoint: enough to rebuild the model and to tell runs apart.

    Args:
        cfg: the run's config (strategy, model and widths are recorded).
        comm: the job's communicator (its size is recorded as ``ranks``).
        step: the step (push, iteration) the checkpoint holds.
        data: the opened datasets (input shape and number of classes are recorded).
        extra: the strategy's own entries (``worker_steps``, ``train_objective``, ...).
    """
    return {"step": int(step), "strategy": cfg.strategy, "ranks": comm.size, "model": cfg.model,
            "hidden": list(cfg.hidden), "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            **extra}


def checkpoint_file(cfg: TrainConfig, step: int) -> Path:
    """Where the resumable checkpoint of ``step`` goes (its directory created)."""
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return ckpt.checkpoint_path(cfg.checkpoint_dir, step)


def write_checkpoint(cfg: TrainConfig, step: int, **sections: Any) -> Path:
    """Write the resumable checkpoint of ``step`` atomically; ``sections`` as for `save_checkpoint`."""
    return ckpt.save_checkpoint(checkpoint_file(cfg, step), **sections)


def write_final_model(cfg: TrainConfig, **sections: Any) -> Path:
    """Write ``<checkpoint-dir>/final.h5`` atomically; ``sections`` as for `save_checkpoint`."""
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return ckpt.save_checkpoint(Path(cfg.checkpoint_dir) / FINAL_MODEL_NAME, **sections)


def find_resume_checkpoint(cfg: TrainConfig, comm: Communicator) -> Path:
    """Collective: the latest checkpoint in ``--checkpoint-dir``; none there is an error on every rank."""
    path = ckpt.latest_checkpoint(cfg.checkpoint_dir)
    comm.raise_together(None if path else ConfigError(f"--resume: no checkpoint in {cfg.checkpoint_dir}"))
    assert path is not None  # raise_together raised otherwise
    return path


def resume_from_checkpoint(cfg: TrainConfig, comm: Communicator,
                           restore: Callable[[dict], Restored]) -> tuple[dict, Restored]:
    """Collective: every rank loads the latest checkpoint (the same file) and ``restore``s from it.

    Args:
        restore: takes the loaded checkpoint (`load_checkpoint`'s dict) and puts it into the run's
            model, optimizer, data position...; returns whatever the strategy needs from it.
    Returns:
        (the loaded checkpoint, what ``restore`` returned).
    Raises:
        ConfigError: on every rank together, naming the file, when there is no checkpoint, it cannot be
            read, or ``restore`` rejects it (a ConfigError, KeyError, ValueError, TypeError, RuntimeError).
    """
    path = find_resume_checkpoint(cfg, comm)
    state: dict = {}
    restored: Any = None
    error: Optional[Exception] = None
    try:
        state = ckpt.load_checkpoint(path)
        restored = restore(state)
    except (ConfigError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        error = ConfigError(f"--resume from {path}: {exc}")
    comm.raise_together(error)
    return state, restored
