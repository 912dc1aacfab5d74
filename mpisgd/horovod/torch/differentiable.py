"""The synchronous collectives, differentiable as Horovod's autograd functions are.

Gradients, as in horovod.torch 0.28: of an allreduce, the same allreduce of the gradient; of an
allgather, this rank's slice of the averaged gradient; of a broadcast, the averaged gradient on
the root and zeros elsewhere; of an alltoall, the alltoall back with the received splits; of a
reducescatter, the allgather of the gradient (times the set's size for Sum). Calls on tensors that
need no gradient skip autograd's bookkeeping.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mpisgd.horovod.torch import basics
from mpisgd.horovod.torch.basics import Average, ReduceOp, Sum
from mpisgd.horovod.torch.compression import Compression, Compressor
from mpisgd.horovod.torch.mpi_ops import (
    allgather_async,
    allreduce_async,
    allreduce_async_,
    allreduce_carry,
    alltoall_async,
    broadcast_async,
    broadcast_async_,
    grouped_allgather_async,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter_async,
    handle_average_backwards_compatibility,
    reducescatter_async,
    synchronize,
)
from mpisgd.horovod.torch.process_sets import ProcessSet, global_process_set


def _now(start: Any, *args: Any) -> Any:
    """Start an operation and wait for it on this thread, which then runs the cycles itself (the
    background thread stays out of the way: no hand-off between threads on the latency path)."""
    with basics.runtime().coordinator.driving():
        return synchronize(start(*args))


def _needs_graph(*tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class HorovodAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, name, op, prescale_factor, postscale_factor, process_set):
        ctx.args = (average, op, prescale_factor, postscale_factor, process_set)
        return _allreduce_now(tensor, average, name, op, prescale_factor, postscale_factor, process_set,
                              in_place=False)

    @staticmethod
    def backward(ctx, grad_output):
        average, op, prescale, postscale, process_set = ctx.args
        return (allreduce(grad_output, average=average, op=op, prescale_factor=prescale,
                          postscale_factor=postscale, process_set=process_set), None, None, None, None, None, None)


def allreduce(tensor: torch.Tensor, average: Any = None, name: Optional[str] = None,
              compression: type[Compressor] = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Average (default) or reduce ``tensor`` over the process set into a new tensor; differentiable.

    Args:
        tensor: the tensor to reduce (not modified).
        average: deprecated; ``op`` instead.
        name: matches the operation across ranks (auto-named when None).
        compression: ``Compression.none`` or ``Compression.fp16`` (cast for the transfer).
        op: Average, Sum, Adasum, Min, Max or Product.
        prescale_factor / postscale_factor: multiply before / after the reduction.
        process_set: the ranks taking part (global by default).
    Returns:
        The reduced tensor, bitwise identical on every rank of the set.
    """
    compressed, context = compression.compress(tensor)
    if _needs_graph(compressed):
        reduced = HorovodAllreduce.apply(compressed, average, name, op, prescale_factor, postscale_factor,
                                         process_set)
    else:
        reduced = _allreduce_now(compressed, average, name, op, prescale_factor, postscale_factor, process_set,
                                 in_place=False)
    return compression.decompress(reduced, context)


