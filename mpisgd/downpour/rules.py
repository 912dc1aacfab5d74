"""Update rules of the parameter server (sgd, adagrad) and DC-ASGD's delay compensation: plain numpy.

No MPI here: a server shard calls ``rule.apply(params, grads, where)`` on one chunk of its shard at a time
(it polls MPI between chunks, so that workers on transports without hardware RMA keep progressing), and a
DC-ASGD worker calls ``compensation.compensate(...)`` on its gradient before pushing it. Every rule keeps
its per-parameter state for the whole shard, indexed by the same ``where`` slice as the chunk.

``grads`` is the server's private copy of what the workers pushed (the sum of every push since the last
update): rules may overwrite it, which saves an allocation per chunk.
"""

from __future__ import annotations

import math

import numpy as np

from mpisgd.errors import ConfigError

RULES = ("sgd", "adagrad")
DC_VARIANTS = ("constant", "adaptive")

#: epsilon of the adaptive lambda's mean square (Zheng et al. 2017 use 1e-7)
DC_EPSILON = 1e-7


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class UpdateRule:
    """A server update rule on one shard of ``size`` parameters.

    Args:
        size: elements of the shard.
        lr: learning rate.
    """

    name = "rule"
    #: names of the per-parameter state arrays (each of the shard's size, float32)
    state_names: tuple = ()

    def __init__(self, size: int, *, lr: float) -> None:
        if not (isinstance(size, (int, np.integer)) and size >= 0):
            raise ConfigError(f"shard size must be an int >= 0, got {size!r}")
        self.size = int(size)
        self.lr = _check_positive("lr", lr)
        self.state: dict = {name: np.zeros(self.size, dtype=np.float32) for name in self.state_names}

    def apply(self, params: np.ndarray, grads: np.ndarray, where: slice) -> None:
        """Update ``params`` (the chunk ``where`` of the shard) in place from ``grads`` (same chunk)."""
        raise NotImplementedError


class SGDRule(UpdateRule):
    """w <- w - lr * g (asynchronous SGD, and the server side of DC-ASGD)."""

    name = "sgd"

    def apply(self, params: np.ndarray, grads: np.ndarray, where: slice) -> None:
        grads *= np.float32(self.lr)
        params -= grads


class AdagradRule(UpdateRule):
    """Adagrad (Duchi et al.), as Downpour's servers use it (Dean et al. 2012, section 4.1):
    G <- G + g*g;  w <- w - lr * g / (sqrt(G) + eps), a learning rate per parameter that falls where
    gradients have been large, which makes many stale replicas stable. G lives on the shard."""

    name = "adagrad"
    state_names = ("sum_of_squares",)

    def __init__(self, size: int, *, lr: float, eps: float = 1e-8) -> None:
        super().__init__(size, lr=lr)
        self.eps = _check_positive("adagrad eps", eps)

    def apply(self, params: np.ndarray, grads: np.ndarray, where: slice) -> None:
        squares = self.state["sum_of_squares"][where]
        squares += grads * grads
        denominator = np.sqrt(squares)
        denominator += np.float32(self.eps)
        grads *= np.float32(self.lr)
        grads /= denominator
        params -= grads


def make_rule(name: str, size: int, *, lr: float, eps: float = 1e-8) -> UpdateRule:
    """The server rule called ``name`` ("sgd" or "adagrad") for a shard of ``size`` elements."""
    if name == "sgd":
        return SGDRule(size, lr=lr)
    if name == "adagrad":
        return AdagradRule(size, lr=lr, eps=eps)
    raise ConfigError(f"unknown server rule {name!r}; valid: {', '.join(RULES)}")


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
        self.eps = _check_positive("dc eps", eps)
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
