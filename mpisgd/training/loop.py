"""What every training strategy shares, written once so sync, downpour and sandblaster agree: opening the
data collectively, evaluating on the validation set, and the checkpoints (what they record about the
run, where they go, how a run resumes from the latest one).

Checkpoints of every strategy hold the same metadata (:func:`checkpoint_metadata`: step, strategy,
model, widths, input shape, classes, ranks), so that any final model can be rebuilt with
`mpisgd.models.build_model` from its own file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch
from mpi4py import MPI

from mpisgd import checkpoint as ckpt
from mpisgd import faults
from mpisgd.comm import Communicator, objects
from mpisgd.data import ShardedHDF5, compatibility_problems, default_dataset
from mpisgd.errors import CheckpointError, CollectiveTimeout, ConfigError
from mpisgd.training.config import TrainConfig

logger = logging.getLogger(__name__)


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
        error: Optional[Exception] = None
        if comm.rank == 0:  # generate the built-in set once, then everyone reads it
            try:
                files = default_dataset()
                train_path, val_path = str(files.train_path), val_path or str(files.val_path)
            except (OSError, ConfigError) as exc:
                error = exc
        comm.raise_together(error)
        train_path, default_val = comm.bcast_object((train_path, val_path), root=0, name="the built-in data set's paths")
        val_path = val_path or default_val
    train = val = None
    error = None
    try:
        train = ShardedHDF5(train_path, rank, size, batch_size=cfg.batch_size, seed=cfg.seed,
                            num_classes=cfg.num_classes, check_contents=False)
        problems = train.content_problems()
        if val_path is not None:
            val = ShardedHDF5(val_path, rank, size, batch_size=cfg.batch_size, num_classes=train.num_classes,
                              shuffle=False, check_contents=False)
            problems += val.content_problems()
            problems += compatibility_problems(train, val)
        if problems:
            raise ConfigError("; ".join(problems))
    except Exception as exc:  # not only ConfigError: no rank may be left waiting in raise_together
        error = exc
    comm.raise_together(error)
    assert train is not None  # raise_together raised otherwise
    # the number of classes must agree even if label ranges differ between files
    num_classes = int(comm.allreduce_numbers(train.num_classes, "max", name="number of classes")[0])
    return Datasets(train, val, train.input_shape, num_classes)


def evaluate(model: torch.nn.Module, val: ShardedHDF5, comm: Union[Communicator, MPI.Comm], device: str) -> float:
    """Validation accuracy over the whole set: each rank scores its samples, one sum at the end (watched by
    the collective watchdog when ``comm`` is an mpisgd Communicator; ``MPI.COMM_SELF``: one rank's own)."""
    faults.evaluation_started(MPI.COMM_WORLD.Get_rank())  # test-only hook (MPISGD_TEST_EVALUATION_FAULT)
    model.eval()
    counts = np.zeros(2)
    with torch.no_grad():
        for x, y in val.iter_evaluation():
            predictions = model(x.to(device)).argmax(dim=1).cpu()
            counts += (int((predictions == y).sum()), len(y))
    model.train()
    counts = objects.allreduce_numbers(comm, counts, "sum", name="evaluation (correct, seen)")
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


def writer_metadata(cfg: TrainConfig, extra: Optional[dict]) -> dict:
    """What wrote a checkpoint (its root attributes): the strategy and the world layout."""
    extra = extra or {}
    layout = {key: extra[key] for key in ("ranks", "servers", "workers", "model_parallel") if key in extra}
    return {"strategy": cfg.strategy, "layout": layout}


def write_checkpoint(cfg: TrainConfig, step: int, **sections: Any) -> Path:
    """Write the resumable checkpoint of ``step`` atomically; ``sections`` as for `save_checkpoint`.
    Then keep only the newest ``--keep-checkpoints`` (never the one just written) and remove the
    temporary files of writers that were killed."""
    path = ckpt.save_checkpoint(checkpoint_file(cfg, step), writer=writer_metadata(cfg, sections.get("extra")),
                                **sections)
    if cfg.keep_checkpoints:
        for old in ckpt.prune_checkpoints(cfg.checkpoint_dir, cfg.keep_checkpoints):
            logger.info("--keep-checkpoints %d: removed %s", cfg.keep_checkpoints, old)
    for stale in ckpt.stale_temporaries(cfg.checkpoint_dir):
        with contextlib.suppress(OSError):
            stale.unlink()
    return path


def write_final_model(cfg: TrainConfig, **sections: Any) -> Path:
    """Write ``<checkpoint-dir>/final.h5`` atomically; ``sections`` as for `save_checkpoint`."""
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return ckpt.save_checkpoint(Path(cfg.checkpoint_dir) / FINAL_MODEL_NAME,
                                writer=writer_metadata(cfg, sections.get("extra")), **sections)


def resume_candidates(cfg: TrainConfig, comm: Communicator) -> list[Path]:
    """Collective: the checkpoints ``--resume`` may start from, newest first, as rank 0 lists them
    (so every rank tries the same files): the given file, or the numbered ones in ``--checkpoint-dir``."""
    found: Optional[list[Path]] = None
    if comm.rank == 0:
        if isinstance(cfg.resume, str) and cfg.resume != "auto":
            found = [Path(cfg.resume)]
        else:
            found = ckpt.list_checkpoints(cfg.checkpoint_dir)[::-1]
    return comm.bcast_object(found, root=0, name="checkpoints to resume from")


def resume_from_checkpoint(cfg: TrainConfig, comm: Communicator, restore: Callable[[dict], Restored],
                           load: Callable[[Path], dict] = ckpt.load_checkpoint) -> Optional[tuple[dict, Restored]]:
    """Collective: every rank loads the checkpoint to resume from (the same file), verified, and
    ``restore``s from it.

    ``--resume`` (True): the newest checkpoint in ``--checkpoint-dir``; ``--resume PATH``: that file;
    ``--resume auto``: the newest *valid* one, falling back to older ones past files that fail
    verification (saying so), and None (start fresh) when the directory holds no checkpoint at all.
    A directory whose checkpoints all fail is an error, not a fresh start: the job would otherwise
    begin again and bury the evidence under new files.

    Args:
        restore: takes the loaded checkpoint (`load_checkpoint`'s dict) and puts it into the run's
            model, optimizer, data position...; returns whatever the strategy needs from it.
        load: reads one file (default `load_checkpoint`; model parallelism loads its own way).
    Returns:
        (the loaded checkpoint, what ``restore`` returned), or None for a fresh start.
    Raises:
        ConfigError: on every rank together, naming the file and the reason, when there is no checkpoint
            (except with ``auto``), it fails verification (with ``auto``: all of them do), or ``restore``
            rejects it (a ConfigError, KeyError, ValueError, TypeError, RuntimeError).
    """
    candidates = resume_candidates(cfg, comm)
    where = cfg.resume if isinstance(cfg.resume, str) and cfg.resume != "auto" else cfg.checkpoint_dir
    if not candidates:
        if cfg.resume == "auto":
            if comm.rank == 0:
                logger.info("--resume auto: no checkpoint in %s, starting fresh", where)
            return None
        comm.raise_together(ConfigError(f"--resume: no checkpoint in {where}"))
    refused: list[str] = []
    for path in candidates:
        state: dict = {}
        restored: Any = None
        error: Optional[Exception] = None
        try:
            state = load(path)
            restored = restore(state)
        except CheckpointError as exc:
            error = exc
        except CollectiveTimeout:  # a collective of the load timed out: not the file's fault, and none can agree now
            raise
        except (ConfigError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            error = ConfigError(f"--resume from {path}: {exc}")
        integrity = bool(comm.allreduce_numbers(isinstance(error, CheckpointError), "max",
                                                name="checkpoint verification (any rank refused it)")[0])
        if not (integrity and cfg.resume == "auto"):
            comm.raise_together(error)
            if refused and comm.rank == 0:
                logger.warning("--resume auto: resumed from %s, the previous valid checkpoint", path)
            elif comm.rank == 0:
                logger.info("resumed from %s", path)
            return state, restored
        reason = comm.bcast_object(str(error) if error is not None else None, root=0,
                                   name="checkpoint verification (rank 0's reason)") or "refused on another rank"
        refused.append(reason)
        if comm.rank == 0:
            logger.warning("--resume auto: %s; falling back to the previous checkpoint", reason)
    comm.raise_together(CheckpointError(f"--resume auto: no valid checkpoint in {where}: " + "; ".join(refused)))
    return None
