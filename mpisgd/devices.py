"""Which device a rank computes on, and whether the MPI library may be handed device memory.

Two decisions taken once per process and nowhere else: the GPU of a rank (by its node-local rank,
from MPI's shared-memory split, so that two ranks of a node never share a GPU by accident), and
whether MPI is CUDA-aware (:func:`cuda_awareness`). Where it is not, :mod:`mpisgd.arrays` stages
device buffers through host memory; the array libraries themselves are known to that module only.
"""

from __future__ import annotations

import ctypes
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from mpi4py import MPI

from mpisgd import environment
from mpisgd.arrays import available_backends, gpu_count
from mpisgd.errors import ConfigError

__all__ = ["CudaAwareness", "available_backends", "cuda_awareness", "gpu_count", "select_device"]


@dataclass(frozen=True)
class CudaAwareness:
    """Whether device buffers may be passed to MPI, and how that was decided."""

    cuda_aware: bool
    how: str


def _loaded_mpi_library() -> Optional[str]:
    """Path of the libmpi that mpi4py loaded, read from this process's memory map."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                base = os.path.basename(path)
                if base.startswith(("libmpi.so", "libmpi_", "libmpich")):
                    return path
    except OSError:
        pass
    return None


def _query_symbols(lib_path: Optional[str]) -> Optional[CudaAwareness]:
    """Ask the MPI library itself through its extension symbols (MPICH and Open MPI)."""
    handles = []
    if lib_path:
        try:
            handles.append(ctypes.CDLL(lib_path, mode=ctypes.RTLD_GLOBAL))
        except OSError:
            pass
    handles.append(ctypes.CDLL(None))
    for lib in handles:
        query = getattr(lib, "MPIX_GPU_query_support", None)  # MPICH >= 4
        if query is not None:
            supported = ctypes.c_int(0)
            mpix_gpu_support_cuda = 0
            if query(mpix_gpu_support_cuda, ctypes.byref(supported)) == 0:
                return CudaAwareness(bool(supported.value),
                                     f"MPIX_GPU_query_support(CUDA) returned {supported.value}")
        query = getattr(lib, "MPIX_Query_cuda_support", None)  # Open MPI
        if query is not None:
            value = int(query())
            return CudaAwareness(bool(value), f"MPIX_Query_cuda_support() returned {value}")
    return None


def _query_alloc_kinds() -> Optional[CudaAwareness]:
    """MPI 4.1: the info key mpi_memory_alloc_kinds lists 'cuda' when device memory is supported."""
    try:
        info = MPI.COMM_WORLD.Get_info()
        kinds = info.Get("mpi_memory_alloc_kinds")
        info.Free()
    except (MPI.Exception, AttributeError, NotImplementedError):
        return None
    if not kinds:
        return None
    return CudaAwareness("cuda" in kinds, f"mpi_memory_alloc_kinds = {kinds!r}")


#: what :func:`cuda_awareness` says when neither the override nor any query answers
NO_ANSWER = CudaAwareness(False, "no query answered; assuming host-only MPI")


@lru_cache(maxsize=1)
def cuda_awareness() -> CudaAwareness:
    """Decide once per process whether MPI takes CUDA buffers.

    Order: the explicit override ``MPISGD_CUDA_AWARE=0|1``, then the MPI library's own query
    symbols, then the MPI-4.1 info key; when none answers, assume not CUDA-aware (staging is
    always correct, passing device pointers to a host-only MPI crashes).
    """
    override = environment.read("MPISGD_CUDA_AWARE")
    if override is not None:
        return CudaAwareness(bool(override), f"MPISGD_CUDA_AWARE={int(bool(override))}")
    for answer in (_query_symbols(_loaded_mpi_library()), _query_alloc_kinds()):
        if answer is not None:
            return answer
    return NO_ANSWER


def select_device(local_rank: int, local_size: int, *, want_gpu: bool, share_gpus: bool = False) -> str:
    """The device of a rank: one GPU per node-local rank, or 'cpu'.

    Mapping by node-local rank (from MPI's shared-memory split) is what keeps two ranks of one node
    off the same GPU; more ranks per node than GPUs is an error unless sharing is asked for.
    """
    if not want_gpu:
        return "cpu"
    gpus = gpu_count()
    if gpus == 0:
        raise ConfigError("GPU mode was requested but no CUDA device is visible on this node")
    if local_size > gpus and not share_gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ConfigError(
            f"{local_size} ranks on this node but only {gpus} GPU(s){shown} on {socket.gethostname()}; launch "
            f"at most {gpus} ranks per node (srun --ntasks-per-node={gpus}, mpiexec -ppn {gpus}) or allow "
            "sharing (--share-gpus)")
    return f"cuda:{local_rank % gpus}"
