"""The library-owned communicator: rank layout, all-reduce dispatch, fused buckets, mismatch checks.

mpisgd never sends its own messages on the user's communicator: it duplicates COMM_WORLD (or the
``comm=`` given) once, so user messages and library messages can never match each other. Which
algorithm ``auto`` runs is :mod:`mpisgd.comm.policy`'s table; the algorithms are
:mod:`mpisgd.comm.algorithms`' registry; how arrays are cut into buckets is :mod:`mpisgd.comm.fusion`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from mpisgd import arrays as backend
from mpisgd.comm import objects, policy
from mpisgd.comm.agreement import CARRY_BELOW_BYTES, Agreement, Layout
from mpisgd.comm.algorithms import ALGORITHMS, AllreduceAlgorithm
from mpisgd.comm.config import NON_POWER_OF_TWO_CHOICES, AllreduceConfig
from mpisgd.comm.fusion import DEFAULT_BUCKET_BYTES, FusionBucket, fusion_buckets
from mpisgd.comm.policy import Nodes, Request, Situation, is_power_of_two
from mpisgd.comm.shm import SharedMemoryAllreduce
from mpisgd.comm.watchdog import ArrivalBoard, Watchdog, WatchdogSettings, timed_out
from mpisgd.errors import CommError, ConfigError, JobFailedError, SharedConfigError

__all__ = ["ALGORITHM_NAMES", "DEFAULT_BUCKET_BYTES", "NON_POWER_OF_TWO_CHOICES", "OPS", "SHM_FUSION_MIN_BYTES",
           "AllreduceConfig", "Communicator", "get_communicator", "is_power_of_two", "validate_op_and_algorithm"]

OPS = ("sum", "mean", "max", "min")
ALGORITHM_NAMES = ("auto", *ALGORITHMS)
#: fused buckets from this size go through the shared window under ``auto`` (the policy's threshold)
SHM_FUSION_MIN_BYTES = policy.SHM_FUSION_FROM.default_bytes


def validate_op_and_algorithm(op: str, algorithm: str) -> None:
    if op not in OPS:
        raise ConfigError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")
    if algorithm not in ALGORITHM_NAMES:
        raise ConfigError(f"unknown algorithm {algorithm!r}; valid algorithms: {', '.join(ALGORITHM_NAMES)}")


@lru_cache(maxsize=1)
def _library() -> policy.MpiLibrary:
    """The MPI library, asked once per process."""
    return policy.detect_library(MPI.Get_library_version())


class Communicator:
    """mpisgd's communicator: a duplicate of ``comm`` (default COMM_WORLD) plus node-local layout.

    Args:
        comm: the MPI communicator to duplicate; COMM_WORLD when None.
        config: how ``auto`` chooses an algorithm and whether collectives are checked.
        timeout: seconds a collective may make no progress before every live rank raises
            :class:`~mpisgd.errors.CollectiveTimeout` (default: ``--collective-timeout``, else
            ``MPISGD_COLLECTIVE_TIMEOUT``, else 600; 0: off).
        stall_warning: seconds before a waiting rank logs who has not arrived (default 60; 0: never).

    Every collective is nonblocking MPI waited on by :attr:`watchdog` (:mod:`mpisgd.comm.watchdog`).
    Attributes ``rank``, ``size``, ``local_rank``, ``local_size`` (ranks on this node, from MPI's
    shared-memory split, not from launcher variables) and ``num_nodes`` are fixed at creation;
    ``situation`` is what the policy's table is asked with.
    Call :meth:`free` (or use ``with``) to release the duplicated communicators.
    """

    def __init__(self, comm: Optional[MPI.Comm] = None, *, config: Optional[AllreduceConfig] = None,
                 timeout: Optional[float] = None, stall_warning: Optional[float] = None):
        self.config = config or AllreduceConfig()
        settings = WatchdogSettings.resolve(timeout, stall_warning)
        parent = comm if comm is not None else MPI.COMM_WORLD
        self.rank = parent.Get_rank()
        self.size = parent.Get_size()
        # start-up is watched too: a rank missing from the start is named instead of waited for forever
        self.watchdog = Watchdog(self.rank, self.size, settings)
        duplicate, duplicated = parent.Idup()
        self.watchdog.enter("start-up: duplicate the communicator")
        self.watchdog.wait([duplicated])
        self._mpi: Optional[MPI.Comm] = duplicate
        # created whatever the settings (they may differ between ranks), so its collective creation matches
        self._board: Optional[ArrivalBoard] = None
        if self.size > 1:
            with self.watchdog.blocking("start-up: create the arrival board"):
                self._board = ArrivalBoard(self._mpi)
        self.watchdog.attach(self._board)
        with self.watchdog.blocking("start-up: split the ranks by node"):  # MPI has no nonblocking split
            self._local: Optional[MPI.Comm] = self._mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        self.num_nodes = int(self.allreduce_numbers(int(self.local_rank == 0), name="start-up: count the nodes")[0])
        largest, minus_smallest = self.allreduce_numbers([self.local_size, -self.local_size], "max",
                                                         name="start-up: ranks per node")
        self.most_ranks_per_node = int(largest)
        self.uniform_nodes = -int(minus_smallest) == self.most_ranks_per_node
        # the same local rank on every node: the ranks that reduce the same block across nodes ("hier")
        with self.watchdog.blocking("start-up: split the ranks across nodes"):
            self._cross: Optional[MPI.Comm] = self._mpi.Split(self.local_rank, key=self.rank)
        self._workspace: dict = {}
        self.oversubscribed = self.local_size > self._node_cores()
        self.polite = {"auto": self.oversubscribed, "1": True, "0": False}[self.config.yield_when_waiting]
        self._agreement = Agreement(self.size)  # the mismatch check (agreement.py), one layout per communicator
        self._shm: Optional[SharedMemoryAllreduce] = None
        self._choices: dict = {}
        nodes = Nodes.ONE if self.num_nodes == 1 else Nodes.EQUAL if self.uniform_nodes else Nodes.UNEQUAL
        self.situation = Situation(
            self.size, nodes, self.most_ranks_per_node, _library(), window=self.config.shared_memory,
            hierarchical=self.config.hierarchical, non_power_of_two=self.config.non_power_of_two,
            overrides={"native_below_bytes": self.config.native_below_bytes,
                       "shm_below_bytes": self.config.shm_below_bytes})
        self._agree_on_config()

    def _agree_on_config(self) -> None:
        """Every setting that decides which collectives run must be the same on every rank (they
        come from each rank's environment): otherwise ranks would enter different ones and hang."""
        settings = {name: value for name, value in vars(self.config).items() if name != "yield_when_waiting"}
        everyone = self.allgather_objects(settings, name="start-up: agree on the all-reduce settings")
        differing = sorted(name for name in settings if any(other[name] != settings[name] for other in everyone))
        if differing:
            ranks = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
            self.free()
            raise SharedConfigError(f"all-reduce settings differ between ranks ({', '.join(differing)}; ranks "
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

    @property
    def cross_nodes(self) -> MPI.Comm:
        """Communicator of the ranks with this rank's local rank, one per node (``hier``'s second stage)."""
        if self._cross is None:
            raise RuntimeError("mpisgd Communicator used after free()")
        return self._cross

    def free(self) -> None:
        """Release the duplicated communicators and the shared window; later use raises RuntimeError.
        Collective: every rank calls it (freeing a shared window synchronizes the ranks). After a
        collective of this process timed out (or was left unfinished) the windows are only dropped: the
        ranks it waited for would never join their (collective) free, and an exit must not hang on them."""
        collective = not MPI.Is_finalized() and not timed_out()
        self.watchdog.board = None  # a timed-out free must not read the board it is freeing
        if collective and (self._shm is not None or self._board is not None):
            with self.watchdog.blocking("free the windows"):  # MPI_Win_free synchronizes: under the deadline
                if self._shm is not None:
                    self._shm.free()
                if self._board is not None:
                    self._board.free()
        self._shm = None
        self._board = self.watchdog.board = None
        self._agreement.free()
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

    # ---- small collectives of bookkeeping, watched (mpisgd.comm.objects) ---------------------
    def barrier(self, *, name: str = "barrier") -> None:
        """Every rank has arrived (``Ibarrier`` under the watchdog; ``name`` is what stall reports say)."""
        objects.barrier(self, name=name)

    def _node_cores(self) -> int:
        """The cores this node's ranks may run on together (the union of their CPU affinities): a
        launcher that binds each rank to a core of its own (Open MPI's default) leaves each rank one
        core, which is not oversubscription."""
        if not hasattr(os, "sched_getaffinity"):
            return os.cpu_count() or 1
        mine = sum(1 << cpu for cpu in os.sched_getaffinity(0))
        assert self._local is not None
        with self.watchdog.blocking("start-up: the cores of the node's ranks"):
            union = self._local.allreduce(mine, op=MPI.BOR)
        return bin(union).count("1")

    def allreduce_numbers(self, values: Any, op: str = "sum", *, name: str) -> np.ndarray:
        """A few numbers reduced across ranks (``"sum"``, ``"max"``, ``"min"``), watched; a new array."""
        return objects.allreduce_numbers(self, values, op, name=name)

    def bcast_object(self, obj: Any = None, root: int = 0, *, name: str) -> Any:
        """Root's picklable ``obj`` on every rank, watched."""
        return objects.bcast_object(self, obj, root, name=name)

    def allgather_objects(self, obj: Any, *, name: str) -> list:
        """Every rank's picklable ``obj`` in rank order, watched."""
        return objects.allgather_objects(self, obj, name=name)

    def wait(self, requests: list, name: str) -> None:
        """Enter the collective ``name`` and complete its nonblocking MPI ``requests`` (started on
        :attr:`mpi`) under the watchdog: for collectives of code outside this class."""
        self.watchdog.enter(name)
        self.watchdog.wait(requests)

    # ---- workspace -----------------------------------------------------------------------
    def scratch(self, ops: Any, dtype: str, n: int, role: str) -> Any:
        """A grow-only buffer per (backend, dtype, role): allocated once, sliced afterwards."""
        key = ops.key(dtype) + (role,)
        buf = self._workspace.get(key)
        if buf is None or len(buf) < n:
            buf = ops.empty(max(n, 1), dtype)
            self._workspace[key] = buf
        return buf[:n]

    def segment_elements(self, ops: Any, flat: Any) -> int:
        """``segment_bytes`` in elements of ``flat``; 0 on a GPU, where a piece buys no cache and costs a
        stream synchronization."""
        return self.segment_bytes // flat.itemsize if ops is backend.HOST_OPS else 0

    # ---- what auto chooses (the policy's table, asked with this communicator's situation) -------
    @property
    def single_node(self) -> bool:
        """Every rank on this node: the shared-memory all-reduce can serve the communicator."""
        return self.local_size == self.size

    @property
    def shm_for_fusion(self) -> bool:
        """``auto`` reduces fused host buckets (of at least 256 KiB) through the shared window."""
        return self.situation.window_on_one_node

    @property
    def equal_nodes_of_several(self) -> bool:
        """Several nodes with the same number (> 1) of ranks each: where ``hier`` has something to do."""
        return self.num_nodes > 1 and self.uniform_nodes and self.local_size > 1

    @property
    def hierarchical(self) -> bool:
        """``auto`` reduces host buffers across nodes with ``hier`` (fused buckets: of any size)."""
        return self.situation.hier_usable

    @property
    def shm_below_bytes(self) -> int:
        """Single host vectors from ``native_below_bytes`` up to this go to ``shm`` under ``auto``."""
        return policy.shm_below_bytes(self.situation)

    @property
    def native_below_bytes(self) -> int:
        """Messages smaller than this go to the MPI library's own Allreduce under ``auto``."""
        return policy.native_below_bytes(self.situation)

    @property
    def segment_bytes(self) -> int:
        """Piece size of rhd's and ring's reduce steps on host buffers (see ``AllreduceConfig``)."""
        return policy.segment_bytes(self.situation, self.config.segment_bytes)

    def choose_algorithm(self, nbytes: int, *, host: bool = True, fused: bool = False) -> str:
        """What ``auto`` runs for a message of ``nbytes`` (in host memory unless ``host=False``; a fused
        bucket that fits the window's area with ``fused=True``)."""
        key = (nbytes, host, fused)  # the table is walked once per kind of call (cleared on a new situation)
        chosen = self._choices.get(key)
        if chosen is None:
            if len(self._choices) > 4096:
                self._choices.clear()
            chosen = self._choices[key] = policy.choose(self.situation, Request(nbytes, host, fused))
        return chosen

    def _algorithm_for(self, name: str, request: Request) -> AllreduceAlgorithm:
        """The registered algorithm ``name``; for ``auto`` the policy's choice, asked again without the
        window if /dev/shm cannot hold it (the same verdict on every rank, so all choose alike)."""
        if name == "auto":
            name = self.choose_algorithm(request.nbytes, host=request.host, fused=request.fused)
            if ALGORITHMS[name].packs_buckets and self.shared_window(required=False) is None:
                name = self.choose_algorithm(request.nbytes, host=request.host, fused=request.fused)
        return ALGORITHMS[name]

    def shared_window(self, *, required: bool = True) -> Optional[SharedMemoryAllreduce]:
        """The shared window, created on first use (collectively: all ranks choose shm together).
        When /dev/shm is too small, ``auto`` (``required=False``) gets None and the policy is told."""
        if self._shm is None and (required or self.situation.window):
            error = None
            try:  # the same verdict on every rank of a node: its free space is agreed by MPI_MIN
                self._shm = SharedMemoryAllreduce(self.local, self.config.shm_area_bytes, polite=self.polite,
                                                  watchdog=self.watchdog, watched=objects.Watched(self.local, self.wait))
            except CommError as exc:
                error = str(exc)
            # ... and across nodes, which run "hier" together: one node without a window refuses it for all
            refusals = [e for e in self.allgather_objects(error, name="shared window (verdicts)") if e]
            if refusals:
                if self._shm is not None:
                    self._shm.free()  # collective on this node, whose ranks all created it
                    self._shm = None
                self.situation = dataclasses.replace(self.situation, window=False)
                self._choices.clear()
                if required:  # asked for by name (``--algorithm shm|hier``): the user's setting cannot work
                    raise SharedConfigError(refusals[0])
        return self._shm

    def check_agreement(self, call: str, **fields: Any) -> None:
        """Raise the same CommError on every rank if ranks called ``call`` with different fields.

        Costs one small all-reduce of the call's signature (:mod:`mpisgd.comm.agreement`, which a
        small all-reduce's payload rides along in); only on disagreement are the descriptions gathered
        to name the ranks and fields that differ. Without it, ranks calling a collective with
        different shapes would wait for each other forever.
        """
        if not self.config.check_collectives or self.size == 1:
            return
        try:
            key: Any = (call, *fields.items())
            hash(key)
        except TypeError:  # an unhashable field: described afresh every call
            key = repr((call, fields))
        self._agreement.check(self, key, {"call": call, **fields})

    def _checked_allreduce(self, x: Any, work: Any, op: str, algorithm: str, name: str, shape: tuple) -> bool:
        """The mismatch check of ``allreduce_``; True when the payload travelled with it (and is reduced)."""
        n = len(work.flat)
        dtype = backend.reduction_dtype(name)
        mpi_op = "sum" if op == "mean" else op
        nbytes = n * _ITEMSIZE.get(dtype, 8)
        layout = None
        if (0 < nbytes < CARRY_BELOW_BYTES and self._agreement.can_carry(dtype, mpi_op)
                and (algorithm == "native" or algorithm == "auto" and self.choose_algorithm(nbytes) == "native")):
            layout = Layout(n, dtype, mpi_op)
        steady = None
        if layout is not None and x.__class__ is np.ndarray:
            steady = (Agreement.steady_key(x, op, algorithm), shape, op == "mean")
        carried = self._agreement.check(self, ("allreduce", op, algorithm, name, shape),
                                        {"call": "allreduce", "op": op, "algorithm": algorithm, "dtype": name,
                                         "shape": shape}, work.flat if layout is not None else None, mpi_op, layout,
                                        steady)
        if carried and op == "mean":
            work.ops.divide_(work.flat, self.size)
        return carried

    def raise_together(self, error: Optional[BaseException]) -> None:
        """Collective: if any rank passes an error, every rank raises it (the lowest rank's).

        Use around work whose failure may be local to one rank (reading its data shard, say), so
        that no rank goes on into a collective the failed rank will never enter. A ConfigError
        arrives as a SharedConfigError, anything else as a JobFailedError.
        """
        message = None if error is None else (type(error).__name__, str(error), isinstance(error, ConfigError))
        failed_here = np.array([0 if error is None else 1], dtype=np.int64)
        self.watchdog.enter("raise_together")  # one integer under the watchdog; the texts only on failure
        self.watchdog.wait([self.mpi.Iallreduce(MPI.IN_PLACE, failed_here, op=MPI.MAX)])
        if not failed_here[0]:
            return
        reports = self.allgather_objects(message, name="raise_together (reports)")
        failed = [(rank, rep) for rank, rep in enumerate(reports) if rep is not None]
        if not failed:
            return
        rank, (_kind, text, bad_input) = failed[0]
        others = f" (and ranks {_ranks([r for r, _ in failed[1:]])})" if len(failed) > 1 else ""
        cls = SharedConfigError if bad_input else JobFailedError
        raise cls(f"rank {rank}{others}: {text}") from error

    # ---- all-reduce ----------------------------------------------------------------------
    def allreduce_(self, x: Any, op: str = "sum", *, algorithm: str = "auto") -> Any:
        """Reduce ``x`` across ranks in place and return it (see :func:`mpisgd.allreduce_`)."""
        if x.__class__ is np.ndarray and self._agreement.run_steady(self, x, op, algorithm):
            return x  # a loop's small all-reduce, seen before (agreement.py)
        validate_op_and_algorithm(op, algorithm)
        name = backend.check_dtype(x)
        if op == "mean" and name.startswith("int"):
            raise ConfigError(f"op='mean' needs a floating dtype, got {name}")
        work = backend.work_buffer(x)
        if not (self.config.check_collectives and self.size > 1
                and self._checked_allreduce(x, work, op, algorithm, name, tuple(x.shape))):
            self.watchdog.enter("allreduce_")
            self._reduce_flat(work.flat, work.ops, op, algorithm)
        work.finish()
        return x

    def allreduce(self, x: Any, op: str = "sum", *, algorithm: str = "auto") -> Any:
        """Reduce ``x`` across ranks into a new array of the same kind, dtype and device."""
        backend.check_dtype(x)
        return self.allreduce_(backend.clone(x), op, algorithm=algorithm)

    def _reduce_flat(self, flat: Any, ops: Any, op: str, algorithm: str) -> None:
        n = len(flat)
        if n == 0:
            return
        nbytes = n * flat.itemsize if hasattr(flat, "itemsize") else n * flat.element_size()
        chosen = self._algorithm_for(algorithm, Request(nbytes, host=ops is backend.HOST_OPS))
        chosen.check(self, ops)
        chosen.allreduce_(self, flat, ops, op)
        if op == "mean":
            ops.divide_(flat, self.size)

    def allreduce_many_(self, arrays: Sequence[Any], op: str = "sum", *, algorithm: str = "auto",
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, check: Optional[bool] = None) -> Sequence[Any]:
        """Reduce many arrays in place with one collective per fused bucket (a model's gradients).

        Arrays are grouped by kind, device and dtype and cut into buckets of ``bucket_bytes``
        (host buckets: of the shared window's area, where ``shm`` serves them); each bucket is
        copied into a flat buffer (float32 for half precision; the window's slot, or a grow-only
        buffer per backend and dtype), reduced with one collective, and copied back. Returns the arrays.
        ``check=False`` skips the mismatch check for callers that verified the layout once already
        (a training loop reduces the same gradients every step).
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
        self.watchdog.enter("allreduce_many_")
        use_window = (ALGORITHMS[algorithm].packs_buckets if algorithm != "auto"
                      else policy.window_takes_fused_buckets(self.situation))
        buckets = fusion_buckets(arrays, bucket_bytes, host_bucket_bytes=min(
            bucket_bytes, self.config.shm_area_bytes) if use_window else None)
        for bucket in buckets:
            self._reduce_bucket(bucket, reduce_op, divisor, algorithm)
        return arrays

    def _reduce_bucket(self, bucket: FusionBucket, op: str, divisor: int, algorithm: str) -> None:
        """Straight through the window where the algorithm packs buckets and the bucket fits its area;
        else packed into a flat buffer reduced like a single vector."""
        fits = bucket.on_host and bucket.numel <= SharedMemoryAllreduce.capacity_of(self.config.shm_area_bytes,
                                                                                    bucket.dtype)
        chosen = self._algorithm_for(algorithm, Request(bucket.nbytes, host=bucket.on_host, fused=fits))
        if chosen.packs_buckets and bucket.on_host:
            chosen.check(self, bucket.ops)
            if fits:
                chosen.reduce_bucket_(self, bucket, op, divisor)
                return
        flat = self.scratch(bucket.ops, bucket.dtype, bucket.numel, "fusion")
        bucket.pack(flat)
        self._reduce_flat(flat, bucket.ops, op, algorithm)
        bucket.unpack(flat, divisor)

    # ---- broadcast -----------------------------------------------------------------------
    def broadcast_(self, x: Any, root: int = 0) -> Any:
        """Overwrite ``x`` on every rank with root's values, in place."""
        name = backend.check_dtype(x)
        self.check_agreement("broadcast", root=root, dtype=name, shape=tuple(x.shape))
        work = backend.work_buffer(x)
        if len(work.flat):
            self.watchdog.enter("broadcast_")
            self.watchdog.wait([self.mpi.Ibcast(work.ops.buffer(work.flat), root=root)])
        work.finish()
        return x

    def broadcast_many_(self, arrays: Sequence[Any], root: int = 0) -> Sequence[Any]:
        """Broadcast many arrays in place, fused into one message per bucket."""
        arrays = list(arrays)
        names = [backend.check_dtype(a) for a in arrays]
        self.check_agreement("broadcast_many", root=root,
                             arrays=tuple((n, tuple(a.shape)) for n, a in zip(names, arrays)))
        for bucket in fusion_buckets(arrays, DEFAULT_BUCKET_BYTES):
            flat = self.scratch(bucket.ops, bucket.dtype, bucket.numel, "fusion")
            bucket.pack(flat)
            self.watchdog.enter("broadcast_many_")
            self.watchdog.wait([self.mpi.Ibcast(bucket.ops.buffer(flat), root=root)])
            bucket.unpack(flat)
        return arrays


_ITEMSIZE = {"float32": 4, "int32": 4, "float64": 8, "int64": 8}


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
