"""A classification dataset in one HDF5 file, read by each rank for its own shard only.

File format: dataset ``x`` of shape (N, *features) (float, or int such as uint8 pixels) and dataset
``y`` of shape (N,) with integer labels in [0, num_classes); optional file attribute ``num_classes``.

Why hyperslab reads: every rank opens the same file (a shared file system on a cluster) and must not read
all of it: each batch is read with one h5py selection of just its rows (sorted, then put back in
permutation order), so I/O per rank scales with its shard, and files larger than memory work.

Errors in the file are `ConfigError`s naming the file (and the dataset or row): a hostile or damaged file
(random bytes, truncated data, strings, groups where datasets belong, a label of 10^12) is refused before
anything is allocated for it, never a traceback. Header problems (missing file, missing x/y, shapes, dtypes,
too few samples, an implausible number of classes) are seen identically by every rank, so all ranks raise
together. Content problems (bad labels,
NaN/inf in x) are found by scanning only this rank's contiguous block of rows, so in a multi-rank job
only the rank owning a bad row sees it: distributed callers pass ``check_contents=False``, call
`ShardedHDF5.content_problems()` on every rank and agree (e.g. all-gather) before raising.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np
import torch

from mpisgd.data.sharding import check_rank, contiguous_block, samples_per_rank, shard_indices
from mpisgd.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

# Rows are scanned in chunks of about this many bytes so that validation never holds the block in memory.
_SCAN_CHUNK_BYTES = 16 * 2**20

#: the most classes inferred from a file (its ``num_classes`` attribute or its largest label + 1); more is
#: taken for damage (one label of 10^12 would make every rank allocate a 10^12-wide output layer) unless
#: the caller states the number (``num_classes=``, ``--num-classes``)
MAX_INFERRED_CLASSES = 100_000

#: the most values one sample may hold (512 MiB as float32): a larger row is refused before it is read
MAX_VALUES_PER_SAMPLE = 2**27

# What h5py and libhdf5 raise on a damaged file (truncated data, bad B-trees, unknown types, dangling links).
_READ_ERRORS = (OSError, KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@contextmanager
def _reading(path: PathLike, what: str) -> Iterator[None]:
    """Turn what h5py raises while reading ``what`` of ``path`` into a ConfigError naming both."""
    try:
        yield
    except ConfigError:
        raise
    except _READ_ERRORS as err:
        raise ConfigError(f"{str(path)!r}: cannot read {what} ({type(err).__name__}: {err}); "
                          "is the file damaged or truncated?") from None


def _open_h5(path: PathLike) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"dataset file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"dataset path {str(path)!r} is a directory, expected an HDF5 file")
    if not path.is_file():  # a FIFO would block open() forever, a device would be read as a file
        raise ConfigError(f"dataset path {str(path)!r} is not a regular file, expected an HDF5 file")
    try:
        return h5py.File(path, "r")
    except _READ_ERRORS as err:
        raise ConfigError(f"cannot read dataset file {str(path)!r} as HDF5: {err}") from None


def _dataset(file: h5py.File, key: str, path: PathLike) -> h5py.Dataset:
    with _reading(path, f"dataset {key!r}"):
        node = file.get(key)
        if node is None:
            found = ", ".join(sorted(file.keys())) or "nothing"
            raise ConfigError(f"dataset file {str(path)!r} has no dataset {key!r} (found: {found})")
    if not isinstance(node, h5py.Dataset):
        kind = "a group" if isinstance(node, h5py.Group) else f"a {type(node).__name__}"
        raise ConfigError(f"{str(path)!r}: {key!r} is {kind}, expected a dataset")
    return node


def _stated_num_classes(value: Any, what: str) -> int:
    """``value`` as a number of classes, or a ConfigError saying what stated it."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):  # a numpy scalar read from an attribute: name it as a plain value
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def compatibility_problems(train: ShardedHDF5, val: ShardedHDF5) -> list[str]:
    """What makes ``val`` unusable with a model trained on ``train`` (sample shape), naming both files."""
    if val.input_shape == train.input_shape:
        return []
    return [f"validation file {str(val.path)!r} has samples of shape {val.input_shape}, training file "
            f"{str(train.path)!r} has {train.input_shape}"]


