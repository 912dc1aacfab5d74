"""All-reduce algorithms over point-to-point MPI, in place on a flat contiguous work buffer.

Each function reduces ``buf`` (length n) across ``comm`` using ``scratch`` (length >= n, same kind
and dtype) for incoming data, and the backend ``ops`` for local reduction. They never allocate.

Bitwise-identical results on every rank follow from the structure: every element of the result is
computed by exactly one rank (its owner after the reduce-scatter) and only *copied* to the others
in the allgather, so replicas of a synchronous job cannot drift apart.

* ``rhd``: Rabenseifner (Thakur, Rabenseifner & Gropp 2005): reduce-scatter by recursive halving,
  allgather by recursive doubling; cost 2·lg p·α + 2(p−1)/p·nβ + (p−1)/p·nγ. The halving pairs the
  nearest ranks first (distance 1, 2, 4, ...), as MPICH's own Rabenseifner does, so that where
  launchers place ranks in blocks the two largest exchanges (n/2 each way) stay on a node and only
  the smaller ones cross the network. On one node the order made no difference (BENCHMARKS.md). A process count that
  is not a power of two is folded to the power of two below it by a *half-fold* (Rabenseifner's and
  Open MPI's scheme): the first 2r ranks pair up, each of a pair reduces one half of the two
  vectors, the even one hands its reduced half to the odd one and waits for the result. Measured
  against MPICH's whole fold (the even rank hands over its whole vector, the odd one reduces all of
  it): 0.66-0.90x vs 0.69-0.91x of native at p=5-6, within noise at p=3 (BENCHMARKS.md); the ring
  and ``shm`` beat both there, so ``auto`` uses those.
* ``ring``: reduce-scatter then allgather around a ring; 2(p−1)·α + the same β and γ terms, and no
  fold, which makes it the better choice at large sizes for p that are not powers of two.
* ``native``: the MPI library's own MPI_Allreduce (best for small messages, where every Python-level
  step costs microseconds).
* ``shm`` and ``hier``: through the node's shared-memory window (:mod:`mpisgd.comm.shm`); ``hier`` then
  reduces each node's sum across nodes with the point-to-point algorithms above.

All five are registered alike in :data:`ALGORITHMS` (name -> :class:`AllreduceAlgorithm`); the
communicator runs whichever the caller or :mod:`mpisgd.comm.policy` names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from mpi4py import MPI

from mpisgd import arrays
from mpisgd.arrays import MPI_OPS
from mpisgd.comm.policy import HIER, NATIVE, RHD, RING, SHM, large_message_algorithm
from mpisgd.errors import ConfigError

if TYPE_CHECKING:
    from mpisgd.comm.communicator import Communicator
    from mpisgd.comm.fusion import FusionBucket

_TAG_FOLD = 7101
_TAG_RHD = 7102
_TAG_RING = 7103


#: how the algorithms complete their requests: the communicator's watchdog (``Watchdog.wait``: tests with a
#: deadline, yielding the CPU while spinning, so that on an oversubscribed node a waiting rank hands its core
#: to one that still computes); the plain MPI_Waitall when an algorithm runs on a bare MPI communicator
Wait = Callable[[list], None]


def wait_requests(requests: list, wait: Optional[Wait] = None) -> None:
    """Complete ``requests`` with ``wait`` (default: MPI_Waitall)."""
    if wait is None:
        MPI.Request.Waitall(requests)
    else:
        wait(requests)


def exchange(comm: MPI.Comm, ops, send, dest: int, recv, source: int, tag: int, *,
             wait: Optional[Wait] = None) -> None:
    """Send ``send`` to ``dest`` while receiving ``recv`` from ``source`` (nonblocking, completed by ``wait``)."""
    requests = [comm.Irecv(ops.buffer(recv), source, tag), comm.Isend(ops.buffer(send), dest, tag)]
    wait_requests(requests, wait)


def segments(length: int, segment: int) -> list[tuple[int, int]]:
    """How a message of ``length`` elements is cut: whole up to four segments (each piece costs a message
    and a wait, which at 1 MiB outweighed the cache it saves), else into ``segment``-long pieces.
    Sender and receiver cut the same message by the same rule, so their pieces match."""
    if segment <= 0 or length <= 4 * segment:
        return [(0, length)]
    return [(i, min(i + segment, length)) for i in range(0, length, segment)]


def exchange_reduce(comm: MPI.Comm, ops, send, dest: int, acc, scratch, source: int, op: str, tag: int, *,
                    wait: Optional[Wait], segment: int) -> None:
    """Send ``send`` to ``dest``; reduce into ``acc`` what ``source`` sends (``scratch``: as long as ``acc``).

    ``segment`` (elements, 0 = whole): the incoming data arrives in pieces, alternating between two
    slots, and each piece is reduced as soon as it is in (the next arriving meanwhile), while it is
    still in cache, instead of being received whole into memory and read back from there
    (BENCHMARKS.md: ~10% less time at 16 MiB on one node).
    """
    sends = [comm.Isend(ops.buffer(send[a:b]), dest, tag) for a, b in segments(len(send), segment)]
    pieces = segments(len(acc), segment)
    slots = (scratch[:segment], scratch[segment:2 * segment]) if len(pieces) > 1 else (scratch,)

    def receive(k: int):
        a, b = pieces[k]
        return comm.Irecv(ops.buffer(slots[k % len(slots)][:b - a]), source, tag)

    pending = [receive(k) for k in range(min(2, len(pieces)))]
    for k, (a, b) in enumerate(pieces):
        wait_requests([pending[k]], wait)
        if b > a:
            ops.reduce_(acc[a:b], slots[k % len(slots)][:b - a], op)
        if k + 2 < len(pieces):  # into the slot just reduced: piece k + 1 arrives meanwhile
            pending.append(receive(k + 2))
    wait_requests(sends, wait)


def block_bounds(n: int, parts: int) -> list[int]:
    """Offsets splitting n elements into ``parts`` nearly equal blocks (the first n % parts get one more)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def allreduce_native(comm: MPI.Comm, buf, scratch, ops, op: str, *, wait: Optional[Wait] = None,
                     segment: int = 0) -> None:
    wait_requests([comm.Iallreduce(MPI.IN_PLACE, ops.buffer(buf), op=MPI_OPS[op])], wait)


