"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks").

Why: with very large global batches a single learning rate is too large for some layers and too small
for others, and plain SGD diverges early in training. LARS gives each parameter tensor ("layer") its own
local learning rate from the ratio of its weight norm to its gradient norm. Biases and normalization
parameters are usually excluded from the trust ratio (and from weight decay); `split_decay_groups` builds
those parameter groups.

This module knows nothing about MPI: gradients arrive already averaged across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Union

import torch
from torch import nn

from mpisgd.errors import ConfigError

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]

# Parameters of these modules are scale/shift vectors: a trust ratio and weight decay on them hurt.
_NORMALIZATION_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def trust_ratio(
    weight_norm: torch.Tensor,
    grad_norm: torch.Tensor,
    *,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
) -> torch.Tensor:
    """The LARS local learning rate of one tensor.

    Args:
        weight_norm: ||w||_2 of the tensor (0-d tensor).
        grad_norm: ||g||_2 of its gradient (0-d tensor).
        trust_coefficient: eta in You et al.
        weight_decay: beta in You et al.
        eps: keeps the division finite.

    Returns:
        trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps), or 1 when either norm is 0
        (a freshly zero-initialised tensor, or one that got no gradient), as a 0-d tensor. Computed
        without `.item()` so that a GPU step does not synchronize with the host.
    """
    ratio = trust_coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    both_nonzero = (weight_norm > 0) & (grad_norm > 0)
    return torch.where(both_nonzero, ratio, torch.ones_like(ratio))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, in the update form of You et al. (Algorithm 1)::

        d = g + weight_decay * w
        local_lr = trust_ratio(||w||, ||g||)          # 1 for excluded parameters
        v = momentum * v + lr * local_lr * d
        w = w - v

    The learning rate sits *inside* the momentum buffer (unlike `torch.optim.SGD`, whose buffer holds
    `momentum * v + d` and multiplies by lr afterwards). With a constant lr both forms give the same
    trajectory; when lr changes, this form needs Goyal et al.'s momentum correction, see
    `mpisgd.sync.schedule.momentum_correction` (which recognises this optimizer through
    `LARS.lr_in_momentum_buffer`).

    Parameter groups may set ``lars_exclude=True`` (no trust ratio: plain momentum SGD) and their own
    ``weight_decay``; `split_decay_groups` builds such groups for biases and normalization layers.

    Args:
        params: parameters or parameter groups.
        lr: global learning rate (gamma in You et al.); > 0.
        momentum: in [0, 1).
        weight_decay: L2 coefficient (beta), >= 0.
        trust_coefficient: eta, > 0 (You et al. use 0.001).
        eps: added to the trust ratio denominator, >= 0.
        exclude: optional predicate ``exclude(param) -> bool``; parameters for which it returns True get
            no trust ratio even when their group does not set ``lars_exclude`` (for example
            ``lambda p: p.ndim <= 1``).
    """

    #: Tells `momentum_correction` that buffers hold lr * update and must be rescaled when lr changes.
    lr_in_momentum_buffer = True

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        exclude: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        if not lr > 0.0:
            raise ConfigError(f"LARS: lr must be > 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"LARS: momentum must be in [0, 1), got {momentum!r}")
        if not weight_decay >= 0.0:
            raise ConfigError(f"LARS: weight_decay must be >= 0, got {weight_decay!r}")
        if not trust_coefficient > 0.0:
            raise ConfigError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient!r}")
        if not eps >= 0.0:
            raise ConfigError(f"LARS: eps must be >= 0, got {eps!r}")
        if exclude is not None and not callable(exclude):
            raise TypeError(f"LARS: exclude must be a callable param -> bool or None, got {exclude!r}")
        self.exclude = exclude
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    def _is_excluded(self, group: dict[str, Any], param: torch.Tensor) -> bool:
        return bool(group["lars_exclude"]) or (self.exclude is not None and bool(self.exclude(param)))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one LARS update to every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            momentum = group["momentum"]
            weight_decay = group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                update = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad.clone()
                if self._is_excluded(group, param):
                    update.mul_(lr)
                else:
                    local_lr = trust_ratio(
                        torch.linalg.vector_norm(param),
                        torch.linalg.vector_norm(grad),
                        trust_coefficient=group["trust_coefficient"],
                        weight_decay=weight_decay,
                        eps=group["eps"],
                    )
                    update.mul_(local_lr * lr)
                if momentum != 0:
                    state = self.state[param]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = update
                    else:
                        buffer.mul_(momentum).add_(update)
                    update = buffer
                param.sub_(update)
        return loss


def is_no_decay_parameter(module: nn.Module, param: torch.Tensor) -> bool:
    """True for biases and normalization-layer parameters: the ones that get no weight decay or trust
    ratio in Goyal et al. / You et al. recipes (every tensor with at most one dimension, plus every
    parameter of a normalization module, whatever its shape)."""
    return param.ndim <= 1 or isinstance(module, _NORMALIZATION_MODULES)


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups for `LARS` or `torch.optim.SGD`: weight decay on weights, none on the rest.

    Args:
        model: the model; only parameters with ``requires_grad`` are included, each once.
        weight_decay: the decay of the decayed group.

    Returns:
        Up to two groups, empty ones left out, in this order:
        ``{"params": weights, "weight_decay": weight_decay}`` and
        ``{"params": biases_and_norms, "weight_decay": 0.0, "lars_exclude": True}``.
        (`torch.optim.SGD` ignores the extra ``lars_exclude`` key.)
    """
    if not weight_decay >= 0.0:
        raise ConfigError(f"split_decay_groups: weight_decay must be >= 0, got {weight_decay!r}")
    decayed: list[torch.Tensor] = []
    not_decayed: list[torch.Tensor] = []
    seen: set = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (not_decayed if is_no_decay_parameter(module, param) else decayed).append(param)
    groups: list[dict[str, Any]] = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay})
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0, "lars_exclude": True})
    return groups