def read_arrays(path: PathLike, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Read a whole (small) dataset into memory: for tests, examples and single-process baselines only;
    distributed code uses `ShardedHDF5`."""
    with _open_h5(path) as file, _reading(path, f"{x_key!r} and {y_key!r}"):
        return _dataset(file, x_key, path)[()], _dataset(file, y_key, path)[()]


class ShardedHDF5:
    """One rank's view of an HDF5 classification dataset: its shard of each epoch, in batches.

    Every rank constructs it with the same arguments except `rank`; all ranks then get the same
    `num_batches` per epoch (see `mpisgd.data.sharding` for the drop/pad rule and why shards are strided).

    The position (epoch, batch) is the *next* batch iteration will yield; save it in a checkpoint with
    `state_dict()` after an optimizer step, and `load_state_dict()` resumes at exactly the next batch.

    Args:
        path: the HDF5 file.
        rank: this rank, in [0, size).
        size: number of ranks reading the dataset.
        batch_size: samples per batch on this rank.
        num_classes: number of classes; default: the file's ``num_classes`` attribute, else max(y) + 1
            (which reads all of y, the only full read: labels are small). Inferred from the file, it may
            be at most `MAX_INFERRED_CLASSES`; stated here, any positive int.
        seed: shuffling seed, the same on every rank.
        shuffle: a new global permutation every epoch; False keeps file order (strided over ranks).
        remainder: "drop" or "pad", see `mpisgd.data.sharding`.
        drop_last_batch: drop this rank's last partial batch; otherwise it is yielded (all ranks have
            a partial batch of the same size then, so collectives still match).
        check_contents: scan this rank's contiguous block for bad labels and non-finite x now and raise
            `ConfigError`; see the module docstring for distributed use.
        x_key, y_key: dataset names in the file.
    """

    def __init__(
        self,
        path: PathLike,
        rank: int,
        size: int,
        *,
        batch_size: int,
        num_classes: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        remainder: str = "drop",
        drop_last_batch: bool = False,
        check_contents: bool = True,
        x_key: str = "x",
        y_key: str = "y",
    ) -> None:
        check_rank(rank, size)
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        self.path = Path(path)
        self.rank = rank
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.remainder = remainder
        self.drop_last_batch = drop_last_batch
        self._file: h5py.File | None = _open_h5(self.path)
        self._keys = (x_key, y_key)
        try:
            self._x = _dataset(self._file, x_key, path)
            self._y = _dataset(self._file, y_key, path)
            with _reading(path, f"the shapes and dtypes of {x_key!r} and {y_key!r}"):
                self._check_header()
            self.num_samples = int(self._x.shape[0])
            self.input_shape: tuple[int, ...] = tuple(int(d) for d in self._x.shape[1:])
            self.samples_per_rank = samples_per_rank(self.num_samples, size, remainder)
            if drop_last_batch:
                self.num_batches = self.samples_per_rank // batch_size
            else:
                self.num_batches = -(-self.samples_per_rank // batch_size)
            if self.num_batches == 0:
                raise ConfigError(
                    f"{str(path)!r}: each of {size} ranks gets {self.samples_per_rank} samples per epoch, "
                    f"fewer than batch_size={batch_size} with drop_last_batch=True: no batches at all"
                )
            self.num_classes = self._resolve_num_classes(num_classes)
            if check_contents:
                problems = self.content_problems()
                if problems:
                    raise ConfigError("; ".join(problems))
        except BaseException:
            self.close()
            raise
        self.epoch = 0
        self.batch = 0

    # --- validation -------------------------------------------------------------------------------

    def _check_header(self) -> None:
        x, y, where = self._x, self._y, repr(str(self.path))
        for key, node in zip(self._keys, (x, y)):
            if node.shape is None:
                raise ConfigError(f"{where}: {key!r} is an empty dataset with no dataspace")
        if x.ndim < 2:
            raise ConfigError(f"{where}: x must have shape (N, features...), got shape {x.shape}")
        if y.ndim != 1:
            raise ConfigError(f"{where}: y must have shape (N,), got shape {y.shape}")
        if x.dtype.kind not in "fiu":
            raise ConfigError(f"{where}: x must hold floats (or ints), got dtype {x.dtype}")
        if y.dtype.kind not in "iu":
            raise ConfigError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
        values_per_sample = int(np.prod(x.shape[1:], dtype=object))
        if values_per_sample == 0:
            raise ConfigError(f"{where}: x has no features (shape {x.shape})")
        if values_per_sample > MAX_VALUES_PER_SAMPLE:
            raise ConfigError(f"{where}: x has {values_per_sample} values per sample (shape {x.shape}), more "
                              f"than the {MAX_VALUES_PER_SAMPLE} one sample may hold")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"{where}: len(x) = {x.shape[0]} differs from len(y) = {y.shape[0]}")
        if x.shape[0] == 0:
            raise ConfigError(f"{where}: the dataset is empty")
        if x.shape[0] < self.size:
            raise ConfigError(
                f"{where}: fewer samples ({x.shape[0]}) than ranks ({self.size}): every rank needs data"
            )

    def _resolve_num_classes(self, num_classes: int | None) -> int:
        """The number stated by the caller, else the file's attribute, else the largest label + 1: from the
        file, at most MAX_INFERRED_CLASSES, and checked on every rank alike (the attribute, or all labels)."""
        if num_classes is not None:
            return _stated_num_classes(num_classes, "num_classes")
        where = repr(str(self.path))
        assert self._file is not None
        with _reading(self.path, "the attribute 'num_classes'"):
            stored = self._file.attrs.get("num_classes")
        if stored is not None:
            count = _stated_num_classes(stored, f"{where}: the attribute num_classes")
            if count > MAX_INFERRED_CLASSES:
                raise ConfigError(f"{where}: the attribute num_classes = {count} is more than "
                                  f"{MAX_INFERRED_CLASSES} classes; pass --num-classes {count} if that is meant")
            return count
        largest, offset = -1, 0
        for labels in self._scan(self._y, slice(0, len(self._y))):
            bad = np.flatnonzero((labels < 0) | (labels >= MAX_INFERRED_CLASSES))
            if bad.size:
                label, row = int(labels[bad[0]]), offset + int(bad[0])
                hint = "" if label < 0 else (f"; the number of classes is inferred from the labels, up to "
                                             f"{MAX_INFERRED_CLASSES}: pass --num-classes if more are meant")
                raise ConfigError(f"{where}: label {label} at row {row} is outside [0, {MAX_INFERRED_CLASSES})"
                                  f"{hint}")
            largest = max(largest, int(labels.max()))
            offset += len(labels)
        return largest + 1

    def _scan(self, dataset: h5py.Dataset, rows: slice) -> Iterator[np.ndarray]:
        """Yield `rows` of `dataset` in hyperslab chunks of about _SCAN_CHUNK_BYTES."""
        row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64)))
        step = max(1, _SCAN_CHUNK_BYTES // row_bytes)
        for start in range(rows.start, rows.stop, step):
            stop = min(start + step, rows.stop)
            with _reading(self.path, f"rows {start}..{stop - 1} of {dataset.name.lstrip('/')!r}"):
                chunk = dataset[start:stop]
            yield chunk

    def content_problems(self) -> list[str]:
        """Check this rank's contiguous block of rows (over all ranks: every row once).

        Returns:
            Descriptions of what is wrong (labels outside [0, num_classes), non-finite x), naming the
            first offending row; empty when the block is fine.
        """
        block = contiguous_block(self.num_samples, self.rank, self.size)
        where = repr(str(self.path))
        problems = []
        offset = block.start
        for labels in self._scan(self._y, block):
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if bad.size:
                row = offset + int(bad[0])
                problems.append(
                    f"{where}: label {int(labels[bad[0]])} at row {row} is outside [0, {self.num_classes}) "
                    f"(labels must be 0 .. num_classes-1; {bad.size} bad labels in rows {offset}.."
                    f"{offset + len(labels) - 1})"
                )
                break
            offset += len(labels)
        if self._x.dtype.kind == "f":
            offset = block.start
            for features in self._scan(self._x, block):
                # what training sees: float32, where a float64 of 1e300 is infinite too
                flat = features.reshape(len(features), -1)
                with np.errstate(over="ignore"):  # float16: the bound itself overflows to inf, as it should
                    finite = (np.isfinite(flat) & (np.abs(flat) <= _FLOAT32_MAX)).all(axis=1)
                if not finite.all():
                    row = offset + int(np.flatnonzero(~finite)[0])
                    problems.append(f"{where}: x has NaN or infinite values, or values beyond float32's "
                                    f"range (first at row {row})")
                    break
                offset += len(features)
        return problems

    # --- reading -----------------------------------------------------------------------------------

    def shard_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in reading order."""
        return shard_indices(
            self.num_samples,
            self.rank,
            self.size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            remainder=self.remainder,
        )

    def read_rows(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Read rows `indices` (any order, repeats allowed) with one hyperslab selection per dataset.

        Returns:
            (x as float32 tensor of shape ``(len(indices), *input_shape)``, y as int64 tensor).
        """
        if self._file is None:
            raise RuntimeError(f"ShardedHDF5({str(self.path)!r}) is closed")
        # h5py selections must be increasing and unique; read sorted and put rows back in order.
        unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        with _reading(self.path, f"{len(unique)} rows"):
            x = np.asarray(self._x[unique], dtype=np.float32)[inverse]
            y = np.asarray(self._y[unique], dtype=np.int64)[inverse]
        return torch.from_numpy(x), torch.from_numpy(y)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches of `epoch` from `start_batch`; does not move the stored position."""
        if not 0 <= start_batch <= self.num_batches:
            raise ConfigError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        indices = self.shard_indices(epoch)
        for batch in range(start_batch, self.num_batches):
            yield self.read_rows(indices[batch * self.batch_size : (batch + 1) * self.batch_size])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the rest of the current epoch, advancing the position as batches are handed out; after
        the last batch the position is (epoch + 1, 0)."""
        epoch = self.epoch
        for batch, item in enumerate(self.iter_epoch(epoch, self.batch), start=self.batch):
            if batch + 1 < self.num_batches:
                self.epoch, self.batch = epoch, batch + 1
            else:
                self.epoch, self.batch = epoch + 1, 0
            yield item

    def __len__(self) -> int:
        return self.num_batches

    def iter_evaluation(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's contiguous block of rows in file order, each sample of the file exactly once
        over all ranks. Ranks may get different numbers of batches: use it only in loops with no
        collective inside (sum correct counts and sample counts across ranks afterwards)."""
        if self._file is None:
            raise RuntimeError(f"ShardedHDF5({str(self.path)!r}) is closed")
        step = batch_size or self.batch_size
        block = contiguous_block(self.num_samples, self.rank, self.size)
        for start in range(block.start, block.stop, step):
            rows = slice(start, min(start + step, block.stop))
            with _reading(self.path, f"rows {rows.start}..{rows.stop - 1}"):
                x = torch.from_numpy(np.asarray(self._x[rows], dtype=np.float32))
                y = torch.from_numpy(np.asarray(self._y[rows], dtype=np.int64))
            yield x, y

    # --- position ----------------------------------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch to be yielded."""
        return self.epoch, self.batch

    def state_dict(self) -> dict[str, Any]:
        """The data position plus what it is only meaningful with (seed, size, batches per epoch)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "size": self.size,
            "num_batches": self.num_batches,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position saved by `state_dict`.

        Args:
            state: the saved dict.
            strict: require the same seed, number of ranks and batches per epoch (exact resume); with
                False a mismatch restarts the saved epoch from its first batch instead of raising.
        """
        epoch, batch = int(state["epoch"]), int(state["batch"])
        mismatches = [
            f"{key}: saved {state[key]!r}, now {getattr(self, key)!r}"
            for key in ("seed", "size", "num_batches")
            if key in state and state[key] != getattr(self, key)
        ]
        if mismatches:
            if strict:
                raise ConfigError(
                    "cannot resume the data position exactly (" + "; ".join(mismatches) + "); "
                    "use the same seed, number of ranks and batch size, or strict=False to restart the epoch"
                )
            batch = 0
        if epoch < 0 or not 0 <= batch < self.num_batches:
            raise ConfigError(f"invalid data position (epoch={epoch}, batch={batch})")
        self.epoch, self.batch = epoch, batch

    # --- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardedHDF5:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ShardedHDF5({str(self.path)!r}, rank={self.rank}, size={self.size}, "
            f"batch_size={self.batch_size}, num_samples={self.num_samples}, num_batches={self.num_batches})"
        )
