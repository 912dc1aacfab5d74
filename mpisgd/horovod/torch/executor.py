"""Running what the negotiation decided: the data movement of each collective on this rank.

Reductions go through mpisgd's Communicator of the process set (its fused ``allreduce_many_`` and
its algorithm choice); gathers, broadcasts and all-to-alls move raw bytes with the set's own MPI
collectives, which serves every dtype alike (bfloat16 included). Half precision is reduced in
float32 (mpisgd's buffers), int8/uint8/int16 in int64 and cast back, which wraps exactly like
reducing in the narrow type. Only the coordinator's thread calls into here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd.horovod.torch.basics import HorovodInternalError, ReduceOp
from mpisgd.horovod.torch.negotiation import Kind, Response, Signature, fusion_plan
from mpisgd.horovod.torch.process_sets import ProcessSetTable

#: dtypes mpisgd's all-reduce takes as they are (half precision: accumulated in float32 by mpisgd)
MPISGD_DTYPES = {torch.float32, torch.float64, torch.int32, torch.int64, torch.float16, torch.bfloat16}
WIDENED = {torch.uint8: torch.int64, torch.int8: torch.int64, torch.int16: torch.int64,
           torch.float16: torch.float32, torch.bfloat16: torch.float32}
MPISGD_OPS = {ReduceOp.SUM: "sum", ReduceOp.AVERAGE: "sum", ReduceOp.MIN: "min", ReduceOp.MAX: "max"}
DTYPES = {str(d).replace("torch.", ""): d for d in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                                    torch.float16, torch.float32, torch.float64, torch.bfloat16)}


@dataclass
class Operation:
    """One collective this rank submitted: its inputs, where its result goes, and its completion."""

    name: str
    signature: Signature
    extra: Any
    tensor: torch.Tensor  # allreduce/broadcast: reduced or overwritten in place (a copy unless ``x_``)
    finish: Optional[Callable[[Any], Any]] = None  # shapes the result handed to synchronize()
    done: bool = False  # a plain flag: an Event per operation cost ~10 us, more than a small message
    result: Any = None
    error: Optional[BaseException] = None

    @property
    def key(self) -> tuple:
        return (self.signature.process_set, self.name)

    def complete(self, result: Any) -> None:
        self.result = self.finish(result) if self.finish is not None else result
        self.done = True

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True


def scale_(tensor: torch.Tensor, factor: float) -> None:
    """Multiply in place; integers as Horovod does (scaled in double precision, truncated)."""
    if factor == 1.0:
        return
    if tensor.dtype.is_floating_point and tensor.dtype not in (torch.float16, torch.bfloat16):
        tensor.mul_(factor)
    elif tensor.dtype.is_floating_point:
        tensor.copy_(tensor.float().mul_(factor))
    else:
        tensor.copy_(tensor.double().mul_(factor))


def after_reduction(signature: Signature) -> float:
    """The factor applied to a reduced tensor: the postscale, and 1/size of the set for Average."""
    return signature.postscale / (len(signature.members) if signature.op == ReduceOp.AVERAGE else 1)


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A writable byte view of a contiguous CPU tensor (any dtype)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def reducescatter_rows(rows: int, size: int) -> list:
    """Horovod's split of the first dimension: equal parts, the first ``rows % size`` ranks one more."""
    return [rows // size + (1 if r < rows % size else 0) for r in range(size)]


def adasum_combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Adasum of two gradients (Maleki et al. 2021): their sum, less half of each one's projection on
    the other, so that parallel gradients are averaged and orthogonal ones added."""
    dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
    return (1 - dot / (2 * aa) if aa else 1.0) * a + (1 - dot / (2 * bb) if bb else 1.0) * b


class Executor:
    """Runs batches of responses on this rank, for the operations it submitted (or joined)."""

    def __init__(self, rank: int, process_sets: ProcessSetTable, fusion_threshold_bytes: int) -> None:
        self.rank = rank
        self.process_sets = process_sets
        self.fusion_threshold_bytes = fusion_threshold_bytes

    def run(self, batch: list, operations: dict) -> None:
        """Run one fused batch (a list of responses); complete or fail the local operations."""
        self._run(batch, [operations.get(r.key) for r in batch])

    def run_carried(self, carried: list) -> None:
        """The allreduces of the global set that every rank carried in one speculative cycle whose payload
        travels apart: run as the negotiated batch of them would be (the operations stand for their
        responses: the same name, signature, and no error), in the batches of its fusion plan (one
        postscale a batch)."""
        for batch in fusion_plan(carried, self.fusion_threshold_bytes,
                                 lambda op: op.tensor.numel() * op.tensor.element_size()):
            self._run(batch, batch)

    def _run(self, batch: list, mine: list) -> None:
        first = batch[0]
        if first.error is None and self.rank not in first.signature.members:
            return
        try:
            if first.error is not None:
                raise HorovodInternalError(first.error)
            registered = self.process_sets.get(first.signature.process_set)
            kind = first.signature.kind
            if kind == Kind.ALLREDUCE:
                results: list = self._allreduce(batch, mine, registered)
            else:
                results = [self._run_one(kind, response, op, registered) for response, op in zip(batch, mine)]
        except BaseException as exc:  # every operation of the batch fails alike
            error = exc if isinstance(exc, HorovodInternalError) else HorovodInternalError(
                f"{type(exc).__name__}: {exc}")
            for op in mine:
                if op is not None:
                    op.fail(error)
            return
        for op, result in zip(mine, results):
            if op is not None:
                op.complete(result)

    # ---- reductions -------------------------------------------------------------------------
    def _allreduce(self, batch: list, mine: list, registered: Any) -> list:
        sig = batch[0].signature
        tensors = [op.tensor if op is not None else torch.zeros(r.signature.shape, dtype=DTYPES[sig.dtype])
                   for r, op in zip(batch, mine)]  # a joined rank contributes zeros
        communicator = registered.communicator
        for t in tensors:
            scale_(t, sig.prescale)
        op = ReduceOp(sig.op)
        if op == ReduceOp.ADASUM:
            for t in tensors:
                self._adasum_(t, communicator)
        elif op == ReduceOp.PRODUCT:
            for t in tensors:
                self._mpi_reduce_(t, communicator, MPI.PROD)
        else:
            work = [t if t.dtype in MPISGD_DTYPES else t.to(torch.int64) for t in tensors]
            if len(work) == 1:
                communicator.allreduce_(work[0], MPISGD_OPS[op])
            else:
                communicator.allreduce_many_(work, MPISGD_OPS[op], check=False,
                                             bucket_bytes=max(self.fusion_threshold_bytes, 1))
            for t, w in zip(tensors, work):
                if w is not t:
                    t.copy_(w)
        postscale = after_reduction(sig)
        for t in tensors:
            scale_(t, postscale)
        return tensors

    @staticmethod
    def _mpi_reduce_(tensor: torch.Tensor, communicator: Any, mpi_op: MPI.Op) -> None:
        work = tensor.to(WIDENED.get(tensor.dtype, tensor.dtype)).contiguous()
        array = work.reshape(-1).numpy()
        if array.size:  # nonblocking, under the collective watchdog, as every collective here
            communicator.wait([communicator.mpi.Iallreduce(MPI.IN_PLACE, array, op=mpi_op)], "horovod allreduce")
        tensor.copy_(work)

    @staticmethod
    def _adasum_(tensor: torch.Tensor, communicator: Any) -> None:
        """Every rank gathers all gradients and combines them in the same binary tree, so that every
        rank ends with the same bits."""
        mine = tensor.double().reshape(-1).numpy()
        everyone = np.empty((communicator.size, mine.size))
        communicator.wait([communicator.mpi.Iallgather(mine, everyone)], "horovod adasum")
        level = list(everyone)
        while len(level) > 1:
            level = [adasum_combine(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                     for i in range(0, len(level), 2)]
        tensor.copy_(torch.from_numpy(level[0]).reshape(tensor.shape))

    # ---- everything else ------------------------------------------------------------------------
    def _run_one(self, kind: Kind, response: Response, op: Optional[Operation], registered: Any) -> Any:
        if op is None:  # joined ranks take part in allreduces only
            return None
        comm = registered.communicator.mpi
        if kind == Kind.BARRIER:
            return None  # the negotiation itself waited for every member
        if kind == Kind.BROADCAST:
            if op.tensor.numel():
                root = registered.relative_rank(response.signature.root)
                registered.communicator.wait([comm.Ibcast([as_bytes(op.tensor), MPI.BYTE], root=root)],
                                             "horovod broadcast")
            return op.tensor
        if kind == Kind.ALLGATHER:
            return self._allgather(response, op, registered, comm)
        if kind == Kind.ALLTOALL:
            return self._alltoall(response, op, registered, comm)
        if kind == Kind.REDUCESCATTER:
            return self._reducescatter(response, op, registered, comm)
        raise HorovodInternalError(f"unknown operation kind {kind}")

    @staticmethod
    def _row_bytes(sig: Signature, tensor: torch.Tensor) -> int:
        return math.prod(sig.shape) * tensor.element_size()

    def _allgather(self, response: Response, op: Operation, registered: Any, comm: MPI.Comm) -> torch.Tensor:
        sig = response.signature
        rows = [response.extras[r] for r in registered.ranks]
        out = torch.empty((sum(rows), *sig.shape), dtype=op.tensor.dtype)
        row_bytes = self._row_bytes(sig, op.tensor)
        counts = [n * row_bytes for n in rows]
        displacements = [sum(counts[:i]) for i in range(len(counts))]
        if sum(counts):
            registered.communicator.wait([comm.Iallgatherv([as_bytes(op.tensor), MPI.BYTE], [
                as_bytes(out), counts, displacements, MPI.BYTE])], "horovod allgather")
        return out

    def _alltoall(self, response: Response, op: Operation, registered: Any, comm: MPI.Comm) -> tuple:
        sig = response.signature
        me = registered.relative_rank(self.rank)
        sent = list(response.extras[self.rank])
        received = [response.extras[r][me] for r in registered.ranks]
        row_bytes = self._row_bytes(sig, op.tensor)
        out = torch.empty((sum(received), *sig.shape), dtype=op.tensor.dtype)
        send_counts = [n * row_bytes for n in sent]
        recv_counts = [n * row_bytes for n in received]
        send_displacements = [sum(send_counts[:i]) for i in range(len(sent))]
        recv_displacements = [sum(recv_counts[:i]) for i in range(len(received))]
        registered.communicator.wait([comm.Ialltoallv([as_bytes(op.tensor), send_counts, send_displacements, MPI.BYTE],
                                                      [as_bytes(out), recv_counts, recv_displacements, MPI.BYTE])],
                                     "horovod alltoall")
        return out, torch.tensor(received, dtype=torch.int32)

    def _reducescatter(self, response: Response, op: Operation, registered: Any, comm: MPI.Comm) -> torch.Tensor:
        sig = response.signature
        rows = reducescatter_rows(sig.shape[0], len(registered.ranks))
        row_elements = math.prod(sig.shape[1:])
        work = op.tensor.to(WIDENED.get(op.tensor.dtype, op.tensor.dtype)).contiguous()
        scale_(work, sig.prescale)
        me = registered.relative_rank(self.rank)
        out = torch.empty((rows[me], *sig.shape[1:]), dtype=work.dtype)
        mpi_op = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVERAGE: MPI.SUM, ReduceOp.MIN: MPI.MIN, ReduceOp.MAX: MPI.MAX,
                  ReduceOp.PRODUCT: MPI.PROD}.get(ReduceOp(sig.op))
        if mpi_op is None:
            raise HorovodInternalError(f"reducescatter does not support op {ReduceOp(sig.op).name}")
        if work.numel():
            registered.communicator.wait([comm.Ireduce_scatter(work.reshape(-1).numpy(), out.reshape(-1).numpy(),
                                                               recvcounts=[n * row_elements for n in rows], op=mpi_op)],
                                         "horovod reducescatter")
        postscale = sig.postscale / (len(registered.ranks) if sig.op == ReduceOp.AVERAGE else 1)
        scale_(out, postscale)  # in the widened dtype
        return out.to(op.tensor.dtype) if out.dtype != op.tensor.dtype else out
