"""Helpers for starting training alike on every rank: parameters, optimizer state, arbitrary objects."""

from __future__ import annotations

import io
import pickle
from typing import Any, Optional

import torch

from mpisgd.horovod.torch import basics
from mpisgd.horovod.torch.differentiable import allgather, broadcast_
from mpisgd.horovod.torch.mpi_ops import broadcast_async_, synchronize
from mpisgd.horovod.torch.process_sets import ProcessSet, global_process_set


def broadcast_parameters(params: Any, root_rank: int, process_set: ProcessSet = global_process_set) -> None:
    """Overwrite, in place, parameters (a ``state_dict``, or ``named_parameters()`` pairs) with root's."""
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list) or hasattr(params, "__iter__"):
        items = [(name, p) for name, p in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    handles = []
    for name, p in items:
        if isinstance(p, torch.Tensor):
            tensor = p.data if isinstance(p, torch.nn.Parameter) else p
            handles.append(broadcast_async_(tensor, root_rank, name=f"broadcast_parameters.{name}",
                                            process_set=process_set))
    for handle in handles:
        synchronize(handle)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, model: Any = None,
                              process_set: ProcessSet = global_process_set) -> None:
    """Make every rank's optimizer state and hyperparameters (with their Python types) equal to root's.

    The root's ``state_dict`` travels whole (pickled): momentum buffers, step counts, learning rates
    and every other per-group option keep root's values and types, and ranks whose state is still
    empty (no step yet) receive root's state rather than an initialized one.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    state = broadcast_object(optimizer.state_dict() if basics.rank() == root_rank else None, root_rank,
                             name="broadcast_optimizer_state", process_set=process_set)
    if basics.rank() != root_rank:
        optimizer.load_state_dict(state)


def _to_bytes(obj: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)


def _part(name: Optional[str], part: str) -> Optional[str]:
    """Unnamed object transfers are auto-named like any collective: Horovod's default, the object's type
    name, differs between a root passing an object and the others passing None, and would never match."""
    return None if name is None else f"{name}.{part}"


def broadcast_object(obj: Any, root_rank: int = 0, name: Optional[str] = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Root's ``obj`` (anything picklable, tensors included) on every rank of the set."""
    payload = _to_bytes(obj) if basics.rank() == root_rank else torch.empty(0, dtype=torch.uint8)
    length = broadcast_(torch.tensor([payload.numel()], dtype=torch.int64), root_rank, name=_part(name, "size"),
                        process_set=process_set)
    if basics.rank() != root_rank:
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
    broadcast_(payload, root_rank, name=_part(name, "data"), process_set=process_set)
    return obj if basics.rank() == root_rank else _from_bytes(payload)


def allgather_object(obj: Any, name: Optional[str] = None, process_set: ProcessSet = global_process_set) -> list:
    """Every rank's ``obj``, in rank order of the set."""
    payload = _to_bytes(obj)
    sizes = allgather(torch.tensor([payload.numel()], dtype=torch.int64), name=_part(name, "sizes"),
                      process_set=process_set).tolist()
    gathered = allgather(payload, name=_part(name, "data"), process_set=process_set)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [_from_bytes(gathered[o:o + n]) for o, n in zip(offsets, sizes)]