def allreduce_rhd(comm: MPI.Comm, buf, scratch, ops, op: str, *, wait: Optional[Wait] = None,
                  segment: int = 0) -> None:
    size, rank, n = comm.Get_size(), comm.Get_rank(), len(buf)
    if size == 1 or n == 0:
        return
    pof2 = 1 << (size.bit_length() - 1)
    folded = size - pof2  # ranks 0..2*folded-1 pair up; the even one of each pair then sits out
    if rank < 2 * folded:  # the half-fold: each of the pair reduces one half of the pair's vectors
        half = n // 2
        if rank % 2 == 0:
            exchange_reduce(comm, ops, buf[half:], rank + 1, buf[:half], scratch[:half], rank + 1, op,
                            _TAG_FOLD, wait=wait, segment=segment)
            wait_requests([comm.Isend(ops.buffer(buf[:half]), dest=rank + 1, tag=_TAG_FOLD)], wait)
            wait_requests([comm.Irecv(ops.buffer(buf), source=rank + 1, tag=_TAG_FOLD)], wait)
            return
        exchange_reduce(comm, ops, buf[:half], rank - 1, buf[half:], scratch[half:n], rank - 1, op, _TAG_FOLD,
                        wait=wait, segment=segment)
        wait_requests([comm.Irecv(ops.buffer(buf[:half]), source=rank - 1, tag=_TAG_FOLD)], wait)
        vrank = rank // 2
    else:
        vrank = rank - folded

    def real_rank(v: int) -> int:
        return 2 * v + 1 if v < folded else v + folded

    bounds = block_bounds(n, pof2)
    kept = _reduce_scatter_halving(comm, buf, scratch, ops, op, vrank, pof2, bounds, real_rank, wait,
                                   segment)
    _allgather_doubling(comm, buf, ops, vrank, pof2, bounds, real_rank, kept, wait)
    if rank < 2 * folded:
        wait_requests([comm.Isend(ops.buffer(buf), dest=rank - 1, tag=_TAG_FOLD)], wait)


