"""Checkpoints in HDF5: everything needed to continue a run exactly where it stopped, and proof that a
file is the one that was written.

A checkpoint holds the model and optimizer/scheduler state dicts, the random number generator states
(torch, CUDA, numpy, python) and the data position, plus free `extra` data, each stored as an HDF5
tree by :mod:`mpisgd.state_tree` (bit-exact, dtype kept). So `torch.optim.SGD`, `LARS` and `LambdaLR`
state comes back equal, and training resumed from a checkpoint is bitwise identical to training straight through (CPU).

Why atomic: a job killed while writing (time limit, preemption, node failure) must not destroy the
previous checkpoint. Files are written to a temporary file in the same directory, fsynced, renamed over
the target with `os.replace` (atomic on POSIX file systems) and the directory is fsynced; readers see the
old or the new file, never half of one.

Why checksums (format 2): a damaged file that is still valid HDF5 (bytes flipped inside a weight array)
would otherwise resume silently and fail much later, far from the cause. Every file starts with a
512-byte header (an HDF5 user block, which HDF5 itself skips) holding the SHA-256 and length of the rest
of the file; every dataset carries the SHA-256 of its own bytes, and a manifest lists every dataset with
its checksum (so swapped or missing arrays are found, and a mismatch names the array). The root
attributes say what wrote the file (:data:`FORMAT_VERSION`, mpisgd version, strategy, world layout).
:func:`load_checkpoint` verifies all of it before returning anything and raises
:class:`~mpisgd.errors.CheckpointError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional, Union

import h5py
import numpy as np
import torch

from mpisgd import faults, state_tree
from mpisgd.errors import CheckpointError, ConfigError
from mpisgd.state_tree import CHECKSUM, array_digest, read_node, text_digest

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 2  # 2: checksum header, per-array checksums, manifest, writer (1 had none of them)
SECTIONS = ("model_state", "optimizer_state", "scheduler_state", "rng_states", "data_position", "extra")
CHECKPOINT_PREFIX = "checkpoint"

_MANIFEST = "__manifest__"  # root dataset: tagged-JSON {dataset path: sha256} of every other dataset
HEADER_BYTES = 512  # the HDF5 user block holding the file's checksum
_MAGIC = b"MPISGD-CHECKPOINT\n"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HASH_CHUNK = 1 << 20


# --- atomic files ----------------------------------------------------------------------------------


def _fsync_path(path: PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _no_stage(stage: faults.WriteStage) -> None:
    return None


@contextlib.contextmanager
def atomic_h5_file(path: PathLike, *, userblock_size: int = 0, seal: Optional[Callable[[Path], None]] = None,
                   at_stage: Callable[[faults.WriteStage], None] = _no_stage) -> Iterator[h5py.File]:
    """Open a new HDF5 file for writing that appears at `path` only when the block completes.

    The data goes to a temporary file in the same directory (same file system, so the rename is atomic),
    which is flushed to disk, renamed over `path`, and the directory flushed. If the block raises, the
    temporary file is removed and `path` keeps its previous content.

    Args:
        userblock_size: bytes HDF5 leaves free at the start of the file (0, or a power of two >= 512).
        seal: called with the temporary file's path once HDF5 has closed it, before the fsync (the
            checkpoint writes its checksum header there).
        at_stage: called at each :class:`~mpisgd.faults.WriteStage` after the first (test fault hooks).
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    options = {"userblock_size": userblock_size} if userblock_size else {}
    try:
        with h5py.File(temporary, "w", **options) as file:
            yield file
        at_stage(faults.WriteStage.AFTER_TEMP_WRITE)
        if seal is not None:
            seal(Path(temporary))
        at_stage(faults.WriteStage.AFTER_CHECKSUM)
        _fsync_path(temporary)
        at_stage(faults.WriteStage.AFTER_FSYNC)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    at_stage(faults.WriteStage.AFTER_RENAME)
    _fsync_path(path.parent, directory=True)
    at_stage(faults.WriteStage.AFTER_DIRECTORY_FSYNC)


# --- checksums -----------------------------------------------------------------------------------


def _header(digest: str, length: int) -> bytes:
    """The user block: magic, format version, SHA-256 and length of the rest; zeros to HEADER_BYTES."""
    text = _MAGIC + f"format {FORMAT_VERSION}\nsha256 {digest}\nbytes {length}\n".encode("ascii")
    return text.ljust(HEADER_BYTES, b"\0")


def _digest_after_header(path: Path) -> tuple[str, int]:
    digest, length = hashlib.sha256(), 0
    with open(path, "rb") as file:
        file.seek(HEADER_BYTES)
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