def allreduce_(tensor: torch.Tensor, average: Any = None, name: Optional[str] = None, op: Any = None,
               prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """In-place allreduce: ``tensor`` is overwritten with the result and returned (not differentiable)."""
    return _allreduce_now(tensor, average, name, op, prescale_factor, postscale_factor, process_set, in_place=True)


def _allreduce_now(tensor: torch.Tensor, average: Any, name: Optional[str], op: Any, prescale_factor: float,
                   postscale_factor: float, process_set: ProcessSet, *, in_place: bool) -> torch.Tensor:
    """A synchronous allreduce: a small one of the global set that repeats the last cycle's layout
    travels as this thread's own speculative cycle (one MPI all-reduce: a loop of small calls costs
    about MPI's own latency); any other, or one whose speculation fails, is submitted and negotiated."""
    if process_set is global_process_set and isinstance(tensor, torch.Tensor):
        coordinator = basics.runtime().coordinator
        carry = coordinator.speculation.carries.get(
            (name, op, average, prescale_factor, postscale_factor, tensor.dtype, tensor.shape))
        if carry is None:
            name, carry = allreduce_carry(tensor, average, name, op, prescale_factor, postscale_factor)
        if carry.layout is not None and tensor.is_cpu and tensor.layout == torch.strided and tensor.is_contiguous():
            out = coordinator.allreduce_alone(tensor, carry, in_place)
            if out is not None:
                return out
    return _now(allreduce_async_ if in_place else allreduce_async, tensor, average, name, op, prescale_factor,
                postscale_factor, process_set)


class HorovodGroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, average, name, op, prescale_factor, postscale_factor, process_set, *tensors):
        ctx.args = (average, op, prescale_factor, postscale_factor, process_set)
        return tuple(_now(grouped_allreduce_async, list(tensors), average, name, op, prescale_factor,
                                                         postscale_factor, process_set))

    @staticmethod
    def backward(ctx, *grad_output):
        average, op, prescale, postscale, process_set = ctx.args
        grads = grouped_allreduce(list(grad_output), average=average, op=op, prescale_factor=prescale,
                                  postscale_factor=postscale, process_set=process_set)
        return (None, None, None, None, None, None, *grads)


def grouped_allreduce(tensors: list, average: Any = None, name: Optional[str] = None,
                      compression: type[Compressor] = Compression.none, op: Any = None,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set) -> list:
    """Reduce a list of tensors together (one negotiation, fused); differentiable."""
    compressed, contexts = zip(*[compression.compress(t) for t in tensors]) if tensors else ((), ())
    if _needs_graph(*compressed):
        reduced = list(HorovodGroupedAllreduce.apply(average, name, op, prescale_factor, postscale_factor,
                                                     process_set, *compressed))
    else:
        reduced = _now(grouped_allreduce_async, list(compressed), average, name, op, prescale_factor,
                                                      postscale_factor, process_set)
    return [compression.decompress(r, c) for r, c in zip(reduced, contexts)]


