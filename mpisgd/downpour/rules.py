"""Update rules of the parameter server (sgd, adagrad): plain numpy.

No MPI here: a server shard calls ``rule.apply(params, grads, where)`` on one chunk of its shard at a time
(it polls MPI between chunks, so that workers on transports without hardware RMA keep progressing). Every
rule keeps its per-parameter state for the whole shard, indexed by the same ``where`` slice as the chunk.
DC-ASGD's delay compensation runs on the workers: :mod:`mpisgd.downpour.delay_compensation`.

``grads`` is the server's private copy of what the workers pushed (the sum of every push since the last
update): rules may overwrite it, which saves an allocation per chunk.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpisgd.errors import ConfigError

RULES = ("sgd", "adagrad")
#: names that moved to mpisgd.downpour.delay_compensation; still importable from here
_MOVED = ("DelayCompensation", "DC_VARIANTS", "DC_EPSILON")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from mpisgd.downpour import delay_compensation
        return getattr(delay_compensation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_positive(name: str, value: float) -> float:
    """``value`` as a float if it is a positive finite number; a ConfigError naming ``name`` otherwise."""
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
        self.lr = check_positive("lr", lr)
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
        self.eps = check_positive("adagrad eps", eps)

    def apply(self, params: np.ndarray, grads: np.ndarray, where: slice) -> None:
        squares = self.state["sum_of_squares"][where]
        squares += grads * grads
        denominator = np.sqrt(squares)
        denominator += np.float32(self.eps)
        grads *= np.float32(self.lr)
        grads /= denominator
        params -= grads


class MomentumRule(UpdateRule):
    """SGD with heavy-ball momentum as torch.optim.SGD applies it (weight decay already in ``grads``, as
    the workers add it): v <- m * v + g;  w <- w - lr * v. The server side of ``--strategy sync-ps``,
    which then takes the same steps as ``--strategy sync``'s optimizer."""

    name = "momentum"
    state_names = ("momentum_buffer",)

    def __init__(self, size: int, *, lr: float, momentum: float = 0.9) -> None:
        super().__init__(size, lr=lr)
        if not (isinstance(momentum, (int, float, np.floating)) and 0 <= momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def apply(self, params: np.ndarray, grads: np.ndarray, where: slice) -> None:
        velocity = self.state["momentum_buffer"][where]
        velocity *= np.float32(self.momentum)
        velocity += grads
        np.multiply(velocity, np.float32(self.lr), out=grads)
        params -= grads


def make_rule(name: str, size: int, *, lr: float, eps: float = 1e-8, momentum: float = 0.9) -> UpdateRule:
    """The server rule called ``name`` ("sgd", "adagrad", or sync-ps's "momentum") for a shard of ``size``
    elements."""
    if name == "sgd":
        return SGDRule(size, lr=lr)
    if name == "adagrad":
        return AdagradRule(size, lr=lr, eps=eps)
    if name == "momentum":
        return MomentumRule(size, lr=lr, momentum=momentum)
    raise ConfigError(f"unknown server rule {name!r}; valid: {', '.join(RULES)}")