def _reduce_scatter_halving(comm, buf, scratch, ops, op, vrank, pof2, bounds, real_rank, wait,
                            segment) -> list:
    """Recursive halving, nearest partner first: at distance 1, 2, 4, ... each rank keeps half of its
    range (the lower half when its bit at that distance is 0). The first and largest exchanges stay
    between neighbouring ranks, which launchers place on the same node. Returns the ranges kept after
    each step; the last one is the block this rank holds fully reduced."""
    lo, hi = 0, pof2
    kept = []
    mask = 1
    while mask < pof2:
        partner = real_rank(vrank ^ mask)
        mid = (lo + hi) // 2
        (keep_lo, keep_hi), (send_lo, send_hi) = ((mid, hi), (lo, mid)) if vrank & mask else ((lo, mid), (mid, hi))
        k0, k1, s0, s1 = bounds[keep_lo], bounds[keep_hi], bounds[send_lo], bounds[send_hi]
        exchange_reduce(comm, ops, buf[s0:s1], partner, buf[k0:k1], scratch[k0:k1], partner, op, _TAG_RHD,
                        wait=wait, segment=segment)
        lo, hi = keep_lo, keep_hi
        kept.append((lo, hi))
        mask <<= 1
    return kept


def _allgather_doubling(comm, buf, ops, vrank, pof2, bounds, real_rank, kept, wait) -> None:
    """The reduce-scatter's steps backwards: at distance pof2/2, ..., 2, 1 a rank sends the range it
    holds and receives its partner's, the other half of the range it held one step earlier."""
    mask = pof2 >> 1
    for step in range(len(kept) - 1, -1, -1):
        partner = real_rank(vrank ^ mask)
        lo, hi = kept[step]
        parent_lo, parent_hi = kept[step - 1] if step else (0, pof2)
        other_lo, other_hi = (parent_lo, lo) if lo > parent_lo else (hi, parent_hi)
        exchange(comm, ops, buf[bounds[lo]:bounds[hi]], partner, buf[bounds[other_lo]:bounds[other_hi]], partner,
                 _TAG_RHD, wait=wait)
        mask >>= 1


def allreduce_ring(comm: MPI.Comm, buf, scratch, ops, op: str, *, wait: Optional[Wait] = None,
                   segment: int = 0) -> None:
    size, rank, n = comm.Get_size(), comm.Get_rank(), len(buf)
    if size == 1 or n == 0:
        return
    bounds = block_bounds(n, size)
    right, left = (rank + 1) % size, (rank - 1) % size

    def block(arr, i):
        return arr[bounds[i]:bounds[i + 1]]

    for step in range(size - 1):  # reduce-scatter: rank ends owning block (rank + 1) % size
        send_block, recv_block = (rank - step) % size, (rank - step - 1) % size
        exchange_reduce(comm, ops, block(buf, send_block), right, block(buf, recv_block),
                        block(scratch, recv_block), left, op, _TAG_RING, wait=wait, segment=segment)
    for step in range(size - 1):  # allgather: pass the owned blocks around
        send_block, recv_block = (rank + 1 - step) % size, (rank - step) % size
        exchange(comm, ops, block(buf, send_block), right, block(buf, recv_block), left, _TAG_RING, wait=wait)


# ---- the registry ---------------------------------------------------------------------------

class AllreduceAlgorithm:
    """One all-reduce algorithm, run in place on a flat work buffer of ``comm`` (an mpisgd Communicator).

    ``packs_buckets``: fused host buckets can be packed straight into its input (the shared window).
    """

    name = ""
    packs_buckets = False

    def refusal(self, comm: Communicator, ops: Any) -> Optional[str]:
        """Why this algorithm cannot reduce ``ops``' buffers on ``comm`` (None: it can)."""
        return None

    def check(self, comm: Communicator, ops: Any) -> None:
        """A ConfigError, the same on every rank, when :meth:`refusal` has a reason."""
        reason = self.refusal(comm, ops)
        if reason:
            raise ConfigError(reason)

    def allreduce_(self, comm: Communicator, flat: Any, ops: Any, op: str) -> None:
        raise NotImplementedError

    def reduce_bucket_(self, comm: Communicator, bucket: FusionBucket, op: str, divisor: int) -> None:
        """Reduce a fused bucket (only where ``packs_buckets``)."""
        raise NotImplementedError


