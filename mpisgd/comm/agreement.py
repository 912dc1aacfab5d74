"""The collective mismatch check, carried in the small all-reduce's own message.

Every checked call (``check_collectives``, the default) makes sure that every rank called the same
collective alike (call, op, algorithm, dtype, shape) before any rank trusts its result: ranks that
called with different shapes would otherwise wait for each other forever. A separate check message
in front of the payload doubles the latency of a small all-reduce, so the check rides in the payload's
message instead (one all-reduce) whenever that is safe:

* **The first collective of every checked call is the same on every rank, whatever each rank was
  called with:** an all-reduce of the *agreed layout* ``(count, dtype, op)``: :data:`SIGNATURE`
  elements of the call's signature, then ``count`` payload elements. The layout is state that every
  rank updates alike, from agreed calls only (the last small host all-reduce that every rank agreed
  on; at first: signature only, int64, max). So a shape, dtype or op that differs between ranks can
  never make MPI match messages of different counts or element sizes (with MPICH that hangs, or
  aborts the job on an assertion; measured), however the ranks were called.
* A call whose own (count, dtype, op) *is* the layout carries its payload in that message: the
  steady state of a loop, one collective per call. Any other checked call sends its signature alone
  in the layout (payload slots zero) and, once agreed, runs its payload as before, and a small
  host all-reduce becomes the new layout.
* **The signature** is a CRC32 of the call's description, cut into 8 chunks ``c`` of 4 bits, sent as
  ``[1, c, -c, c*c]`` (25 elements). Every rank agrees iff the reduced elements are ``p * mine``
  (sum) or ``mine`` (max, min): for a sum, sum(c) = p c0 and sum(c^2) = p c0^2 leave no variance, so
  every c equals c0; for max and min, max(c) = c0 = -max(-c) = min(c). The values stay below 2^24
  for p < 74565, so they are exact in float32 (beyond that the layout stays int64). The verdict is
  the same on every rank (all read the same reduced elements); the payload's own elements never mix
  with the signature's. Only on disagreement are the descriptions gathered (under the watchdog) to
  name the ranks and fields that differ; the caller's array is untouched then.
* Not carried (the signature alone, then the payload): messages from :data:`CARRY_BELOW_BYTES` up
  (the check is noise there), algorithms other than MPI's own (``native``, or ``auto`` where it chooses
  native for a host vector of that size), empty arrays. These follow from the description alone, so
  every rank decides alike; a carried device buffer travels through a host copy.

**The message is a persistent collective** (MPI-4 ``MPI_Allreduce_init``, under MPICH and Open MPI 5):
each layout's buffer and request are made once, at the first checked call with that layout (the same
call on every rank, since layouts change only on agreed calls), and restarted by every later call,
which spares MPI's set-up of a nonblocking collective. Every rank uses the same kind of request for
the same message (MPI does not match a persistent collective with a nonblocking one): a library
without persistent collectives, or a job past :data:`PERSISTENT_LAYOUTS` layouts, uses
``MPI_Iallreduce`` alike on every rank; past them only the latest layout's message is kept, so memory
stays bounded. The requests are freed with the communicator (its ``free``).

**The steady state** (:meth:`Agreement.run_steady`): a numpy array whose (dtype, shape, op, algorithm)
was carried before in the current layout skips the description, the dtype checks and the work
buffer: a dictionary lookup, two copies and the restart.

What it costs: the copy of the payload into the layout buffer and back (~0.2 us at 4 KiB), and 100
(float32) to 200 bytes more on the wire. Every wait is the communicator's watchdog's.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
from mpi4py import MPI

from mpisgd import arrays as backend
from mpisgd.errors import CollectiveMismatchError

if TYPE_CHECKING:
    from mpisgd.comm.communicator import Communicator

CHUNK_BITS, CHUNKS = 4, 8
#: elements of a signature: a marker 1, the chunks, their negatives and their squares
SIGNATURE = 1 + 3 * CHUNKS
#: all-reduces below this many bytes carry their check in their own message
CARRY_BELOW_BYTES = 64 << 10
CARRIED_DTYPES = ("float32", "float64", "int32", "int64")
#: float32 holds integers exactly below 2^24: p * (2^CHUNK_BITS - 1)^2 must stay below it
FLOAT32_EXACT_BELOW_RANKS = (1 << 24) // ((1 << CHUNK_BITS) - 1) ** 2
_CACHE_LIMIT = 4096
#: layouts of one communicator that get a persistent request; later ones use MPI_Iallreduce
PERSISTENT_LAYOUTS = 16


class Layout(NamedTuple):
    """What every rank's first message of a checked call is: ``elements`` payload elements after the
    signature, of ``dtype``, reduced with ``op`` (sum, max or min)."""

    elements: int
    dtype: str
    op: str


SIGNATURE_ONLY = Layout(0, "int64", "max")


def signature_of(description: dict) -> np.ndarray:
    """The 25 signature elements (int64) of a call's description."""
    digest = zlib.crc32(repr(description).encode())
    chunks = [(digest >> (CHUNK_BITS * i)) & ((1 << CHUNK_BITS) - 1) for i in range(CHUNKS)]
    return np.array([1, *chunks, *(-c for c in chunks), *(c * c for c in chunks)], dtype=np.int64)


