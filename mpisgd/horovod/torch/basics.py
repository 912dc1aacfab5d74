"""Horovod's basics: ``init``/``shutdown``, the rank layout queries, what is "built", the op constants.

The layout comes from mpisgd's :class:`~mpisgd.comm.Communicator` (local ranks from MPI's
shared-memory split, not from launcher variables), so it is right under mpiexec, mpirun and srun.
``init`` starts the background coordinator (``coordinator.py``) that owns every message of this
module; ``shutdown`` (also run at interpreter exit) stops it on every rank together.
"""

from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Optional

from mpi4py import MPI

from mpisgd import environment
from mpisgd.comm import objects
from mpisgd.comm.blocking import blocking_collective
from mpisgd.errors import CommError, SharedConfigError

logger = logging.getLogger(__name__)


class ReduceOp(IntEnum):
    """Horovod's reduction operations, with Horovod's numbering."""

    AVERAGE = 0
    SUM = 1
    ADASUM = 2
    MIN = 3
    MAX = 4
    PRODUCT = 5


Average, Sum, Adasum, Min, Max, Product = (ReduceOp.AVERAGE, ReduceOp.SUM, ReduceOp.ADASUM, ReduceOp.MIN,
                                           ReduceOp.MAX, ReduceOp.PRODUCT)


class HorovodInternalError(CommError):
    """A collective failed (ranks disagreed, an operation stalled, Horovod was shut down).

    Raised on every rank that took part, with the same text, as Horovod does (it is a RuntimeError).
    """

    every_rank = True


