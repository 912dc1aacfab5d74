"""Horovod's asynchronous collectives on torch tensors: ``x_async`` / ``x_async_``, handles, poll, synchronize.

Each call validates its arguments on the calling rank, snapshots its input (a contiguous host copy,
except the in-place ``_`` forms, which reduce the caller's tensor itself), and queues one
:class:`~mpisgd.horovod.torch.executor.Operation` per tensor with the coordinator. Unnamed
operations are named ``<kind>.noname.<n>`` from a per-process counter, as Horovod names them, so
ranks that submit the same sequence match. The differentiable, synchronous forms are in
``differentiable.py``.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from typing import Any, Callable, Optional

import torch

from mpisgd.arrays import dtype_name
from mpisgd.horovod.torch import basics
from mpisgd.horovod.torch.basics import Adasum, Average, HorovodInternalError, ReduceOp, Sum
from mpisgd.horovod.torch.executor import DTYPES, Operation
from mpisgd.horovod.torch.negotiation import AUTO_NAME_MARK, Kind, Signature
from mpisgd.horovod.torch.process_sets import ProcessSet, global_process_set

_handles: dict = {}
_handle_ids = itertools.count(1)
_auto_names: dict = {}  # process set id -> counter: sets a rank is not in do not shift its names
_handles_lock = threading.Lock()


def handle_average_backwards_compatibility(op: Any, average: Any) -> ReduceOp:
    """``average=`` is Horovod's deprecated spelling of ``op``; giving both is an error."""
    if op is not None:
        if average is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of them.")
        return ReduceOp(op)
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in v1.0",
                      DeprecationWarning, stacklevel=3)
        return Average if average else Sum
    return Average


