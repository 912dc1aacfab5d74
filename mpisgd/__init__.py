"""mpisgd: distributed SGD over MPI.

Synchronous large-minibatch SGD with a recursive halving-doubling all-reduce, asynchronous
Downpour SGD / DC-ASGD on a parameter server over one-sided MPI, and Sandblaster L-BFGS.
The names here are the flat public API (see README.md). Importing mpisgd does not initialize MPI:
the communication names load mpi4py on first use, so MPI-free parts (optim, data, models) stay so.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Optional

from mpisgd import _deprecated
from mpisgd.errors import CollectiveTimeout, CommError, ConfigError, MpisgdError, UnfinishedCollective

_deprecated.install()

__version__ = "0.1.0"

_LAZY = {
    "AllreduceConfig": "mpisgd.comm", "Communicator": "mpisgd.comm", "get_communicator": "mpisgd.comm",
    "DistributedOptimizer": "mpisgd.sync.optimizer", "broadcast_parameters": "mpisgd.sync.optimizer",
    "broadcast_optimizer_state": "mpisgd.sync.optimizer", "NonFiniteGradientError": "mpisgd.sync.optimizer",
    "ModelParallel": "mpisgd.modelparallel",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpisgd' has no attribute {name!r}")


def _comm(comm: Any):
    global _get_communicator
    if _get_communicator is None:  # loads mpi4py: on first use, not at import (an import per call costs ~0.7 us)
        from mpisgd.comm import get_communicator
        _get_communicator = get_communicator
    return _get_communicator(comm)


_get_communicator: Any = None


def allreduce(x: Any, op: str = "sum", *, algorithm: str = "auto", comm: Any = None,
              timeout: Optional[float] = None) -> Any:
    """Reduce ``x`` over all ranks into a new array/tensor of the same kind, dtype and device.

    Args:
        x: numpy array, torch tensor (CPU or CUDA) or cupy array of float16, bfloat16, float32,
            float64, int32 or int64 (half precision is accumulated in float32).
        op: "sum", "mean", "max" or "min".
        algorithm: "auto", "rhd" (recursive halving-doubling), "ring" or "native" (MPI_Allreduce).
        comm: mpi4py communicator or mpisgd Communicator; COMM_WORLD (duplicated) when None.
        timeout: seconds without progress before :class:`CollectiveTimeout` on every live rank (default: the
            communicator's, ``MPISGD_COLLECTIVE_TIMEOUT`` or 600).
    Returns:
        The reduced copy; every rank holds bitwise-identical values.
    """
    communicator = _comm(comm)
    with communicator.watchdog.timeout_of(timeout):
        return communicator.allreduce(x, op, algorithm=algorithm)


def allreduce_(x: Any, op: str = "sum", *, algorithm: str = "auto", comm: Any = None,
               timeout: Optional[float] = None) -> Any:
    """In-place :func:`allreduce`: ``x`` is overwritten with the result and returned."""
    communicator = _comm(comm)
    if timeout is None:  # a small all-reduce's latency is a few microseconds: no context manager then
        return communicator.allreduce_(x, op, algorithm=algorithm)
    with communicator.watchdog.timeout_of(timeout):
        return communicator.allreduce_(x, op, algorithm=algorithm)


def allreduce_many_(arrays: Sequence[Any], op: str = "sum", *, algorithm: str = "auto",
                    comm: Any = None, bucket_bytes: int = 64 << 20, timeout: Optional[float] = None) -> Sequence[Any]:
    """In-place all-reduce of many arrays fused into flat buckets (one collective per bucket)."""
    communicator = _comm(comm)
    with communicator.watchdog.timeout_of(timeout):
        return communicator.allreduce_many_(arrays, op, algorithm=algorithm, bucket_bytes=bucket_bytes)


def broadcast_(x: Any, root: int = 0, *, comm: Any = None, timeout: Optional[float] = None) -> Any:
    """Overwrite ``x`` on every rank with the values of ``root``, in place."""
    communicator = _comm(comm)
    with communicator.watchdog.timeout_of(timeout):
        return communicator.broadcast_(x, root)


__all__ = ["AllreduceConfig", "CollectiveTimeout", "CommError", "Communicator", "ConfigError", "DistributedOptimizer", "ModelParallel",
           "MpisgdError", "NonFiniteGradientError", "UnfinishedCollective", "__version__", "allreduce", "allreduce_", "allreduce_many_", "broadcast_",
           "broadcast_optimizer_state", "broadcast_parameters", "get_communicator"]