NOT_INITIALIZED = "Horovod has not been initialized; use hvd.init()."


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """The HOROVOD_* knobs this implementation honours, read once at ``init`` (Horovod's defaults).

    ``fusion_threshold_bytes``: allreduces ready in one cycle are fused into messages of at most this
    size (HOROVOD_FUSION_THRESHOLD, 128 MiB); ``cycle_time_s``: the pause between idle negotiation
    cycles (HOROVOD_CYCLE_TIME in ms, 1 ms; a cycle never pauses while work is pending);
    ``stall_check_s``: warn about operations some ranks submitted and others not after this long
    (HOROVOD_STALL_CHECK_TIME_SECONDS, 60; HOROVOD_STALL_CHECK_DISABLE=1 turns it off);
    ``stall_shutdown_s``: fail them with HorovodInternalError after this long
    (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, 0 = never); ``cache_capacity``: names remembered for the
    compact steady-state negotiation (HOROVOD_CACHE_CAPACITY, 1024); ``speculation``: send a repeated
    small allreduce in one message without a negotiation (MPISGD_HOROVOD_SPECULATION: auto = on, or off).
    """

    fusion_threshold_bytes: int = 128 << 20
    cycle_time_s: float = 1e-3
    stall_check_s: float = 60.0
    stall_shutdown_s: float = 0.0
    cache_capacity: int = 1024
    speculation: str = "auto"

    @classmethod
    def from_environment(cls) -> Settings:
        stall_check = _env_number("HOROVOD_STALL_CHECK_TIME_SECONDS", 60.0)
        if os.environ.get("HOROVOD_STALL_CHECK_DISABLE") == "1":
            stall_check = 0.0
        return cls(fusion_threshold_bytes=int(_env_number("HOROVOD_FUSION_THRESHOLD", 128 << 20)),
                   cycle_time_s=_env_number("HOROVOD_CYCLE_TIME", 1.0) / 1000.0,
                   stall_check_s=stall_check,
                   stall_shutdown_s=_env_number("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 0.0),
                   cache_capacity=int(_env_number("HOROVOD_CACHE_CAPACITY", 1024)),
                   speculation=str(environment.read("MPISGD_HOROVOD_SPECULATION", "auto")))


def _agreed_settings(comm: Any) -> Settings:
    """:meth:`Settings.from_environment` on every rank of ``comm`` (an mpisgd Communicator), where a
    malformed variable on any rank is the same ValueError on every rank: a rank that raised alone
    would leave the others waiting in the coordinator's first cycle until the collective timeout."""
    settings: Optional[Settings] = None
    problem: Optional[str] = None
    try:
        settings = Settings.from_environment()
    except ValueError as error:  # mpisgd.environment's ConfigError is one
        problem = str(error)
    problems = objects.allgather_objects(comm, problem, name="Horovod settings")
    bad = [f"rank {rank}: {text}" for rank, text in enumerate(problems) if text is not None]
    if bad or settings is None:
        raise SharedConfigError("hvd.init(): " + "; ".join(bad))
    return settings


@dataclass(frozen=True)
class Layout:
    """Where this process sits: in the job, on its node, and among the ranks of its local rank."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    homogeneous: bool


def _layout(comm: Any) -> Layout:
    """Collective over ``comm`` (an mpisgd Communicator)."""
    local = comm.local
    node_leader = objects.bcast_object(objects.Watched(local, comm.wait), comm.rank, name="Horovod node leader")
    everyone = objects.allgather_objects(comm, (node_leader, local.Get_rank(), local.Get_size()),
                                         name="Horovod layout")
    same_local_rank = sorted({leader for leader, lr, _ in everyone if lr == local.Get_rank()})
    return Layout(rank=comm.rank, size=comm.size, local_rank=local.Get_rank(), local_size=local.Get_size(),
                  cross_rank=same_local_rank.index(node_leader), cross_size=len(same_local_rank),
                  homogeneous=len({ls for _, _, ls in everyone}) == 1)


class Runtime:
    """What ``init`` sets up: the communicator, the layout, the coordinator, the process sets."""

    def __init__(self, comm: Any, process_sets: Any) -> None:
        from mpisgd.comm import get_communicator
        from mpisgd.horovod.torch.coordinator import Coordinator
        from mpisgd.horovod.torch.process_sets import ProcessSetTable

        self.communicator = get_communicator(comm)
        self.layout = _layout(self.communicator)
        self.settings = _agreed_settings(self.communicator)
        self.process_sets = ProcessSetTable(self.communicator)
        self.coordinator = Coordinator(self.communicator, self.process_sets, self.settings)
        self.dynamic_process_sets = process_sets == "dynamic" or os.environ.get(
            "HOROVOD_DYNAMIC_PROCESS_SETS") == "1"
        if process_sets not in (None, "dynamic"):
            for process_set in process_sets:
                self.process_sets.add(process_set)
        self.coordinator.start()


_lock = threading.Lock()
_runtime: Optional[Runtime] = None


def runtime() -> Runtime:
    """The running Runtime; ValueError (Horovod's message) before ``init``."""
    if _runtime is None:
        raise ValueError(NOT_INITIALIZED)
    return _runtime


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Start Horovod on ``comm`` (an mpi4py communicator, a list of COMM_WORLD ranks, or None for
    COMM_WORLD); idempotent. ``process_sets``: ProcessSets to register now, or "dynamic".

    Collective over the communicator's ranks.
    """
    global _runtime
    with _lock:
        if _runtime is not None:
            return
        if isinstance(comm, (list, tuple, range)):
            ranks = sorted(int(r) for r in comm)
            with blocking_collective("horovod init: the communicator of the given ranks"):
                comm = MPI.COMM_WORLD.Create_group(MPI.COMM_WORLD.Get_group().Incl(ranks))
        from mpisgd.horovod.torch import process_sets as process_sets_module

        _runtime = Runtime(comm, process_sets)
        # registered now, after mpisgd's own exit handlers (atexit runs the last registered first): the
        # coordinator thread stops before the watchdog frees the windows it waits on, and before MPI_Finalize
        atexit.register(shutdown)
        # The coordinator makes many short-lived objects per cycle; each full collection they trigger
        # rescanned every object alive (torch's ~170k: ~40 ms), which cost 2.5 ms per cycle of 100 tensors.
        # What exists at init (modules, the model) moves to the permanent generation and is not rescanned.
        gc.freeze()
        process_sets_module.global_process_set.attach(0, tuple(range(_runtime.layout.size)))


def shutdown() -> None:
    """Stop the coordinator on every rank (the first rank to call it stops them all); operations still
    pending fail with HorovodInternalError. ``init`` may be called again afterwards."""
    global _runtime
    with _lock:
        current, _runtime = _runtime, None
    if current is not None:
        current.coordinator.stop()
        current.process_sets.free()




def is_initialized() -> bool:
    return _runtime is not None


def size() -> int:
    """Number of Horovod processes."""
    return runtime().layout.size


def rank() -> int:
    """This process's rank among all Horovod processes."""
    return runtime().layout.rank


def local_size() -> int:
    """Number of Horovod processes on this node."""
    return runtime().layout.local_size


def local_rank() -> int:
    """This process's rank among the processes on its node."""
    return runtime().layout.local_rank


def cross_size() -> int:
    """Number of nodes that have a process with this process's local rank."""
    return runtime().layout.cross_size


def cross_rank() -> int:
    """This node's index among the nodes that have a process with this local rank."""
    return runtime().layout.cross_rank


def is_homogeneous() -> bool:
    """Every node runs the same number of processes."""
    return runtime().layout.homogeneous


def mpi_threads_supported() -> bool:
    """MPI was initialized with MPI_THREAD_MULTIPLE (mpi4py's default)."""
    runtime()
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_built() -> bool:
    return True


def mpi_enabled() -> bool:
    return True


def _not_built() -> bool:
    return False


gloo_built = gloo_enabled = nccl_built = ddl_built = ccl_built = cuda_built = rocm_built = _not_built


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Accepted for compatibility; no timeline is written (see docs/horovod.rst)."""
    logger.warning("hvd.start_timeline: timelines are not supported by mpisgd.horovod; ignored")


def stop_timeline() -> None:
    """Accepted for compatibility (see :func:`start_timeline`)."""
