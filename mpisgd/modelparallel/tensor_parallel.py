"""Splits within layers (DistBelief's partitions inside a layer): each ``nn.Linear`` of a stage over T ranks.

Split t keeps output features ``[lo_t, hi_t)`` of the weight and bias. Forward: every split computes its
slice of the output from the full input, and an all-gather among the T ranks assembles the full output,
so every layer after it (activations, norms, the next stage) runs replicated and unchanged. Backward: the
gradient of the gathered output is the same on every split, so each keeps its slice (no message); the
input's gradient is a partial sum over the splits and is all-reduced among them.

Bytes per Linear of input width n, output width m, on B rows, per rank: forward all-gather receives
B*m*(T-1)/T values, backward all-reduce moves about 2*B*n*(T-1)/T. The alternative (Megatron-LM: the next
Linear split by *input* features, its partial outputs all-reduced) moves, for a pair n -> h -> m, about
2*B*m*(T-1)/T forward and 2*B*n*(T-1)/T backward instead of B*(h+m)*(T-1)/T and 2*B*(n+h)*(T-1)/T: fewer
bytes whenever the hidden width h is not small (``benchmarks/model_parallel.py`` prints both counts), at
the price of layer pairing rules; the all-gather here splits any sequence of Linear layers.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpisgd.comm import block_bounds
from mpisgd.modelparallel.transport import Waiter


class SplitGroup:
    """The T ranks holding the splits of one stage: all-gather and all-reduce with deadlines, byte counts."""

    def __init__(self, comm: MPI.Comm, waiter: Waiter, world_ranks: Optional[list] = None) -> None:
        self.comm, self.waiter = comm, waiter
        self.split, self.splits = comm.Get_rank(), comm.Get_size()
        named = world_ranks or list(range(self.splits))
        self.others = [rank for split, rank in enumerate(named) if split != self.split]  # named when waits stall
        self.bytes_received = 0

    def allgather_last_dim(self, local: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Concatenate every split's ``local`` (widths[t] features in the last dimension) along it."""
        lead = local.shape[:-1]
        rows = int(np.prod(lead)) if lead else 1
        local = local.detach().contiguous()
        gathered = torch.empty(rows * sum(widths), dtype=local.dtype)
        counts = [rows * w for w in widths]
        displacements = [int(d) for d in np.cumsum([0] + counts[:-1])]
        request = self.comm.Iallgatherv(local.reshape(-1).numpy(), [gathered.numpy(), (counts, displacements)])
        self.waiter.requests([request], what=f"the all-gather of split {self.split}'s Linear outputs",
                             peers=self.others)
        self.bytes_received += (gathered.numel() - local.numel()) * local.element_size()
        pieces = torch.split(gathered, counts)
        return torch.cat([piece.reshape(*lead, w) for piece, w in zip(pieces, widths)], dim=-1)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the splits of ``tensor`` (a new tensor)."""
        result = tensor.detach().contiguous().clone()
        request = self.comm.Iallreduce(MPI.IN_PLACE, result.reshape(-1).numpy(), op=MPI.SUM)
        self.waiter.requests([request], what="the all-reduce of a split Linear's input gradient",
                             peers=self.others)
        self.bytes_received += result.numel() * result.element_size()
        return result


class _CopyToSplits(torch.autograd.Function):
    """Identity forward; the input gradient summed over the splits backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: SplitGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return ctx.group.allreduce_sum(grad), None


class _GatherFromSplits(torch.autograd.Function):
    """All-gather of the output slices forward; this split's slice of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: SplitGroup, widths: list[int]) -> torch.Tensor:
        ctx.lo = sum(widths[:group.split])
        ctx.hi = ctx.lo + widths[group.split]
        return group.allgather_last_dim(local, widths)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad[..., ctx.lo:ctx.hi].contiguous(), None, None


class ColumnParallelLinear(nn.Module):
    """Split ``split`` of ``linear`` by output features; its output is the full Linear's (gathered).

    Args:
        linear: the unsplit layer (its weights are copied, sliced).
        group: the splits of this stage.

    ``weight`` and ``bias`` have the global names of the unsplit layer and hold rows ``[lo, hi)``.
    """

    def __init__(self, linear: nn.Linear, group: SplitGroup) -> None:
        super().__init__()
        self.group = group
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bounds = block_bounds(linear.out_features, group.splits)
        self.widths = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        self.lo, self.hi = bounds[group.split], bounds[group.split + 1]
        self.weight = nn.Parameter(linear.weight.detach()[self.lo:self.hi].clone())
        self.bias: Optional[nn.Parameter] = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach()[self.lo:self.hi].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _CopyToSplits.apply(x, self.group)
        return _GatherFromSplits.apply(F.linear(x, self.weight, self.bias), self.group, self.widths)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"split {self.group.split} of {self.group.splits}: rows [{self.lo}, {self.hi})")


def split_linears(layers: nn.Module, group: Optional[SplitGroup]) -> None:
    """Replace every top-level ``nn.Linear`` child of ``layers`` by its :class:`ColumnParallelLinear` split."""
    if group is None or group.splits == 1:
        return
    for name, child in list(layers.named_children()):
        if isinstance(child, nn.Linear):
            setattr(layers, name, ColumnParallelLinear(child, group))
