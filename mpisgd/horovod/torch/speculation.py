"""The coordinator's one-message cycle: a repeated allreduce travels with its own negotiation.

A negotiated allreduce costs two collectives per cycle (the negotiation's allgather, then the payload),
twice MPI's own latency for a small tensor. But a loop reduces the same tensors again and again, so a
cycle first *speculates*: every rank sends one all-reduce of the *agreed layout* (the elements, dtype
and op of the last cycle whose only work was one fused allreduce of the global set): a control block,
then (below SPECULATE_BELOW_BYTES) the payload. A rank whose new submissions fill the layout exactly (and
which has nothing else in flight, no join, no shutdown) packs its tensors and the signature of their
names and signatures (:func:`mpisgd.comm.agreement.signature_of`, with a 1/-1 marker pair); a rank with
nothing to do sends an idle mark; any other rank sends zeros. The reduced control block tells every rank
the same thing: every rank carried the same operations (they are done: one collective; a larger payload
follows in the fused reduction a negotiated cycle would run), or no rank had anything to do (the cycle is
over), or, for a sum, that every rank carried or was idle (peers still computing, as a backward pass on
one rank ends before another's: nothing was applied, and the carried operations wait for the next cycle,
which speculates again, up to PARTIAL_LIMIT cycles in a row), or none of these (the payload is discarded
and the cycle negotiates as usual; nothing was applied). The
layout is learned from negotiated outcomes, which every rank decides alike, so every rank's first message
always has the same count, dtype and op: never an MPI mismatch. The speculative message is sent only while
nothing is pending in the negotiation (common knowledge). A failed speculation (a loop alternating two
layouts, a call of another kind) costs one small message more than negotiating alone. A layout with its
payload in the message is forgotten after a few idle cycles, whose messages would carry the payload's
zeros; one whose payload travels apart is kept (an idle cycle sends the control block alone).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd.comm.agreement import FLOAT32_EXACT_BELOW_RANKS, SIGNATURE, signature_of
from mpisgd.horovod.torch.basics import ReduceOp
from mpisgd.horovod.torch.executor import Operation, after_reduction, scale_
from mpisgd.horovod.torch.negotiation import Kind, Signature

#: cycles of allreduces below this many bytes (all of a cycle together) carry their payload in the
#: speculative message; larger ones send the control block alone, the payload after it
SPECULATE_BELOW_BYTES = 64 << 10
#: idle cycles (no traffic on any rank) after which the layout is forgotten
IDLE_KEEP = 4
CONTROL = 3 + SIGNATURE  # the 1/-1 markers, the idle mark, the signature
#: the idle mark of a rank with nothing to do, by op: it reduces to its "every rank idle" value only then
IDLE_MARK = {ReduceOp.SUM: 1, ReduceOp.AVERAGE: 1, ReduceOp.MIN: 1, ReduceOp.MAX: -1}
CARRIED, ALL_IDLE, PARTIAL, FAILED = "carried", "all idle", "partial", "failed"  # how a speculative cycle ended
#: speculative cycles in a row that end PARTIAL before one negotiates (whose stall inspector names the
#: missing ranks); every rank counts the same reduced messages, so every rank falls back in the same cycle
PARTIAL_LIMIT = 16
TRANSPORT = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64,
             "float16": np.float32, "bfloat16": np.float32, "uint8": np.int64, "int8": np.int64, "int16": np.int64}
OPS = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVERAGE: MPI.SUM, ReduceOp.MIN: MPI.MIN, ReduceOp.MAX: MPI.MAX}
_CACHE_LIMIT = 1024
_VIEWS_KEPT = 8  # in-place tensors per Carry whose numpy view is kept


class Layout(NamedTuple):
    elements: int
    dtype: Any  # numpy transport dtype
    op: int  # ReduceOp (Sum and Average share MPI's sum, but not their results: kept apart)
    apart: bool  # SPECULATE_BELOW_BYTES or more: the control block travels alone, the payload after it


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
    if not elements:
        return None
    return Layout(elements, dtype, first.op, elements * np.dtype(dtype).itemsize >= SPECULATE_BELOW_BYTES)


class Message:
    """The current layout's buffer (control block, then payload) and its persistent request (None where
    MPI has none: then a nonblocking all-reduce per cycle, alike on every rank)."""

    def __init__(self, comm: MPI.Comm, layout: Layout, persistent: bool) -> None:
        self.layout = layout
        self.buffer = np.zeros(CONTROL + (0 if layout.apart else layout.elements), dtype=layout.dtype)
        self.head = self.buffer[:CONTROL]
        self.op = OPS[ReduceOp(layout.op)]
        self.request = comm.Allreduce_init(MPI.IN_PLACE, self.buffer, op=self.op) if persistent else None

    def reduce(self, comm: MPI.Comm, wait: Callable[[Callable[[], Any]], None]) -> None:
        """Reduce the buffer in place through ``wait(start)``, which enters the collective, then posts it."""
        if self.request is None:
            wait(lambda: comm.Iallreduce(MPI.IN_PLACE, self.buffer, op=self.op))
        else:
            wait(self._restart)

    def _restart(self) -> Any:
        assert self.request is not None
        self.request.Start()
        return self.request


class Carry(NamedTuple):
    """What a synchronous allreduce of one tensor seen before needs to travel alone speculatively."""

    signature: Signature
    layout: Optional[Layout]
    control: np.ndarray  # the control block it sends, in the layout's dtype
    expected: bytes  # the reduced control block when every rank carried it
    factor: float  # applied after the reduction (postscale, and 1/size for Average)
    views: Optional[dict]  # data_ptr -> numpy view of an in-place tensor (where numpy has its dtype)
    payload: list  # [the Message, its payload in numpy and torch in this call's shape], made at first use


class Speculation:
    """This rank's copy of the shared layout, and the speculative exchange of one cycle."""

    def __init__(self, size: int, *, apart: bool = True) -> None:
        self.size = size
        self.apart = apart  # whether layouts whose payload travels apart are learned
        self.layout: Optional[Layout] = None
        self._idle = 0
        self._partials = 0  # speculative cycles in a row that ended PARTIAL
        self._signatures: dict = {}
        self._layouts: dict = {}
        self.carries: dict = {}  # a single allreduce's arguments -> its Carry
        # the current layout's buffer and persistent request (MPI-4 MPI_Allreduce_init), made at its
        # first speculative cycle, the same one on every rank; MPI does not match a persistent collective
        # with a nonblocking one, so every rank uses the same kind (nonblocking where MPI has no persistent)
        self._message: Optional[Message] = None
        self._persistent = True

    def _signature(self, key: tuple) -> np.ndarray:
        """The control block (markers, then the signature) of operations ``key``: ((name, signature), ...)."""
        found = self._signatures.get(key)
        if found is None:
            if len(self._signatures) > _CACHE_LIMIT:
                self._signatures.clear()
            found = self._signatures[key] = np.concatenate([[1, -1, 0], signature_of({"ops": key})])
        return found

    def _expected(self, control: np.ndarray, op: int) -> np.ndarray:
        return control * (self.size if OPS[ReduceOp(op)] == MPI.SUM else 1)

    def _ended(self, head: np.ndarray, control: Optional[np.ndarray], op: int) -> str:
        """How the cycle whose reduced control block is ``head`` ended (this rank sent ``control``, None
        for zeros): decided by the reduced block alone, so alike on every rank."""
        if control is not None and np.array_equal(head, self._expected(control, op)):
            self._partials = 0
            if control[0]:
                self._idle = 0  # IDLE_KEEP counts idle cycles in a row
                return CARRIED
            return ALL_IDLE
        # a sum counts the ranks: c carried (the markers c, -c) and the others sent idle marks
        carriers, idle = head[0], head[2]
        if OPS[ReduceOp(op)] == MPI.SUM and 0 < carriers < self.size and head[1] == -carriers \
                and carriers + idle == self.size and self._partials < PARTIAL_LIMIT:
            self._partials += 1
            return PARTIAL
        self._partials = 0
        return FAILED

    def fits(self, operations: list) -> bool:
        """Whether this rank's new ``operations`` (its only ones in flight) fill the layout exactly."""
        return bool(operations) and self.layout is not None and layout_of(
            [op.signature for op in operations]) == self.layout

    def _current(self, comm: MPI.Comm) -> Message:
        """The current layout's message, made at its first speculative cycle (the same on every rank)."""
        layout = self.layout
        assert layout is not None
        if self._message is None or self._message.layout != layout:  # equal on every rank (interning is local)
            self.free()
            try:
                self._message = Message(comm, layout, self._persistent)
            except NotImplementedError:  # the same library on every rank: all fall back alike
                self._persistent = False
                self._message = Message(comm, layout, False)
        return self._message

    def free(self) -> None:
        """Free the persistent request (local); after a timeout it may still be active: only dropped."""
        from mpisgd.comm.watchdog import timed_out

        if self._message is not None and self._message.request is not None and not MPI.Is_finalized() \
                and not timed_out():
            self._message.request.Free()
        self._message = None

    def exchange(self, comm: MPI.Comm, carried: Optional[list], idle: bool, wait: Callable[[Callable[[], Any]], None],
                 run_apart: Callable[[list], None]) -> str:
        """The speculative all-reduce (``carried``: this rank's operations, or None; ``idle``: this rank has
        nothing to do): CARRIED when every rank carried the same operations, which are then complete;
        ALL_IDLE when no rank had anything to do (the cycle is over: a negotiation would decide nothing);
        PARTIAL when the others were idle (nothing applied: the carried operations wait for the next
        cycle); else FAILED (nothing applied: negotiate). A layout whose payload travels apart sends the control
        block alone, then (where every rank carried the same) hands the operations to ``run_apart``: the
        fused reduction a negotiated cycle would run, through mpisgd's algorithms, the negotiation's gather
        replaced by one small all-reduce."""
        message = self._current(comm)
        buffer, op = message.buffer, message.layout.op
        control = self._signature(tuple((o.name, o.signature) for o in carried)) if carried is not None \
            else self._idle_control(op) if idle else None
        if control is None:
            buffer[:] = 0
        else:
            message.head[...] = control
            if carried is not None and not message.layout.apart:
                offset = CONTROL
                for o in carried:
                    n = o.tensor.numel()
                    view = buffer[offset:offset + n]
                    if o.tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                        torch.from_numpy(view).copy_(o.tensor.reshape(-1))
                    else:
                        view[...] = o.tensor.reshape(-1).numpy()
                    offset += n
            elif carried is None:
                buffer[CONTROL:] = 0
        message.reduce(comm, wait)
        ended = self._ended(message.head, control, op)
        if ended != CARRIED:
            return ended
        assert carried is not None  # CARRIED: this rank sent its operations' control block
        if message.layout.apart:
            run_apart(carried)
            return CARRIED
        offset = CONTROL
        for o in carried:
            self._finish(o, buffer[offset:offset + o.tensor.numel()])
            offset += o.tensor.numel()
        return CARRIED

    @staticmethod
    def _idle_control(op: int) -> np.ndarray:
        control = np.zeros(CONTROL)
        control[2] = IDLE_MARK[ReduceOp(op)]
        return control

    def carry_of(self, name: str, signature: Signature) -> Carry:
        """The :class:`Carry` of a single allreduce: the control block the general path would send for it."""
        layout = self._interned(layout_of([signature]))
        if layout is not None and layout.apart:  # a large one goes through a cycle (its control block alone)
            layout = None
        dtype = layout.dtype if layout is not None else np.int64
        control = self._signature(((name, signature),)).astype(dtype)
        expected = self._expected(control, signature.op).tobytes() if layout is not None else b""
        factor = after_reduction(signature)
        same = layout is not None and np.dtype(layout.dtype).name == signature.dtype
        return Carry(signature, layout, control, expected, factor, {} if same else None, [None, None, None])

    def remember(self, key: tuple, carry: Carry) -> None:
        """Keep ``carry`` for later calls with the same arguments ``key`` (bounded, as the signatures)."""
        if len(self.carries) > _CACHE_LIMIT:
            self.carries.clear()
        self.carries[key] = carry

    def prepare(self, comm: MPI.Comm, tensor: torch.Tensor, carry: Carry, in_place: bool) -> tuple:
        """What :meth:`carry_alone` sends and reads: (message, payload in numpy and torch, the tensor's
        numpy view or None, ``in_place``). An in-place tensor that owns its memory is copied through a numpy view kept by
        its address (a torch copy of 4 KiB costs five times numpy's; the view holds the memory, so that
        address stays the tensor's)."""
        message, payload, shaped = carry.payload
        if message is not self._message or message is None:
            message = self._current(comm)
            payload = message.buffer[CONTROL:].reshape(carry.signature.shape)
            shaped = torch.from_numpy(payload)
            carry.payload[:] = message, payload, shaped
        view = None
        if in_place and carry.views is not None:
            view = carry.views.get(tensor.data_ptr())
            if view is None and tensor.storage_offset() == 0 \
                    and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
                if len(carry.views) >= _VIEWS_KEPT:
                    carry.views.clear()
                view = carry.views[tensor.data_ptr()] = tensor.detach().numpy()
        return message, payload, shaped, view, in_place

    def carry_alone(self, comm: MPI.Comm, tensor: torch.Tensor, carry: Carry, prepared: tuple,
                    watchdog: Any) -> tuple:
        """One speculative cycle carrying ``tensor`` alone (a contiguous CPU tensor of ``carry``'s
        signature, whose layout is the current one; ``prepared`` by :meth:`prepare`): (CARRIED, its
        result: ``tensor`` itself when in place) when every rank carried the same; else (PARTIAL or
        FAILED, None): nothing applied, as :meth:`exchange`."""
        message, payload, shaped, view, in_place = prepared
        message.head[...] = carry.control
        if view is not None:
            payload[...] = view
        else:
            shaped.copy_(tensor.detach())
        if message.request is not None:
            watchdog.start_and_wait("horovod speculative", message.request)
        else:  # no persistent collectives: the message's own nonblocking reduction
            message.reduce(comm, lambda start: (watchdog.enter("horovod speculative"), watchdog.wait([start()])))
        if message.head.tobytes() != carry.expected:
            return self._ended(message.head, None, message.layout.op), None
        self._partials = self._idle = 0
        if view is not None:
            view[...] = payload
            out = tensor
        elif in_place:
            tensor.data.copy_(shaped)
            out = tensor
        else:
            out = shaped.to(tensor.dtype, copy=True)
        if carry.factor != 1.0:
            scale_(out.data, carry.factor)
        return CARRIED, out

    def _finish(self, op: Operation, reduced: np.ndarray) -> None:
        sig = op.signature
        with torch.no_grad():
            op.tensor.reshape(-1).copy_(torch.from_numpy(reduced))
        scale_(op.tensor, after_reduction(sig))
        op.complete(op.tensor)

    def learn(self, responses: list, traffic: bool) -> None:
        """After a negotiated cycle (decided alike on every rank): its allreduce becomes the layout."""
        if not responses:
            self._idle = 0 if traffic else self._idle + 1
            if self._idle >= IDLE_KEEP and self.layout is not None and not self.layout.apart:
                self.layout = None  # idle cycles would send its payload's zeros (an apart one: the control alone)
            return
        self._idle = 0
        ok = all(r.error is None and not r.joined for r in responses)
        signatures: list[Signature] = [r.signature for r in responses]
        layout = layout_of(signatures) if ok else None
        if layout is not None and layout.apart and not self.apart:
            layout = None
        if layout is not None and layout.dtype == np.float32 and self.size >= FLOAT32_EXACT_BELOW_RANKS:
            layout = None  # the reduced signature would no longer be exact in float32: always negotiate
        self.layout = self._interned(layout)

    def _interned(self, layout: Optional[Layout]) -> Optional[Layout]:
        """One object per layout, so that a call compares its layout with the current one by identity."""
        if layout is None:
            return None
        if len(self._layouts) > _CACHE_LIMIT:  # the kept Carries hold the old objects: they go too
            self._layouts.clear()
            self.carries.clear()
        return self._layouts.setdefault(layout, layout)