class Message:
    """One layout's message: its buffer (signature slots, then payload slots) and, where MPI has
    persistent collectives, the request that reduces it in place."""

    def __init__(self, comm: Communicator, layout: Layout, persistent: bool) -> None:
        self.layout = layout
        self.buffer = np.zeros(SIGNATURE + layout.elements, dtype=layout.dtype)
        self.head, self.payload = self.buffer[:SIGNATURE], self.buffer[SIGNATURE:]
        self._spec = [self.buffer, backend.MPI_DATATYPES[layout.dtype]]
        self._op = backend.MPI_OPS[layout.op]
        self._mpi = comm.mpi
        self.request: Any = None
        self._requests: list = []
        if persistent:  # local in MPICH and Open MPI (no synchronization); collective order is kept
            self.request = self._mpi.Allreduce_init(MPI.IN_PLACE, self._spec, op=self._op)
            self._requests = [self.request]

    def start(self) -> list:
        """Start the reduction of the buffer; the requests to wait for."""
        if self.request is None:
            return [self._mpi.Iallreduce(MPI.IN_PLACE, self._spec, op=self._op)]
        self.request.Start()
        return self._requests

    def free(self) -> None:
        """Free the persistent request (local). After a timeout it may still be active: only dropped."""
        from mpisgd.comm.watchdog import timed_out

        if self.request is not None and not MPI.Is_finalized() and not timed_out():
            self.request.Free()
        self.request, self._requests = None, []


class SteadyCall(NamedTuple):
    """A carried all-reduce of a numpy array seen before in the current layout: what its call needs."""

    message: Message
    signature: np.ndarray  # in the layout's dtype
    expected: bytes
    shaped: np.ndarray  # the message's payload slots, in the caller's shape
    mean: bool
    description: dict


