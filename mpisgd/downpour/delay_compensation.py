"""DC-ASGD's correction of stale gradients (Zheng et al. 2017, "Asynchronous Stochastic Gradient Descent
with Delay Compensation"): plain numpy, run by each worker on its gradient right before it pushes it
(see :class:`DelayCompensation` for why on the worker and not on the server)."""

from __future__ import annotations

import math

import numpy as np

from mpisgd.downpour.rules import check_positive
from mpisgd.errors import ConfigError

DC_VARIANTS = ("constant", "adaptive")

#: epsilon of the adaptive lambda's mean square (Zheng et al. 2017 use 1e-7)
DC_EPSILON = 1e-7


class DelayCompensation:
    """DC-ASGD's correction of a stale gradient (Zheng et al. 2017):

        g_dc = g + lambda * g * g * (w_now - w_pulled)

    the first-order Taylor term of g(w_now) - g(w_pulled), with the outer product g g^T as a cheap
    approximation of the Hessian, kept diagonal. ``variant="constant"`` uses lambda = lambda0;
    ``"adaptive"`` (DC-ASGD-a) uses, element-wise,

        MeanSquare_t = m * MeanSquare_{t-1} + (1 - m) * g_t^2,   lambda_t = lambda0 / sqrt(MeanSquare_t + eps)

    which scales the correction to the gradient's magnitude.

    Where it runs, and why: on the worker, with a fresh pull of w_now right before the push. Pushes of
    all workers are summed in one accumulation buffer per shard, so compensating on the server would
    need per-worker backups of w_pulled (W x shard memory) and per-worker buffers. The worker already
    holds w_pulled; one extra pull gives w_now, and the server then applies plain SGD to the
    compensated gradient. The adaptive mean square is therefore per worker (of its own gradients),
    where the paper keeps one on the server; it estimates the same second moment.

    Args:
        size: gradient length.
        lam: lambda0 >= 0 (0 turns DC-ASGD into plain ASGD).
        variant: "constant" or "adaptive".
        momentum: m of the adaptive mean square, in [0, 1).
        eps: epsilon of the adaptive variant.
    """

    def __init__(self, size: int, *, lam: float, variant: str = "constant", momentum: float = 0.95,
                 eps: float = DC_EPSILON) -> None:
        if not (isinstance(lam, (int, float, np.floating)) and math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"--dc-lambda must be a finite number >= 0, got {lam!r}")
        if variant not in DC_VARIANTS:
            raise ConfigError(f"--dc-variant must be one of {', '.join(DC_VARIANTS)}, got {variant!r}")
        if not (isinstance(momentum, (int, float, np.floating)) and 0 <= momentum < 1):
            raise ConfigError(f"--dc-momentum must be in [0, 1), got {momentum!r}")
        self.size = int(size)
        self.lam = float(lam)
        self.variant = variant
        self.momentum = float(momentum)
        self.eps = check_positive("dc eps", eps)
        self.mean_square: np.ndarray | None = (np.zeros(self.size, dtype=np.float32)
                                                  if variant == "adaptive" else None)

    def compensate(self, grads: np.ndarray, w_now: np.ndarray, w_pulled: np.ndarray,
                   out: np.ndarray | None = None) -> np.ndarray:
        """The compensated gradient (into ``out`` when given; ``grads`` itself is left unchanged).

        The adaptive variant folds ``grads`` into its mean square first, as the paper's update does.
        """
        for name, array in (("grads", grads), ("w_now", w_now), ("w_pulled", w_pulled)):
            if array.shape != (self.size,):
                raise ConfigError(f"delay compensation: {name} has shape {array.shape}, "
                                  f"expected ({self.size},)")
        squared = np.multiply(grads, grads)
        if self.mean_square is not None:
            self.mean_square *= np.float32(self.momentum)
            self.mean_square += np.float32(1 - self.momentum) * squared
            lam = np.float32(self.lam) / np.sqrt(self.mean_square + np.float32(self.eps))
        else:
            lam = np.float32(self.lam)
        squared *= lam
        squared *= np.subtract(w_now, w_pulled)
        if out is None:
            return np.add(grads, squared)
        np.add(grads, squared, out=out)
        return out
