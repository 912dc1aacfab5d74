"""The library-owned communicator: rank layout, all-reduce dispatch, fused buckets, mismatch checks.

mpisgd never sends its own messages on the user's communicator: it duplicates COMM_WORLD (or the
``comm=`` given) once, so user messages and library messages can never match each other.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from mpisgd import arrays as backend
from mpisgd.comm.algorithms import ALGORITHMS
from mpisgd.comm.shm import SharedMemoryAllreduce
from mpisgd.errors import CommError, ConfigError, MpisgdError

OPS = ("sum", "mean", "max", "min")
ALGORITHM_NAMES = ("auto", "rhd", "ring", "shm", "hier", "native")
NON_POWER_OF_TWO_CHOICES = ("ring", "rhd")
DEFAULT_BUCKET_BYTES = 64 << 20
#: fused buckets from this size go through the shared window under ``auto`` (below, MPI's own
#: Allreduce of the bucket is as fast: the window's two barriers cost about as much)
SHM_FUSION_MIN_BYTES = 256 << 10


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer number of bytes, got {raw!r}") from None


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


@dataclass(frozen=True)
class AllreduceConfig:
    """How ``algorithm="auto"`` chooses, and whether calls are checked for mismatches.

    Defaults come from measurements on a 2-core machine with the MPICH wheel (see BENCHMARKS.md):
    below ``native_below_bytes`` the MPI library's own Allreduce wins because each Python-level
    step costs microseconds. Where every rank is on one node and ``shared_memory`` is on, ``shm``
    (a shared-memory window) serves fused host buckets of at least 256 KiB (packed straight into
    the window: nothing else copies less), and single vectors from ``native_below_bytes`` up to
    ``shm_below_bytes``;
    above that ``rhd`` wins for powers of two, and ``non_power_of_two``
    (``ring`` by default: the fold of ``rhd`` idles ranks) for other process counts. Across nodes
    with several ranks on a node, native only below 512 KiB. ``hierarchical`` (off by default, as in
    Horovod) makes ``auto`` use ``hier`` across nodes with the same number of ranks on each (more than
    one) from ``native_below_bytes``, fused buckets included: each node's ranks sum through the
    window and only the node's sum crosses the network, split over its ranks. It sends a node's
    vector over the network once instead of once per rank, but copies more in memory; on nodes
    emulated on one machine, where the "network" is as fast as memory, it lost to rhd/ring.
    ``None`` thresholds mean the measured defaults: on one node with a process count of more than 2
    that is not a power of two, native below 512 KiB and shm below 4 MiB (there MPICH's own folds
    and idles ranks; shm took 0.66-0.91x of its time at p = 3, 5, 6); otherwise no shm for single
    vectors (at p = 2, 4 and 8 it lost to MPICH's own Rabenseifner by 1.1-1.45x from 512 KiB to 4 MiB)
    and native below 2 MiB up to two ranks, 4 MiB beyond. ``shm_area_bytes``: the window's slot per rank (two
    per rank, and two result areas); fused host buckets are cut to it. Environment overrides: MPISGD_SHM=0|1, MPISGD_AUTO_NATIVE_BELOW,
    MPISGD_AUTO_SHM_BELOW, MPISGD_SHM_AREA_BYTES (bytes), MPISGD_AUTO_NON_POWER_OF_TWO, MPISGD_HIERARCHICAL=0|1,
    MPISGD_CHECK_COLLECTIVES=0|1, MPISGD_YIELD_WHEN_WAITING=auto|0|1 (rhd/ring/shm wait by yielding
    the CPU instead of spinning; auto: when this node runs more ranks than it has cores),
    MPISGD_SEGMENT_BYTES (``segment_bytes``: rhd and ring receive what they reduce in pieces of this
    size, each reduced while still in cache; 0 = whole; default 256 KiB on one node, where it saved
    ~10%, and 0 across nodes, where on MPICH's network path it cost ~10%).
    """

    native_below_bytes: Optional[int] = field(default_factory=lambda: _env_int("MPISGD_AUTO_NATIVE_BELOW", None))
    shared_memory: bool = field(default_factory=lambda: _env_flag("MPISGD_SHM", True))
    shm_below_bytes: Optional[int] = field(default_factory=lambda: _env_int("MPISGD_AUTO_SHM_BELOW", None))
    shm_area_bytes: int = field(default_factory=lambda: _env_int("MPISGD_SHM_AREA_BYTES", 4 << 20))
    hierarchical: bool = field(default_factory=lambda: _env_flag("MPISGD_HIERARCHICAL", False))
    non_power_of_two: str = field(
        default_factory=lambda: os.environ.get("MPISGD_AUTO_NON_POWER_OF_TWO", "ring"))
    check_collectives: bool = field(default_factory=lambda: _env_flag("MPISGD_CHECK_COLLECTIVES", True))
    yield_when_waiting: str = field(default_factory=lambda: os.environ.get("MPISGD_YIELD_WHEN_WAITING", "auto"))
    segment_bytes: Optional[int] = field(default_factory=lambda: _env_int("MPISGD_SEGMENT_BYTES", None))

    def __post_init__(self):
        if self.native_below_bytes is not None and self.native_below_bytes < 0:
            raise ConfigError(f"native_below_bytes must be >= 0, got {self.native_below_bytes}")
        if self.shm_below_bytes is not None and self.shm_below_bytes < 0:
            raise ConfigError(f"shm_below_bytes must be >= 0, got {self.shm_below_bytes}")
        if self.shm_area_bytes < 4096:
            raise ConfigError(f"shm_area_bytes must be at least 4096, got {self.shm_area_bytes}")
        if self.segment_bytes is not None and self.segment_bytes < 0:
            raise ConfigError(f"segment_bytes must be >= 0 (0: no segments), got {self.segment_bytes}")
        if self.yield_when_waiting not in ("auto", "0", "1"):
            raise ConfigError(f"yield_when_waiting must be auto, 0 or 1, got {self.yield_when_waiting!r}")
        if self.non_power_of_two not in NON_POWER_OF_TWO_CHOICES:
            raise ConfigError(f"non_power_of_two must be one of {NON_POWER_OF_TWO_CHOICES}, "
                              f"got {self.non_power_of_two!r}")


def validate_op_and_algorithm(op: str, algorithm: str) -> None:
    if op not in OPS:
        raise ConfigError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")
    if algorithm not in ALGORITHM_NAMES:
        raise ConfigError(f"unknown algorithm {algorithm!r}; valid algorithms: {', '.join(ALGORITHM_NAMES)}")


class Communicator:
    """mpisgd's communicator: a duplicate of ``comm`` (default COMM_WORLD) plus node-local layout.

    Args:
        comm: the MPI communicator to duplicate; COMM_WORLD when None.
        config: how ``auto`` chooses an algorithm and whether collectives are checked.

    Attributes ``rank``, ``size``, ``local_rank``, ``local_size`` (ranks on this node, from MPI's
    shared-memory split, not from launcher variables) and ``num_nodes`` are fixed at creation.
    Call :meth:`free` (or use ``with``) to release the duplicated communicators.
    """

    def __init__(self, comm: Optional[MPI.Comm] = None, *, config: Optional[AllreduceConfig] = None):
        self.config = config or AllreduceConfig()
        self._mpi: Optional[MPI.Comm] = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self._local: Optional[MPI.Comm] = self._mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self._mpi.Get_rank())
        self.rank = self._mpi.Get_rank()
        self.size = self._mpi.Get_size()
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        self.num_nodes = self._mpi.allreduce(1 if self.local_rank == 0 else 0)
        # the same local rank on every node: the ranks that reduce the same block across nodes ("hier")
        self._cross: Optional[MPI.Comm] = self._mpi.Split(self.local_rank, key=self.rank)
        self.most_ranks_per_node = self._mpi.allreduce(self.local_size, op=MPI.MAX)
        self.uniform_nodes = self._mpi.allreduce(self.local_size, op=MPI.MIN) == self.most_ranks_per_node
        self._workspace: dict = {}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.oversubscribed = self.local_size > cores
        self.polite = {"auto": self.oversubscribed, "1": True, "0": False}[self.config.yield_when_waiting]
        self._check_buf = np.zeros(2, dtype=np.int64)
        self._shm: Optional[SharedMemoryAllreduce] = None
        self._shm_refused = False  # the node's shared memory could not hold the window
        self._agree_on_config()

    def _agree_on_config(self) -> None:
        """Every setting that decides which collectives run must be the same on every rank (they
        come from each rank's environment): otherwise ranks would enter different ones and hang."""
        settings = {name: value for name, value in vars(self.config).items() if name != "yield_when_waiting"}
        everyone = self._mpi.allgather(settings)
        differing = sorted(name for name in settings if any(other[name] != settings[name] for other in everyone))
        if differing:
            ranks = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
            self.free()
            raise ConfigError(f"all-reduce settings differ between ranks ({', '.join(differing)}; ranks "
                              f"{_ranks(ranks)} differ from rank 0): set the MPISGD_* variables alike on "
                              "every node")

    # ---- lifetime ------------------------------------------------------------------------
    @property
    def mpi(self) -> MPI.Comm:
        """The duplicated MPI communicator (for code that needs raw mpi4py calls)."""
        if self._mpi is None:
            raise RuntimeError("mpisgd Communicator used after free()")
        return self._mpi

    @property
    def local(self) -> MPI.Comm:
        """Communicator of the ranks sharing this node."""
        if self._local is None:
            raise RuntimeError("mpisgd Communicator used after free()")
        return self._local

    def free(self) -> None:
        """Release the duplicated communicators and the shared window; later use raises RuntimeError.
        Collective: every rank calls it (freeing a shared window synchronizes the ranks)."""
        if self._shm is not None and not MPI.Is_finalized():
            self._shm.free()
        self._shm = None
        for c in (self._cross, self._local, self._mpi):
            if c is not None and not MPI.Is_finalized():
                c.Free()
        self._mpi = self._local = self._cross = None
        self._workspace.clear()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # collective: a rank unwinding from an error must not wait in it for the others
            self.free()

    def barrier(self) -> None:
        self.mpi.Barrier()

    # ---- workspace -----------------------------------------------------------------------
    def _scratch(self, ops, dtype: str, n: int, role: str):
        """A grow-only buffer per (backend, dtype, role): allocated once, sliced afterwards."""
        key = ops.key(dtype) + (role,)
        buf = self._workspace.get(key)
        if buf is None or len(buf) < n:
            buf = ops.empty(max(n, 1), dtype)
            self._workspace[key] = buf
        return buf[:n]

    # ---- algorithm choice and checks -----------------------------------------------------
    @property
    def single_node(self) -> bool:
        """Every rank on this node: the shared-memory all-reduce can serve the communicator."""
        return self.local_size == self.size

    @property
    def shm_for_fusion(self) -> bool:
        """``auto`` reduces fused host buckets (of at least 256 KiB) through the shared window."""
        return self.size > 1 and self.single_node and self.config.shared_memory and not self._shm_refused

    @property
    def equal_nodes_of_several(self) -> bool:
        """Several nodes with the same number (> 1) of ranks each: where ``hier`` has something to do."""
        return self.num_nodes > 1 and self.uniform_nodes and self.local_size > 1

    @property
    def hierarchical(self) -> bool:
        """``auto`` reduces host buffers across nodes with ``hier`` (fused buckets: of any size)."""
        return (self.equal_nodes_of_several and self.config.hierarchical and self.config.shared_memory
                and not self._shm_refused)

    @property
    def shm_below_bytes(self) -> int:
        """Single vectors from ``native_below_bytes`` up to this go to ``shm`` under ``auto``: by default
        only where the process count is not a power of two (see ``AllreduceConfig``)."""
        if not self.shm_for_fusion:
            return 0
        if self.config.shm_below_bytes is not None:
            return self.config.shm_below_bytes
        return 4 << 20 if self.size > 2 and not is_power_of_two(self.size) else 0

    @property
    def native_below_bytes(self) -> int:
        """Messages smaller than this go to the MPI library's own Allreduce under ``auto`` (the same on
        every rank: it decides which collective they all enter)."""
        if self.config.native_below_bytes is not None:
            return self.config.native_below_bytes
        if self.shm_below_bytes > 0:
            return 512 << 10
        if self.num_nodes > 1 and self.most_ranks_per_node > 1:
            return 512 << 10  # there MPICH's own fell to 0.3x of rhd/ring from 1 MiB (BENCHMARKS.md)
        return 2 << 20 if self.size <= 2 else 4 << 20

    def choose_algorithm(self, nbytes: int, *, host: bool = True) -> str:
        """What ``auto`` runs for a message of ``nbytes`` (in host memory unless ``host=False``)."""
        if self.size == 1 or nbytes < self.native_below_bytes:
            return "native"
        if host and nbytes < self.shm_below_bytes:
            return "shm"
        if host and self.hierarchical:
            return "hier"
        return self._large_message_algorithm()

    def _large_message_algorithm(self, size: Optional[int] = None) -> str:
        """rhd for a power-of-two process count (``size``, default: this communicator's), else the ring."""
        size = self.size if size is None else size
        return "rhd" if is_power_of_two(size) else self.config.non_power_of_two

    def _shared_memory(self, *, required: bool = True) -> Optional[SharedMemoryAllreduce]:
        """The shared window, created on first use (collectively: all ranks choose shm together).
        When /dev/shm is too small, ``auto`` (``required=False``) gets None and uses the others."""
        if self._shm is None and (required or not self._shm_refused):
            error = None
            try:  # the same verdict on every rank of a node: its free space is agreed by MPI_MIN
                self._shm = SharedMemoryAllreduce(self.local, self.config.shm_area_bytes, polite=self.polite)
            except CommError as exc:
                error = str(exc)
            # ... and across nodes, which run "hier" together: one node without a window refuses it for all
            refusals = [e for e in self.mpi.allgather(error) if e]
            if refusals:
                if self._shm is not None:
                    self._shm.free()  # collective on this node, whose ranks all created it
                    self._shm = None
                self._shm_refused = True
                if required:
                    raise CommError(refusals[0])
        return self._shm

    def check_agreement(self, call: str, **fields: Any) -> None:
        """Raise the same CommError on every rank if ranks called ``call`` with different fields.

        Costs one 2-integer MPI_Allreduce (max of hash and of -hash); only on disagreement are the
        descriptions gathered to name the ranks and fields that differ. Without it, ranks calling
        a collective with different shapes would wait for each other forever.
        """
        if not self.config.check_collectives or self.size == 1:
            return
        description = {"call": call, **fields}
        digest = zlib.crc32(repr(description).encode())
        self._check_buf[0], self._check_buf[1] = digest, -digest
        self.mpi.Allreduce(MPI.IN_PLACE, self._check_buf, op=MPI.MAX)
        if self._check_buf[0] == -self._check_buf[1]:
            return
        everyone = self.mpi.allgather(description)
        differences = []
        for key in description:
            by_value: dict = {}
            for rank, desc in enumerate(everyone):
                by_value.setdefault(repr(desc.get(key)), []).append(rank)
            if len(by_value) > 1:
                parts = "; ".join(f"ranks {_ranks(r)}: {v}" for v, r in by_value.items())
                differences.append(f"{key} differs ({parts})")
        raise CommError(f"mismatched collective {call!r} across ranks: " + "; ".join(differences))

    def raise_together(self, error: Optional[BaseException]) -> None:
        """Collective: if any rank passes an error, every rank raises it (the lowest rank's).

        Use around work whose failure may be local to one rank (reading its data shard, say), so
        that no rank goes on into a collective the failed rank will never enter.
        """
        message = None if error is None else (type(error).__name__, str(error))
        reports = self.mpi.allgather(message)
        failed = [(rank, rep) for rank, rep in enumerate(reports) if rep is not None]
        if not failed:
            return
        rank, (kind, text) = failed[0]
        cls = ConfigError if kind == "ConfigError" else CommError if kind == "CommError" else MpisgdError
        others = f" (and ranks {_ranks([r for r, _ in failed[1:]])})" if len(failed) > 1 else ""
        exc = cls(f"rank {rank}{others}: {text}")
        exc.every_rank = True
        raise exc from error

    # ---- all-reduce ----------------------------------------------------------------------
    def allreduce_(self, x: Any, op: str = "sum", *, algorithm: str = "auto") -> Any:
        """Reduce ``x`` across ranks in place and return it (see :func:`mpisgd.allreduce_`)."""
        validate_op_and_algorithm(op, algorithm)
        name = backend.check_dtype(x)
        if op == "mean" and name.startswith("int"):
            raise ConfigError(f"op='mean' needs a floating dtype, got {name}")
        if self.config.check_collectives:
            self.check_agreement("allreduce", op=op, algorithm=algorithm, dtype=name, shape=tuple(x.shape))
        work = backend.work_buffer(x)
        self._reduce_flat(work.flat, work.ops, op, algorithm)
        work.finish()
        return x

    def allreduce(self, x: Any, op: str = "sum", *, algorithm: str = "auto") -> Any:
        """Reduce ``x`` across ranks into a new array of the same kind, dtype and device."""
        backend.check_dtype(x)
        return self.allreduce_(backend.clone(x), op, algorithm=algorithm)

    def _reduce_flat(self, flat, ops, op: str, algorithm: str) -> None:
        n = len(flat)
        if n == 0:
            return
        if algorithm == "auto":
            algorithm = self.choose_algorithm(n * flat.itemsize if hasattr(flat, "itemsize")
                                              else n * flat.element_size(), host=ops is backend.HOST_OPS)
            if algorithm in ("shm", "hier") and self._shared_memory(required=False) is None:
                algorithm = self._large_message_algorithm()
        if algorithm in ("shm", "hier"):
            self._check_window_algorithm(algorithm, ops)
            self._shared_memory().allreduce_(flat, op, self._across_nodes(op) if algorithm == "hier" else None)
        else:
            scratch = None if algorithm == "native" else self._scratch(ops, _dtype(flat), n, "scratch")
            ALGORITHMS[algorithm](self.mpi, flat, scratch, ops, op, polite=self.polite,
                                  segment=self._segment(ops, flat))
        if op == "mean":
            ops.divide_(flat, self.size)

    @property
    def segment_bytes(self) -> int:
        """Piece size of rhd's and ring's reduce steps on host buffers: 256 KiB on one node, whole
        messages across nodes, unless configured."""
        if self.config.segment_bytes is not None:
            return self.config.segment_bytes
        return 256 << 10 if self.single_node else 0

    def _segment(self, ops, flat) -> int:
        """``segment_bytes`` in elements of ``flat``; 0 on a GPU, where a piece buys no cache and costs a
        stream synchronization."""
        return self.segment_bytes // flat.itemsize if ops is backend.HOST_OPS else 0

    def _check_window_algorithm(self, algorithm: str, ops) -> None:
        if ops is not backend.HOST_OPS:
            raise ConfigError(f"algorithm {algorithm!r} reduces host memory; GPU buffers with CUDA-aware MPI "
                              "need rhd, ring or native")
        if algorithm == "shm" and not self.single_node:
            raise ConfigError(f"algorithm 'shm' needs every rank on one node; this communicator spans "
                              f"{self.num_nodes} nodes (use 'hier')")
        if algorithm == "hier" and not self.uniform_nodes:
            raise ConfigError("algorithm 'hier' needs the same number of ranks on every node")

    def _across_nodes(self, op: str):
        """For ``hier``: all-reduce one block of this node's sum with the same block of the other nodes."""
        cross = self._cross
        if cross is None or cross.Get_size() == 1:
            return None

        def reduce_block(block: np.ndarray) -> None:
            if not len(block):  # the same on every rank of ``cross``: the same n and node size
                return
            if block.nbytes < self.native_below_bytes:
                algorithm, scratch = "native", None
            else:
                algorithm = self._large_message_algorithm(cross.Get_size())
                scratch = self._scratch(backend.HOST_OPS, block.dtype.name, len(block), "cross")
            ALGORITHMS[algorithm](cross, block, scratch, backend.HOST_OPS, op, polite=self.polite,
                                  segment=self._segment(backend.HOST_OPS, block))
        return reduce_block

    def allreduce_many_(self, arrays: Sequence[Any], op: str = "sum", *, algorithm: str = "auto",
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, check: Optional[bool] = None) -> Sequence[Any]:
        """Reduce many arrays in place with one collective per fused bucket (a model's gradients).

        Arrays are grouped by kind, device and dtype and cut into buckets of ``bucket_bytes``
        (host buckets: of the shared window's area, where ``shm`` serves them); each bucket is
        copied into a flat buffer (float32 for half precision; the window's slot, or a grow-only
        buffer per backend and dtype), reduced with one collective, and copied back. Returns ``arrays``. ``check=False`` skips the mismatch check for callers that verified
        the layout once already (a training loop reduces the same gradients every step).
        """
        validate_op_and_algorithm(op, algorithm)
        if bucket_bytes <= 0:
            raise ConfigError(f"bucket_bytes must be positive, got {bucket_bytes}")
        arrays = list(arrays)
        names = [backend.check_dtype(a) for a in arrays]
        if op == "mean" and any(n.startswith("int") for n in names):
            raise ConfigError("op='mean' needs floating dtypes")
        if check is not False:
            self.check_agreement("allreduce_many", op=op, algorithm=algorithm,
                                 arrays=tuple((n, tuple(a.shape)) for n, a in zip(names, arrays)))
        reduce_op, divisor = ("sum", self.size) if op == "mean" else (op, 1)
        hier = algorithm == "hier" or (algorithm == "auto" and self.hierarchical)
        use_window = algorithm == "shm" or hier or (algorithm == "auto" and self.shm_for_fusion)
        buckets = backend.fusion_buckets(arrays, bucket_bytes, host_bucket_bytes=min(
            bucket_bytes, self.config.shm_area_bytes) if use_window else None)
        shm, across = None, None
        if use_window and any(b.ops is backend.HOST_OPS for b in buckets):  # GPU buckets never use the window
            if algorithm in ("shm", "hier"):
                self._check_window_algorithm(algorithm, backend.HOST_OPS)
            shm = self._shared_memory(required=algorithm in ("shm", "hier"))
            across = self._across_nodes(reduce_op) if hier else None
        for bucket in buckets:
            nbytes = bucket.numel * np.dtype(bucket.dtype).itemsize
            if (shm is not None and bucket.ops is backend.HOST_OPS and bucket.numel <= shm.capacity(bucket.dtype)
                    and (algorithm != "auto" or hier or nbytes >= SHM_FUSION_MIN_BYTES)):
                # packed straight into this rank's slot, unpacked straight from the shared result
                bucket.pack(shm.slot(bucket.numel, bucket.dtype))
                bucket.unpack(shm.reduce(bucket.numel, bucket.dtype, reduce_op, across), divisor)
                continue
            flat = self._scratch(bucket.ops, bucket.dtype, bucket.numel, "fusion")
            bucket.pack(flat)
            self._reduce_flat(flat, bucket.ops, reduce_op, algorithm)
            bucket.unpack(flat, divisor)
        return arrays

    # ---- broadcast -----------------------------------------------------------------------
    def broadcast_(self, x: Any, root: int = 0) -> Any:
        """Overwrite ``x`` on every rank with root's values, in place."""
        name = backend.check_dtype(x)
        self.check_agreement("broadcast", root=root, dtype=name, shape=tuple(x.shape))
        work = backend.work_buffer(x)
        if len(work.flat):
            self.mpi.Bcast(work.ops.buffer(work.flat), root=root)
        work.finish()
        return x

    def broadcast_many_(self, arrays: Sequence[Any], root: int = 0) -> Sequence[Any]:
        """Broadcast many arrays in place, fused into one message per bucket."""
        arrays = list(arrays)
        names = [backend.check_dtype(a) for a in arrays]
        self.check_agreement("broadcast_many", root=root,
                             arrays=tuple((n, tuple(a.shape)) for n, a in zip(names, arrays)))
        for bucket in backend.fusion_buckets(arrays, DEFAULT_BUCKET_BYTES):
            flat = self._scratch(bucket.ops, bucket.dtype, bucket.numel, "fusion")
            bucket.pack(flat)
            self.mpi.Bcast(bucket.ops.buffer(flat), root=root)
            bucket.unpack(flat)
        return arrays


def _dtype(flat) -> str:
    return backend.dtype_name(flat)


def _ranks(ranks: Iterable[int]) -> str:
    return ",".join(str(r) for r in ranks)


# ---- the default communicator and wrapping of user communicators ----------------------------
_default: Optional[Communicator] = None
_wrapped: dict = {}


def get_communicator(comm: Any = None) -> Communicator:
    """Resolve ``comm=`` arguments: None -> the default (COMM_WORLD dup), an mpi4py communicator ->
    a cached mpisgd wrapper of it, a Communicator -> itself. Collective on first use."""
    global _default
    if isinstance(comm, Communicator):
        return comm
    if comm is None:
        if _default is None:
            _default = Communicator()
        return _default
    if isinstance(comm, MPI.Comm):
        key = comm.py2f()
        if key not in _wrapped:
            _wrapped[key] = Communicator(comm)
        return _wrapped[key]
    raise ConfigError(f"comm must be None, an mpi4py communicator or an mpisgd Communicator, "
                      f"got {type(comm).__name__}")