class PointToPoint(AllreduceAlgorithm):
    """rhd, ring and native: functions of (MPI comm, buf, scratch, ops, op, wait=, segment=)."""

    def __init__(self, name: str, function: Callable[..., None], *, scratch: bool = True) -> None:
        self.name, self.function, self.scratch = name, function, scratch

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """The function itself, as ``ALGORITHMS[name](comm, buf, scratch, ops, op)`` was called before."""
        self.function(*args, **kwargs)

    def allreduce_(self, comm: Communicator, flat: Any, ops: Any, op: str) -> None:
        run_point_to_point(self, comm, comm.mpi, flat, ops, op, "scratch")


def run_point_to_point(algorithm: PointToPoint, comm: Communicator, over: MPI.Comm, flat: Any, ops: Any, op: str,
                       role: str) -> None:
    """Run ``algorithm`` over ``over`` (the communicator's MPI comm, or its cross-node one) with scratch
    from ``comm``'s workspace under ``role``."""
    scratch = comm.scratch(ops, arrays.dtype_name(flat), len(flat), role) if algorithm.scratch else None
    algorithm.function(over, flat, scratch, ops, op, wait=comm.watchdog.wait, segment=comm.segment_elements(ops, flat))


class SharedWindow(AllreduceAlgorithm):
    """``shm``: every rank of one node through the shared window."""

    name = SHM
    packs_buckets = True

    def refusal(self, comm: Communicator, ops: Any) -> Optional[str]:
        if ops is not arrays.HOST_OPS:
            return (f"algorithm {self.name!r} reduces host memory; GPU buffers with CUDA-aware MPI "
                    "need rhd, ring or native")
        if not comm.single_node:
            return (f"algorithm 'shm' needs every rank on one node; this communicator spans "
                    f"{comm.num_nodes} nodes (use 'hier')")
        return None

    def across(self, comm: Communicator, op: str) -> Optional[Callable[[Any], None]]:
        return None

    def allreduce_(self, comm: Communicator, flat: Any, ops: Any, op: str) -> None:
        window = comm.shared_window()
        assert window is not None  # required: raises rather than returning None
        window.allreduce_(flat, op, self.across(comm, op))

    def reduce_bucket_(self, comm: Communicator, bucket: FusionBucket, op: str, divisor: int) -> None:
        window = comm.shared_window()  # packed straight into this rank's slot, unpacked from the shared result
        assert window is not None  # required: raises rather than returning None
        bucket.pack(window.slot(bucket.numel, bucket.dtype))
        bucket.unpack(window.reduce(bucket.numel, bucket.dtype, op, self.across(comm, op)), divisor)


class Hierarchical(SharedWindow):
    """``hier``: each node through its window, then each block of the node's sum across nodes."""

    name = HIER

    def refusal(self, comm: Communicator, ops: Any) -> Optional[str]:
        if ops is not arrays.HOST_OPS:
            return super().refusal(comm, ops)
        if not comm.uniform_nodes:
            return "algorithm 'hier' needs the same number of ranks on every node"
        return None

    def across(self, comm: Communicator, op: str) -> Optional[Callable[[Any], None]]:
        """All-reduce one block of this node's sum with the same block of the other nodes."""
        cross = comm.cross_nodes
        if cross.Get_size() == 1:
            return None

        def reduce_block(block: Any) -> None:
            if not len(block):  # the same on every rank of ``cross``: the same n and node size
                return
            name = NATIVE if block.nbytes < comm.native_below_bytes else large_message_algorithm(
                cross.Get_size(), comm.config.non_power_of_two)
            algorithm = ALGORITHMS[name]
            assert isinstance(algorithm, PointToPoint)
            run_point_to_point(algorithm, comm, cross, block, arrays.HOST_OPS, op, "cross")
        return reduce_block


ALGORITHMS: dict[str, AllreduceAlgorithm] = {algorithm.name: algorithm for algorithm in (
    PointToPoint(RHD, allreduce_rhd), PointToPoint(RING, allreduce_ring),
    PointToPoint(NATIVE, allreduce_native, scratch=False), SharedWindow(), Hierarchical())}