def _check_tensor(tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if dtype_name(tensor) not in DTYPES:
        raise ValueError(f"Tensor type {tensor.type()} is not supported.")
    if tensor.is_sparse:
        raise ValueError("sparse tensors go through sparse_allreduce_async (or DistributedOptimizer)")


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy the caller may overwrite meanwhile, as Horovod's inputs are not modified."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _in_place_work(tensor: torch.Tensor) -> tuple:
    """The buffer an in-place operation works on, and how its result reaches ``tensor``."""
    if not tensor.is_contiguous():
        raise ValueError("Tensor is required to be contiguous.")
    if tensor.device.type == "cpu":
        return tensor.data, lambda result: tensor
    work = tensor.detach().cpu()

    def copy_back(result: torch.Tensor) -> torch.Tensor:
        tensor.data.copy_(result)
        return tensor
    return work, copy_back


def _to_device(device: torch.device) -> Callable[[Any], Any]:
    if device.type == "cpu":
        return lambda result: result
    return lambda result: result.to(device)


def _name(name: Optional[str], kind: str, registered: Any) -> str:
    if name is not None:
        return str(name)
    counter = _auto_names.setdefault(registered.process_set_id, itertools.count())
    return f"{kind}{AUTO_NAME_MARK}{next(counter)}"


def _registered(process_set: Any) -> Any:
    registered = basics.runtime().process_sets.resolve(process_set)
    if basics.rank() not in registered.ranks:
        raise ValueError(f"rank {basics.rank()} is not a member of {process_set}")
    return registered


def signature(kind: Kind, tensor: torch.Tensor, registered: Any, *, shape: Optional[tuple] = None, op: int = -1,
              root: int = -1, prescale: float = 1.0, postscale: float = 1.0) -> Signature:
    """What every rank must agree on for an operation of ``kind`` on ``tensor``."""
    return Signature(kind, dtype_name(tensor), tuple(tensor.shape) if shape is None else shape,
                     int(op), int(root), float(prescale), float(postscale), registered.process_set_id,
                     registered.ranks)


def _operation(kind: Kind, name: str, tensor: torch.Tensor, registered: Any, *, shape: Optional[tuple] = None,
               op: int = -1, root: int = -1, prescale: float = 1.0, postscale: float = 1.0, extra: Any = None,
               finish: Optional[Callable[[Any], Any]] = None) -> Operation:
    return Operation(name, signature(kind, tensor, registered, shape=shape, op=op, root=root, prescale=prescale,
                                     postscale=postscale), extra, tensor, finish)


def _register(operations: list, combine: Callable[[list], Any]) -> int:
    basics.runtime().coordinator.submit(operations)
    with _handles_lock:
        handle = next(_handle_ids)
        _handles[handle] = (operations, combine)
    return handle


def _single(results: list) -> Any:
    return results[0]


# ---- allreduce ------------------------------------------------------------------------------
def _check_reduction(op: ReduceOp, process_set: Any) -> None:
    if op == Adasum:
        if process_set is not global_process_set and process_set.process_set_id != 0:
            raise NotImplementedError("Adasum does not support non-global process sets yet.")
        size = basics.size()
        if size & (size - 1):
            raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")


def _allreduce_operations(tensors: list, name: Optional[str], op: ReduceOp, prescale: float, postscale: float,
                          process_set: Any, *, in_place: bool, kind: str) -> list:
    _check_reduction(op, process_set)
    registered = _registered(process_set)
    base = _name(name, kind, registered)
    operations = []
    for i, tensor in enumerate(tensors):
        _check_tensor(tensor)
        if in_place:
            work, finish = _in_place_work(tensor)
        else:
            work, finish = _snapshot(tensor), _to_device(tensor.device)
        operations.append(_operation(Kind.ALLREDUCE, base if len(tensors) == 1 and kind == "allreduce"
                                     else f"{base}.{i}", work, registered, op=op, prescale=prescale,
                                     postscale=postscale, finish=finish))
    return operations


def allreduce_carry(tensor: torch.Tensor, average: Any, name: Optional[str], op: Any, prescale: float,
                    postscale: float) -> tuple:
    """(name, speculation Carry) of a single allreduce over the global set: checked and named as
    :func:`allreduce_async` does it; kept for later calls with the same arguments when named."""
    reduce_op = handle_average_backwards_compatibility(op, average)
    _check_reduction(reduce_op, global_process_set)
    registered = _registered(global_process_set)
    given = name
    name = _name(name, "allreduce", registered)  # before the tensor's check, as allreduce_async: counters in step
    _check_tensor(tensor)
    speculation = basics.runtime().coordinator.speculation
    carry = speculation.carry_of(name, signature(Kind.ALLREDUCE, tensor, registered, op=reduce_op, prescale=prescale,
                                                 postscale=postscale))
    if given is not None:
        speculation.remember((given, op, average, prescale, postscale, tensor.dtype, tensor.shape), carry)
    return name, carry


def allreduce_async(tensor: torch.Tensor, average: Any = None, name: Optional[str] = None, op: Any = None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start averaging (default) or otherwise reducing ``tensor`` over the process set; returns a handle
    for :func:`poll`/:func:`synchronize`, which returns a new tensor. The input is not modified."""
    reduce_op = handle_average_backwards_compatibility(op, average)
    return _register(_allreduce_operations([tensor], name, reduce_op, prescale_factor, postscale_factor,
                                           process_set, in_place=False, kind="allreduce"), _single)


def allreduce_async_(tensor: torch.Tensor, average: Any = None, name: Optional[str] = None, op: Any = None,
                     prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """In-place :func:`allreduce_async`: ``synchronize`` returns ``tensor``, overwritten with the result."""
    reduce_op = handle_average_backwards_compatibility(op, average)
    return _register(_allreduce_operations([tensor], name, reduce_op, prescale_factor, postscale_factor,
                                           process_set, in_place=True, kind="allreduce"), _single)


def grouped_allreduce_async(tensors: list, average: Any = None, name: Optional[str] = None, op: Any = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start reducing a list of tensors together (negotiated in one cycle, fused); ``synchronize`` returns
    the list of results."""
    reduce_op = handle_average_backwards_compatibility(op, average)
    return _register(_allreduce_operations(list(tensors), name, reduce_op, prescale_factor, postscale_factor,
                                           process_set, in_place=False, kind="grouped_allreduce"), list)


def grouped_allreduce_async_(tensors: list, average: Any = None, name: Optional[str] = None, op: Any = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    """In-place :func:`grouped_allreduce_async`."""
    reduce_op = handle_average_backwards_compatibility(op, average)
    return _register(_allreduce_operations(list(tensors), name, reduce_op, prescale_factor, postscale_factor,
                                           process_set, in_place=True, kind="grouped_allreduce"), list)


def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: Any,
                           process_set: ProcessSet = global_process_set) -> Callable[[], torch.Tensor]:
    """Reduce a sparse COO tensor by gathering every rank's indices and values (Horovod's method);
    returns a callable that waits and returns the (uncoalesced) sparse sum or average."""
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices = allgather_async(t.indices().transpose(0, 1).contiguous(), name=f"{name}.indices",
                              process_set=process_set)
    values = allgather_async(t.values(), name=f"{name}.values", process_set=process_set)
    set_size = basics.runtime().process_sets.resolve(process_set).ranks

    def wait() -> torch.Tensor:
        gathered_values = synchronize(values)
        gathered_indices = synchronize(indices)
        if ReduceOp(op) == Average:
            gathered_values = gathered_values / len(set_size)
        return torch.sparse_coo_tensor(gathered_indices.transpose(0, 1), gathered_values, t.size(),
                                       check_invariants=False)
    return wait


# ---- allgather, broadcast, alltoall, reducescatter -------------------------------------------------
def _allgather_operations(tensors: list, name: Optional[str], process_set: Any, kind: str) -> list:
    registered = _registered(process_set)
    base = _name(name, kind, registered)
    operations = []
    for i, tensor in enumerate(tensors):
        _check_tensor(tensor)
        work = _snapshot(tensor)
        if work.dim() == 0:
            work = work.reshape(1)
        operations.append(_operation(Kind.ALLGATHER, base if kind == "allgather" else f"{base}.{i}", work,
                                     registered, shape=tuple(work.shape[1:]), extra=int(work.shape[0]),
                                     finish=_to_device(tensor.device)))
    return operations


def allgather_async(tensor: torch.Tensor, name: Optional[str] = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start concatenating every rank's ``tensor`` along the first dimension (which may differ per rank)."""
    return _register(_allgather_operations([tensor], name, process_set, "allgather"), _single)


def grouped_allgather_async(tensors: list, name: Optional[str] = None,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start allgathers of several tensors together; ``synchronize`` returns the list of results."""
    return _register(_allgather_operations(list(tensors), name, process_set, "grouped_allgather"), list)


def _broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str], process_set: Any, in_place: bool) -> int:
    registered = _registered(process_set)
    _check_tensor(tensor)
    if root_rank not in registered.ranks:
        raise ValueError(f"root_rank {root_rank} is not in {process_set} (roots are global ranks)")
    if in_place:
        work, finish = _in_place_work(tensor)
    else:
        work, finish = _snapshot(tensor), _to_device(tensor.device)
    operation = _operation(Kind.BROADCAST, _name(name, "broadcast", registered), work, registered, root=root_rank, finish=finish)
    return _register([operation], _single)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start broadcasting root's ``tensor`` (``root_rank`` is a global rank); the input is not modified."""
    return _broadcast(tensor, root_rank, name, process_set, in_place=False)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
                     process_set: ProcessSet = global_process_set) -> int:
    """In-place :func:`broadcast_async`: ``tensor`` is overwritten with root's values."""
    return _broadcast(tensor, root_rank, name, process_set, in_place=True)


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: Optional[str] = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Start sending ``splits[i]`` first-dimension slices to the set's i-th rank (equal parts when None);
    ``synchronize`` returns ``(received tensor, received splits)``."""
    registered = _registered(process_set)
    _check_tensor(tensor)
    work = _snapshot(tensor)
    if work.dim() == 0:
        raise ValueError("alltoall needs a tensor of at least one dimension")
    n, rows = len(registered.ranks), int(work.shape[0])
    if splits is None:
        if rows % n:
            raise ValueError(f"alltoall without splits needs a first dimension divisible by the process set "
                             f"size {n}, got {rows}")
        split_list = [rows // n] * n
    else:
        split_list = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
        if len(split_list) != n or any(s < 0 for s in split_list) or sum(split_list) != rows:
            raise ValueError(f"alltoall splits must be {n} non-negative numbers summing to the first dimension "
                             f"{rows}, got {split_list}")
    to_device = _to_device(tensor.device)
    operation = _operation(Kind.ALLTOALL, _name(name, "alltoall", registered), work, registered, shape=tuple(work.shape[1:]),
                           extra=tuple(split_list), finish=lambda r: (to_device(r[0]), r[1]))
    return _register([operation], _single)


def _reducescatter_operations(tensors: list, name: Optional[str], op: Any, process_set: Any, prescale: float,
                              postscale: float, kind: str) -> list:
    registered = _registered(process_set)
    reduce_op = ReduceOp(op)
    if reduce_op == Adasum:
        raise NotImplementedError("reducescatter does not support Adasum")
    base = _name(name, kind, registered)
    operations = []
    for i, tensor in enumerate(tensors):
        _check_tensor(tensor)
        if tensor.dim() == 0:
            raise ValueError("reducescatter needs a tensor of at least one dimension")
        operations.append(_operation(Kind.REDUCESCATTER, base if kind == "reducescatter" else f"{base}.{i}",
                                     _snapshot(tensor), registered, op=reduce_op, prescale=prescale,
                                     postscale=postscale, finish=_to_device(tensor.device)))
    return operations


def reducescatter_async(tensor: torch.Tensor, name: Optional[str] = None, op: Any = Average,
                        process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    """Start reducing ``tensor`` and giving each rank its part of the first dimension (the first
    ``rows % size`` ranks one row more)."""
    return _register(_reducescatter_operations([tensor], name, op, process_set, prescale_factor,
                                               postscale_factor, "reducescatter"), _single)


def grouped_reducescatter_async(tensors: list, name: Optional[str] = None, op: Any = Average,
                                process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    """Start reducescatters of several tensors together; ``synchronize`` returns the list of results."""
    return _register(_reducescatter_operations(list(tensors), name, op, process_set, prescale_factor,
                                               postscale_factor, "grouped_reducescatter"), list)


# ---- completion --------------------------------------------------------------------------------
def poll(handle: int) -> bool:
    """True once the operation of ``handle`` completed (then ``synchronize`` does not wait)."""
    with _handles_lock:
        entry = _handles.get(handle)
    if entry is None:
        raise ValueError(f"unknown handle {handle!r}")
    return all(op.done for op in entry[0])


def synchronize(handle: Any) -> Any:
    """Wait for ``handle``'s operation and return its result; HorovodInternalError if it failed."""
    if callable(handle):
        return handle()
    with _handles_lock:
        entry = _handles.get(handle)
    if entry is None:
        return None
    operations, combine = entry
    try:
        if not all(op.done for op in operations):
            basics.runtime().coordinator.wait(operations)
    finally:
        if all(op.done for op in operations):
            with _handles_lock:
                _handles.pop(handle, None)
    errors = [op.error for op in operations if op.error is not None]
    if errors:
        raise errors[0] if isinstance(errors[0], HorovodInternalError) else HorovodInternalError(str(errors[0]))
    return combine([op.result for op in operations])


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Wait until every rank of the process set reached its barrier."""
    registered = _registered(process_set)
    operation = _operation(Kind.BARRIER, _name(None, "barrier", registered), torch.empty(0), registered)
    synchronize(_register([operation], _single))


def join(device: int = -1) -> int:
    """This rank has no more data: until every rank joined, it takes part in the others' allreduces with
    zeros. Blocks until all joined; returns the rank that joined last."""
    coordinator = basics.runtime().coordinator
    operation = Operation("join", Signature(Kind.BARRIER, "int32", (), -1, -1, 1.0, 1.0, 0, ()), None,
                          torch.empty(0))
    coordinator.join(operation)
    coordinator.wait([operation])
    if operation.error is not None:
        raise operation.error
    return int(operation.result)

