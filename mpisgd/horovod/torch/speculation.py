"""The coordinator's one-message cycle: a repeated small allreduce travels with its own negotiation.

A negotiated allreduce costs two collectives per cycle (the negotiation's allgather, then the payload),
twice MPI's own latency for a small tensor. But a loop reduces the same tensors again and again, so a
cycle first *speculates*: every rank sends one all-reduce of the *agreed layout* (the elements, dtype
and op of the last cycle whose only work was one small fused allreduce of the global set): a control
block, then the payload. A rank whose new submissions fill the layout exactly (and which has nothing
else in flight, no join, no shutdown) packs its tensors and the signature of their names and
signatures (:func:`mpisgd.comm.agreement.signature_of`, with a 1/-1 marker pair); any other rank sends
zeros. The reduced control block tells every rank the same thing: either every rank carried the same
operations (they are done: one collective) or not (the payload is discarded and the cycle negotiates as
usual; nothing was applied). The layout is learned from negotiated outcomes, which every rank decides
alike, so every rank's first message always has the same count, dtype and op: never an MPI mismatch.
The speculative message is sent only while nothing is pending in the negotiation (common knowledge), and
the layout is forgotten after a few idle cycles: a failed speculation (the first idle cycle after a loop,
or a loop alternating two layouts) costs one small message more than negotiating alone.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd.comm.agreement import FLOAT32_EXACT_BELOW_RANKS, SIGNATURE, signature_of
from mpisgd.horovod.torch.basics import ReduceOp
from mpisgd.horovod.torch.executor import Operation, scale_
from mpisgd.horovod.torch.negotiation import Kind, Signature

#: allreduces of up to this many bytes (all of a cycle together) speculate; larger ones are negotiated
SPECULATE_BELOW_BYTES = 64 << 10
#: idle cycles (no traffic on any rank) after which the layout is forgotten
IDLE_KEEP = 4
CONTROL = 2 + SIGNATURE
TRANSPORT = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64,
             "float16": np.float32, "bfloat16": np.float32, "uint8": np.int64, "int8": np.int64, "int16": np.int64}
OPS = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVERAGE: MPI.SUM, ReduceOp.MIN: MPI.MIN, ReduceOp.MAX: MPI.MAX}
_CACHE_LIMIT = 1024


class Layout(NamedTuple):
    elements: int
    dtype: Any  # numpy transport dtype
    op: int  # ReduceOp (Sum and Average share MPI's sum, but not their results: kept apart)


def layout_of(signatures: list) -> Optional[Layout]:
    """The layout of one cycle's allreduces, or None where they cannot speculate."""
    first = signatures[0]
    if any(s.kind != Kind.ALLREDUCE or s.process_set != 0 or s.prescale != 1.0 or s.dtype != first.dtype
           or s.op != first.op for s in signatures) or ReduceOp(first.op) not in OPS:
        return None
    dtype = TRANSPORT.get(first.dtype)
    if dtype is None:
        return None
    elements = sum(math.prod(s.shape) for s in signatures)
    if not 0 < elements * np.dtype(dtype).itemsize < SPECULATE_BELOW_BYTES:
        return None
    return Layout(elements, dtype, first.op)


class Speculation:
    """This rank's copy of the shared layout, and the speculative exchange of one cycle."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.layout: Optional[Layout] = None
        self._idle = 0
        self._signatures: dict = {}
        self._buffers: dict = {}

    def _signature(self, operations: list) -> np.ndarray:
        key = tuple((op.name, op.signature) for op in operations)
        found = self._signatures.get(key)
        if found is None:
            if len(self._signatures) > _CACHE_LIMIT:
                self._signatures.clear()
            found = self._signatures[key] = np.concatenate([[1, -1], signature_of({"ops": key})])
        return found

    def fits(self, operations: list) -> bool:
        """Whether this rank's new ``operations`` (its only ones in flight) fill the layout exactly."""
        return bool(operations) and self.layout is not None and layout_of(
            [op.signature for op in operations]) == self.layout

    def exchange(self, comm: MPI.Comm, carried: Optional[list], wait: Callable[[Any], None]) -> bool:
        """The speculative all-reduce (``carried``: this rank's operations, or None to send zeros);
        True when every rank carried the same operations, which are then complete."""
        layout = self.layout
        assert layout is not None
        buffer = self._buffers.get(layout)
        if buffer is None:
            self._buffers.clear()
            buffer = self._buffers[layout] = np.zeros(CONTROL + layout.elements, dtype=layout.dtype)
        if carried is None:
            buffer[:] = 0
        else:
            buffer[:CONTROL] = self._signature(carried)
            offset = CONTROL
            for op in carried:
                n = op.tensor.numel()
                view = buffer[offset:offset + n]
                if op.tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                    torch.from_numpy(view).copy_(op.tensor.reshape(-1))
                else:
                    view[...] = op.tensor.reshape(-1).numpy()
                offset += n
        wait(comm.Iallreduce(MPI.IN_PLACE, buffer, op=OPS[ReduceOp(layout.op)]))
        expected = (self._signature(carried) * (self.size if OPS[ReduceOp(layout.op)] == MPI.SUM else 1)
                    if carried is not None else None)
        if expected is None or not np.array_equal(buffer[:CONTROL], expected):
            return False
        offset = CONTROL
        for op in carried or ():
            self._finish(op, buffer[offset:offset + op.tensor.numel()])
            offset += op.tensor.numel()
        return True

    def _finish(self, op: Operation, reduced: np.ndarray) -> None:
        sig = op.signature
        with torch.no_grad():
            op.tensor.reshape(-1).copy_(torch.from_numpy(reduced))
        scale_(op.tensor, sig.postscale / (len(sig.members) if sig.op == ReduceOp.AVERAGE else 1))
        op.complete(op.tensor)

    def learn(self, responses: list, traffic: bool) -> None:
        """After a negotiated cycle (decided alike on every rank): its allreduce becomes the layout."""
        if not responses:
            self._idle = 0 if traffic else self._idle + 1
            if self._idle >= IDLE_KEEP:
                self.layout = None
            return
        self._idle = 0
        ok = all(r.error is None and not r.joined for r in responses)
        signatures: list[Signature] = [r.signature for r in responses]
        layout = layout_of(signatures) if ok else None
        if layout is not None and layout.dtype == np.float32 and self.size >= FLOAT32_EXACT_BELOW_RANKS:
            layout = None  # the reduced signature would no longer be exact in float32: always negotiate
        self.layout = layout