def _seal(path: Path) -> None:
    """Write the checksum header into the user block of the finished temporary file."""
    digest, length = _digest_after_header(path)
    with open(path, "r+b") as file:
        file.write(_header(digest, length))


# --- public API -------------------------------------------------------------------------------------


def save_checkpoint(
    path: PathLike,
    *,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    rng_states: dict[str, Any] | None = None,
    data_position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    writer: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically, with its checksums (see the module docstring).

    Args:
        path: the file; its directory must exist.
        model_state: ``model.state_dict()``.
        optimizer_state: ``optimizer.state_dict()``.
        scheduler_state: ``scheduler.state_dict()``.
        rng_states: `capture_rng_states()`.
        data_position: ``ShardedHDF5.state_dict()``.
        extra: anything else made of dicts, lists, tuples, tensors, arrays, numbers, strings and None
            (step counter, config, metrics).
        writer: what wrote the file, JSON-able (``strategy``, ``layout``: the world layout); stored in
            the root attributes with the format version and the mpisgd version.

    Returns:
        The path written.

    Raises:
        TypeError: a value cannot be stored (named by its position in the state); the previous file at
            `path` is left untouched.
    """
    sections = {
        "model_state": model_state,
        "optimizer_state": optimizer_state,
        "scheduler_state": scheduler_state,
        "rng_states": rng_states,
        "data_position": data_position,
        "extra": extra,
    }
    from mpisgd import __version__

    fault = faults.checkpoint_fault()
    at_stage = fault.strike if fault is not None else _no_stage
    if fault is not None:
        fault.begin_write()
    path = Path(path)
    with atomic_h5_file(path, userblock_size=HEADER_BYTES, seal=_seal, at_stage=at_stage) as file:
        file.attrs["format"] = "mpisgd-checkpoint"
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["writer"] = json.dumps({"mpisgd_version": __version__, **(writer or {})})
        for name, state in sections.items():
            if state is not None:
                state_tree.write_node(file, name, state, name)
                at_stage(faults.WriteStage.DURING_WRITE)
        digests: dict[str, str] = {}
        file.visititems(lambda name, node: digests.__setitem__(node.name, node.attrs[CHECKSUM])
                        if isinstance(node, h5py.Dataset) else None)
        text = json.dumps(digests, sort_keys=True)
        file.create_dataset(_MANIFEST, data=text, dtype=h5py.string_dtype("utf-8"))
        file.attrs["manifest_sha256"] = text_digest(text)
    return path


def _refuse(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} {reason}")


def _check_header(path: Path) -> None:
    """The checksum header and the bytes after it: present, complete, unchanged."""
    with open(path, "rb") as file:
        head = file.read(HEADER_BYTES)
    if head.startswith(_HDF5_SIGNATURE):
        try:
            with h5py.File(path, "r") as old:
                ours = old.attrs.get("format") == "mpisgd-checkpoint"
                version = int(old.attrs.get("format_version", -1))
        except Exception:  # noqa: BLE001 - any failure means: not one of ours
            ours, version = False, -1
        if ours:
            raise _refuse(path, f"has format version {version} (no checksums, written by an older mpisgd); "
                                f"this mpisgd reads format {FORMAT_VERSION}")
        raise _refuse(path, "is an HDF5 file but not an mpisgd checkpoint")
    if not head.startswith(_MAGIC):
        raise _refuse(path, "cannot be read as HDF5: it is not an mpisgd checkpoint (no mpisgd header)")
    fields = dict(line.split(" ", 1) for line in head[len(_MAGIC):].split(b"\0", 1)[0].decode(
        "ascii", "replace").splitlines() if " " in line)
    if fields.get("format", "").isdigit() and int(fields["format"]) != FORMAT_VERSION:
        raise _refuse(path, f"has format version {fields['format']}; this mpisgd reads format {FORMAT_VERSION}")
    try:
        digest, length = fields["sha256"], int(fields["bytes"])
    except (KeyError, ValueError):
        raise _refuse(path, "has a damaged header (its checksum cannot be read)") from None
    if _header(digest, length) != head:
        raise _refuse(path, "has a damaged header")
    actual, actual_length = _digest_after_header(path)
    if actual_length != length:
        raise _refuse(path, f"is truncated or extended: {actual_length + HEADER_BYTES} bytes, "
                            f"written with {length + HEADER_BYTES}")
    if actual != digest:
        raise _refuse(path, f"does not match its checksum: its contents changed after it was written "
                            f"({_damaged_part(path)})")


def _damaged_part(path: Path) -> str:
    """Best effort, for the message: which arrays no longer match their checksums."""
    damaged: list[str] = []

    def check(name: str, node: Any) -> None:
        if isinstance(node, h5py.Dataset) and node.name != f"/{_MANIFEST}":
            try:
                value = node.asstr()[()] if node.attrs.get("kind") == "json" else node[()]
                digest = text_digest(value) if isinstance(value, str) else array_digest(value)
            except Exception:  # noqa: BLE001 - unreadable counts as damaged
                digest = ""
            if node.attrs.get(CHECKSUM) != digest:
                damaged.append(node.name)

    try:
        with h5py.File(path, "r") as file:
            file.visititems(check)
    except Exception:  # noqa: BLE001
        return "its HDF5 structure is damaged"
    return f"damaged arrays: {', '.join(damaged[:5])}" if damaged else "damaged outside the arrays"


def read_writer(path: PathLike) -> dict[str, Any]:
    """What wrote the checkpoint at ``path`` (format version, mpisgd version, strategy, layout), unverified."""
    with h5py.File(path, "r") as file:
        return {"format_version": int(file.attrs.get("format_version", -1)),
                **json.loads(str(file.attrs.get("writer", "{}")))}


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, verifying all of it before returning anything.

    Returns:
        A dict with every key of `SECTIONS` (sections that were not saved are None) and ``writer``
        (what wrote the file). Tensors are on the CPU; ``load_state_dict`` moves them where the model lives.
    Raises:
        CheckpointError: the file is missing, truncated, damaged (a checksum differs: the message names
            the array where it can), of another format version, or not an mpisgd checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "does not exist")
    try:
        _check_header(path)
        with h5py.File(path, "r") as file:
            if file.attrs.get("format") != "mpisgd-checkpoint":
                raise _refuse(path, "is not an mpisgd checkpoint")
            version = int(file.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise _refuse(path, f"has format version {version}; this mpisgd reads format {FORMAT_VERSION}")
            text = file[_MANIFEST].asstr()[()]
            if text_digest(text) != file.attrs.get("manifest_sha256"):
                raise _refuse(path, "has a manifest that does not match its checksum")
            manifest = json.loads(text)
            present: set = set()
            file.visititems(lambda name, node: present.add(node.name) if isinstance(node, h5py.Dataset) else None)
            if present - {f"/{_MANIFEST}"} != set(manifest):
                odd = sorted(present.symmetric_difference(manifest) - {f"/{_MANIFEST}"})
                raise _refuse(path, f"does not hold the arrays its manifest lists: {', '.join(odd[:5])}")
            state = {name: (read_node(file[name], manifest) if name in file else None) for name in SECTIONS}
            state["writer"] = {"format_version": version, **json.loads(str(file.attrs["writer"]))}
            return state
    except CheckpointError as exc:
        if str(path) in str(exc):
            raise
        raise _refuse(path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes h5py or json raise
        raise _refuse(path, f"cannot be read: {type(exc).__name__}: {exc}") from None


def checkpoint_path(directory: PathLike, step: int, prefix: str = CHECKPOINT_PREFIX) -> Path:
    """The conventional file name of the checkpoint after `step` steps: ``<prefix>-<step:09d>.h5``."""
    return Path(directory) / f"{prefix}-{int(step):09d}.h5"


def list_checkpoints(directory: PathLike, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Checkpoints named by `checkpoint_path` in `directory`, oldest step first (temp files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.h5$")
    found = []
    for entry in directory.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def latest_checkpoint(directory: PathLike, prefix: str = CHECKPOINT_PREFIX) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None when there is none."""
    found = list_checkpoints(directory, prefix)
    return found[-1] if found else None


def prune_checkpoints(directory: PathLike, keep: int, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Delete all but the newest `keep` (>= 1) checkpoints; returns the deleted paths."""
    if keep < 1:
        raise ConfigError(f"keep must be >= 1 (never delete the latest checkpoint), got {keep}")
    doomed = list_checkpoints(directory, prefix)[:-keep]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return doomed


def stale_temporaries(directory: PathLike, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Temporary files a killed writer left in ``directory`` (``.<prefix>-<step>.h5.*.tmp``)."""
    directory = Path(directory)
    pattern = re.compile(rf"^\.{re.escape(prefix)}-\d+\.h5\..*\.tmp$")
    return sorted(entry for entry in directory.iterdir() if pattern.match(entry.name)) if directory.is_dir() else []


def capture_rng_states() -> dict[str, Any]:
    """The states of every random number generator a training step may draw from: torch CPU, all CUDA
    devices (when CUDA is available), numpy's global generator and Python's `random`."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the generator states returned by `capture_rng_states` (CUDA only when available)."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))