def grouped_allreduce_(tensors: list, average: Any = None, name: Optional[str] = None, op: Any = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> list:
    """In-place grouped allreduce."""
    return _now(grouped_allreduce_async_, tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set)


def _my_slice(grad: torch.Tensor, rows: int, process_set: ProcessSet) -> torch.Tensor:
    """This rank's rows of a gradient of allgathered data (every rank's row count gathered first)."""
    counts = allgather(torch.tensor([rows], dtype=torch.int64), process_set=process_set).tolist()
    position = basics.runtime().process_sets.resolve(process_set).relative_rank(basics.rank())
    return grad.narrow(0, sum(counts[:position]), rows)


class HorovodAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.rows, ctx.process_set, ctx.scalar = (tensor.shape[0] if tensor.dim() else 1), process_set, tensor.dim() == 0
        return _now(allgather_async, tensor, name, process_set)

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        grad = _my_slice(reduced, ctx.rows, ctx.process_set)
        return (grad.reshape(()) if ctx.scalar else grad), None, None


def allgather(tensor: torch.Tensor, name: Optional[str] = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along the first dimension (sizes may differ); differentiable."""
    if _needs_graph(tensor):
        return HorovodAllgather.apply(tensor, name, process_set)
    return _now(allgather_async, tensor, name, process_set)


class HorovodGroupedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, process_set, *tensors):
        ctx.rows = [t.shape[0] if t.dim() else 1 for t in tensors]
        ctx.process_set = process_set
        return tuple(_now(grouped_allgather_async, list(tensors), name, process_set))

    @staticmethod
    def backward(ctx, *grad_output):
        reduced = grouped_allreduce(list(grad_output), op=Average, process_set=ctx.process_set)
        return (None, None, *[_my_slice(g, rows, ctx.process_set) for g, rows in zip(reduced, ctx.rows)])


def grouped_allgather(tensors: list, name: Optional[str] = None,
                      process_set: ProcessSet = global_process_set) -> list:
    """Allgather several tensors together; differentiable."""
    if _needs_graph(*tensors):
        return list(HorovodGroupedAllgather.apply(name, process_set, *tensors))
    return _now(grouped_allgather_async, list(tensors), name, process_set)


class HorovodBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return _now(broadcast_async, tensor, root_rank, name, process_set)

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        if basics.rank() != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Root's ``tensor`` on every rank, as a new tensor; differentiable. ``root_rank`` is a global rank."""
    if _needs_graph(tensor):
        return HorovodBroadcast.apply(tensor, root_rank, name, process_set)
    return _now(broadcast_async, tensor, root_rank, name, process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Overwrite ``tensor`` with root's values in place and return it."""
    return _now(broadcast_async_, tensor, root_rank, name, process_set)


class HorovodAlltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = _now(alltoall_async, tensor, splits, name, process_set)
        ctx.process_set, ctx.received = process_set, received
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad_output, *unused):
        grad, _ = alltoall(grad_output, splits=ctx.received, process_set=ctx.process_set)
        return grad, None, None, None


def alltoall(tensor: torch.Tensor, splits: Any = None, name: Optional[str] = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Send ``splits[i]`` rows to the i-th rank of the set; returns the received rows, and with
    ``splits`` given also the received splits (as Horovod). Differentiable."""
    if _needs_graph(tensor):
        output, received = HorovodAlltoall.apply(tensor, splits, name, process_set)
    else:
        output, received = _now(alltoall_async, tensor, splits, name, process_set)
    return output if splits is None else (output, received)


def _reducescatter_grad(grad: torch.Tensor, op: Any, process_set: ProcessSet, prescale: float,
                        postscale: float) -> torch.Tensor:
    size = len(basics.runtime().process_sets.resolve(process_set).ranks)
    factor = (size if ReduceOp(op) == Sum else 1) * prescale * postscale
    return allgather(grad * factor if factor != 1 else grad, process_set=process_set)


class HorovodReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.args = (op, process_set, prescale_factor, postscale_factor)
        return _now(reducescatter_async, tensor, name, op, process_set, prescale_factor, postscale_factor)

    @staticmethod
    def backward(ctx, grad_output):
        return _reducescatter_grad(grad_output, *ctx.args), None, None, None, None, None


def reducescatter(tensor: torch.Tensor, name: Optional[str] = None,
                  compression: type[Compressor] = Compression.none, op: Any = Average,
                  process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce (Average by default) and keep this rank's part of the first dimension; differentiable."""
    compressed, context = compression.compress(tensor)
    if _needs_graph(compressed):
        reduced = HorovodReducescatter.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    else:
        reduced = _now(reducescatter_async, compressed, name, op, process_set, prescale_factor,
                                                  postscale_factor)
    return compression.decompress(reduced, context)


class HorovodGroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, process_set, prescale_factor, postscale_factor, *tensors):
        ctx.args = (op, process_set, prescale_factor, postscale_factor)
        return tuple(_now(grouped_reducescatter_async, list(tensors), name, op, process_set,
                                                             prescale_factor, postscale_factor))

    @staticmethod
    def backward(ctx, *grad_output):
        return (None, None, None, None, None, *[_reducescatter_grad(g, *ctx.args) for g in grad_output])


def grouped_reducescatter(tensors: list, name: Optional[str] = None,
                          compression: type[Compressor] = Compression.none, op: Any = Average,
                          process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list:
    """Reducescatter several tensors together; differentiable."""
    compressed, contexts = zip(*[compression.compress(t) for t in tensors]) if tensors else ((), ())
    if _needs_graph(*compressed):
        reduced = list(HorovodGroupedReducescatter.apply(name, op, process_set, prescale_factor, postscale_factor,
                                                         *compressed))
    else:
        reduced = _now(grouped_reducescatter_async, list(compressed), name, op, process_set,
                                                          prescale_factor, postscale_factor)
    return [compression.decompress(r, c) for r, c in zip(reduced, contexts)]


__all__ = ["allgather", "allreduce", "allreduce_", "alltoall", "broadcast", "broadcast_", "grouped_allgather",
           "grouped_allreduce", "grouped_allreduce_", "grouped_reducescatter", "handle_average_backwards_compatibility",
           "reducescatter"]