class Agreement:
    """The check of one communicator's collectives: the agreed layout and the cached signatures."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.layout = SIGNATURE_ONLY
        self._signatures: dict = {}  # description key -> (description, int64 signature)
        self._expected: dict = {}  # (description key, layout) -> bytes of the agreed reduced signature
        self._messages: dict = {}  # layout -> Message, in the order every rank made them
        self._steady: dict = {}  # (dtype, shape, op, algorithm) -> SteadyCall of the current layout
        self._persistent = True  # until the library says it has no persistent collectives
        self._overflow: Optional[Message] = None  # the latest layout's message past PERSISTENT_LAYOUTS

    def _message(self, comm: Communicator) -> Message:
        """The current layout's message: kept for the first PERSISTENT_LAYOUTS layouts (persistent where
        MPI can), beyond them one more, of the latest layout (nonblocking), so memory stays bounded."""
        message = self._messages.get(self.layout)
        if message is None and self._overflow is not None and self._overflow.layout == self.layout:
            message = self._overflow
        if message is None:
            kept = len(self._messages) < PERSISTENT_LAYOUTS
            try:
                message = Message(comm, self.layout, kept and self._persistent)
            except NotImplementedError:  # the same library on every rank: they all fall back alike
                self._persistent = False
                message = Message(comm, self.layout, False)
            if kept:
                self._messages[self.layout] = message
            else:
                self._overflow = message
        return message

    @staticmethod
    def steady_key(x: np.ndarray, op: Any, algorithm: Any) -> tuple:
        return x.dtype, x.shape, op, algorithm

    def run_steady(self, comm: Communicator, x: np.ndarray, op: Any, algorithm: Any) -> bool:
        """:meth:`check` with the payload carried, in place, for a writeable numpy array whose kind (the
        :meth:`steady_key`) was carried before in the current layout; False (nothing done) for any other."""
        try:
            call = self._steady.get((x.dtype, x.shape, op, algorithm))
        except TypeError:  # an unhashable op or algorithm: the full path says what is wrong
            return False
        if call is None or not x.flags.writeable or comm.watchdog.unfinished is not None:
            return False  # (unfinished: the message may still be in flight; the full path's entry refuses)
        message, shaped = call.message, call.shaped
        message.head[...] = call.signature
        shaped[...] = x
        if message.request is not None:
            comm.watchdog.start_and_wait("allreduce (argument check)", message.request)
        else:
            comm.watchdog.enter("allreduce (argument check)")
            comm.watchdog.wait(message.start())
        if message.head.tobytes() != call.expected:
            raise_mismatch(comm, call.description)
        if call.mean:  # in the reduction dtype, as the full path does
            shaped /= self.size
        x[...] = shaped
        return True

    def free(self) -> None:
        """Free the persistent requests (local); the communicator's free does it."""
        for message in self._messages.values():
            message.free()
        self._messages.clear()
        self._overflow = None
        self._steady.clear()

    def can_carry(self, dtype: str, op: str) -> bool:
        return dtype in CARRIED_DTYPES and op in ("sum", "max", "min") and (
            dtype != "float32" or self.size < FLOAT32_EXACT_BELOW_RANKS)

    def _signature(self, key: Any, fields: dict) -> tuple:
        found = self._signatures.get(key)
        if found is None:
            if len(self._signatures) > _CACHE_LIMIT:
                self._signatures.clear()
                self._expected.clear()
            description = dict(fields)
            found = self._signatures[key] = (description, signature_of(description))
        return found

    def _expected_bytes(self, key: Any, signature: np.ndarray, layout: Layout) -> bytes:
        expected = self._expected.get((key, layout))
        if expected is None:
            agreed = signature * (self.size if layout.op == "sum" else 1)
            expected = self._expected[(key, layout)] = agreed.astype(layout.dtype).tobytes()
        return expected

    def check(self, comm: Communicator, key: Any, fields: dict, payload: Any = None,
              op: str = "sum", next_layout: Optional[Layout] = None, steady: Any = None) -> bool:
        """Raise the same CollectiveMismatchError on every rank unless every rank called alike.

        Args:
            comm: the communicator (its MPI communicator and watchdog).
            key: a hashable stand-in for ``fields`` (cached signatures).
            fields: the call's description ({"call": ..., ...}).
            payload: the flat work buffer of an all-reduce that may ride along (None: none).
            op: the all-reduce's MPI op (sum for mean).
            next_layout: the layout this call becomes once agreed (small host all-reduces).
            steady: ``(key, shape, mean)`` for a numpy array whose later calls may take the steady state
                once carried: :meth:`steady_key`, the array's shape, and whether to divide by the size.

        Returns whether the payload was reduced (it travelled in the layout): else run it now.
        """
        description, signature = self._signature(key, fields)
        layout = self.layout
        carried = payload is not None and next_layout == layout
        comm.watchdog.enter(f"{fields['call']} (argument check)")  # first: refused while a message may be in flight
        message = self._message(comm)
        message.head[...] = signature
        if carried:
            if isinstance(payload, np.ndarray):
                message.payload[...] = payload
            else:
                backend.copy_into_flat(message.payload, payload)
        elif layout.elements:
            message.payload[...] = 0
        comm.watchdog.wait(message.start())
        expected = self._expected_bytes(key, signature, layout)
        if message.head.tobytes() != expected:
            raise_mismatch(comm, description)
        if carried:
            if isinstance(payload, np.ndarray):
                payload[...] = message.payload
            else:
                backend.copy_from_flat(payload, message.payload)
            if steady is not None and len(self._steady) < _CACHE_LIMIT:
                steady_key, shape, mean = steady
                self._steady[steady_key] = SteadyCall(message, signature.astype(layout.dtype), expected,
                                                      message.payload.reshape(shape), mean, description)
        elif next_layout is not None:
            self.layout = next_layout  # agreed by every rank: their next first messages match again
            self._steady.clear()
        return carried


def raise_mismatch(comm: Communicator, description: dict) -> None:
    """Gather every rank's description and raise the same error naming the fields and ranks that differ."""
    everyone = comm.allgather_objects(description, name=f"{description.get('call')} (argument check: descriptions)")
    differences = []
    for key in dict.fromkeys(k for desc in everyone for k in desc):
        by_value: dict = {}
        for rank, desc in enumerate(everyone):
            by_value.setdefault(repr(desc.get(key)), []).append(rank)
        if len(by_value) > 1:
            parts = "; ".join(f"ranks {_ranks(r)}: {v}" for v, r in by_value.items())
            differences.append(f"{key} differs ({parts})")
    if not differences:  # the same description but another verdict: cannot happen unless memory is corrupt
        differences.append("the check's reduced signature disagrees, although every description is the same")
    raise CollectiveMismatchError(f"mismatched collective {everyone[0].get('call')!r} across ranks: "
                                  + "; ".join(differences))


def _ranks(ranks: Iterable[int]) -> str:
    return ",".join(str(r) for r in ranks)
