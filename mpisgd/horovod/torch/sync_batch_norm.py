"""SyncBatchNorm: batch normalization with statistics of the global batch (every rank's samples).

Forward sums per channel count, sum and sum of squares over all ranks in one allreduce; backward
sums the two per-channel gradient terms in a second one, so the input gradient equals that of one
BatchNorm over the concatenated batch. Weight and bias gradients stay local sums, as in torch's and
Horovod's SyncBatchNorm (DistributedOptimizer averages them like any gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mpisgd.horovod.torch import basics
from mpisgd.horovod.torch.basics import Sum
from mpisgd.horovod.torch.mpi_ops import allreduce_async_, synchronize


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return synchronize(allreduce_async_(tensor, op=Sum))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, training):
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        if training:
            local = x.detach().double()
            stats = torch.cat([torch.tensor([float(x.numel() // channels)], dtype=torch.float64),
                               local.sum(dims), (local * local).sum(dims)])
            stats = _sum_over_ranks(stats)
            count, total, squares = stats[0], stats[1:channels + 1], stats[channels + 1:]
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            if running_mean is not None:
                unbiased = var * count / max(float(count) - 1, 1.0)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
            mean, var = mean.to(x.dtype), var.to(x.dtype)
        else:
            mean, var, count = running_mean, running_var, torch.tensor(1.0)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
        out = xhat * weight.reshape(shape) + bias.reshape(shape) if weight is not None else xhat
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.dims, ctx.shape, ctx.training = float(count), dims, shape, training
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        grad_weight = (grad_out * xhat).sum(dims) if weight is not None else None
        grad_bias = grad_out.sum(dims) if weight is not None else None
        scale = invstd * (weight if weight is not None else 1)
        if not ctx.training:
            return grad_out * scale.reshape(shape), grad_weight, grad_bias, None, None, None, None, None
        local = torch.cat([grad_out.sum(dims), (grad_out * xhat).sum(dims)]).double()
        sums = _sum_over_ranks(local).to(grad_out.dtype)
        channels = xhat.shape[1]
        sum_dy, sum_dy_xhat = sums[:channels].reshape(shape), sums[channels:].reshape(shape)
        grad_in = (grad_out - sum_dy / ctx.count - xhat * sum_dy_xhat / ctx.count) * scale.reshape(shape)
        return grad_in, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d/2d/3d`` whose training statistics span every Horovod rank.

    Args: as torch's BatchNorm (``num_features``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``). Every rank must call it together in training mode.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> Any:
        self._check_input_dim(input)
        if not self.training or basics.size() == 1:
            return super().forward(input)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.1 if self.momentum is None else self.momentum
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                                            self.eps, momentum, True)
