"""A deterministic, in-process parameter server whose gradients arrive exactly ``tau`` updates late: the
exact comparison of ASGD and DC-ASGD (Zheng et al. 2017) at a chosen delay, with no MPI, no timing and
no scheduler in the way.

Why: on a small machine the delays of a real asynchronous job are what the operating system makes of
its processes (8 workers on 2 cores see ~1 update of delay), so a run there cannot show what the delay
compensation does at the delays the paper studies. Here ``tau + 1`` emulated workers take turns in a
perfect round robin: each computes its gradient at the parameters of the moment (its pull) and the
server applies it ``tau`` updates later, so every gradient has staleness exactly ``tau``. The server
applies it with the servers' own code (:class:`mpisgd.downpour.rules.SGDRule`), after the workers' own
correction (:class:`mpisgd.downpour.delay_compensation.DelayCompensation`, one per emulated worker, as
each real worker keeps its own adaptive mean square), with weight decay added as the workers add it.
With ``tau = 0`` it is sequential SGD.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mpisgd.downpour.delay_compensation import DelayCompensation
from mpisgd.downpour.rules import SGDRule
from mpisgd.errors import ConfigError

#: method name -> DC-ASGD variant (None: plain asynchronous SGD)
METHODS = {"asgd": None, "dcasgd-constant": "constant", "dcasgd-adaptive": "adaptive"}


@dataclass(frozen=True)
class Evaluation:
    """Validation accuracy after ``updates`` updates."""

    updates: int
    accuracy: float


class FlatModel:
    """A torch model whose parameters are views into one float32 numpy vector (as on a worker), with the
    gradient of a batch as a numpy vector of the same layout."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.flat = torch.nn.utils.parameters_to_vector(self.params).detach().numpy().astype(np.float32)
        tensor = torch.from_numpy(self.flat)
        offset = 0
        for p in self.params:
            p.data = tensor[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def gradient(self, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> np.ndarray:
        """d loss / d w at the current parameters, plus weight decay (as the Downpour worker adds it)."""
        loss = F.cross_entropy(self.model(x), y)
        for p in self.params:
            p.grad = None
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None]).numpy().copy()
        if weight_decay:
            grads += np.float32(weight_decay) * self.flat
        return grads

    def accuracy(self, batches: Iterable) -> float:
        correct = total = 0
        self.model.eval()
        with torch.no_grad():
            for x, y in batches:
                correct += int((self.model(x).argmax(dim=1) == y).sum())
                total += len(y)
        self.model.train()
        return correct / max(total, 1)


def simulate(model: torch.nn.Module, batches: Iterator, *, updates: int, tau: int, method: str = "asgd",
             lr: float = 0.1, weight_decay: float = 0.0, dc_lambda: float = 0.04, dc_momentum: float = 0.95,
             evaluate: Optional[Iterable] = None, eval_every: int = 0) -> tuple[np.ndarray, list[Evaluation]]:
    """Train ``model`` in place for ``updates`` server updates, each gradient applied ``tau`` updates
    after it was computed.

    Args:
        model: the model (its parameters are rebound to one flat vector).
        batches: (x, y) batches, one per gradient, in order.
        updates: updates the server applies (the last ``tau`` gradients are drained at the end, as the
            servers drain, so ``updates`` gradients are computed and applied).
        tau: the delay, in updates (>= 0).
        method: one of :data:`METHODS`.
        evaluate: validation batches; with ``eval_every`` > 0 the accuracy is recorded that often.

    Returns:
        The final flat parameters, and the evaluations made.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if tau < 0 or updates < 1:
        raise ConfigError(f"need tau >= 0 and updates >= 1, got tau={tau}, updates={updates}")
    flat_model = FlatModel(model)
    w = flat_model.flat
    rule = SGDRule(len(w), lr=lr)
    variant = METHODS[method]
    workers = tau + 1
    compensation = ([DelayCompensation(len(w), lam=dc_lambda, variant=variant, momentum=dc_momentum)
                     for _ in range(workers)] if variant is not None else None)
    in_flight: deque = deque()  # (gradient, the parameters it was computed at, its worker)
    evaluations: list[Evaluation] = []
    applied = 0

    def apply_oldest() -> None:
        nonlocal applied
        grads, w_pulled, worker = in_flight.popleft()
        if compensation is not None:
            grads = compensation[worker].compensate(grads, w, w_pulled)
        rule.apply(w, grads, slice(None))
        applied += 1
        if evaluate is not None and eval_every and applied % eval_every == 0:
            evaluations.append(Evaluation(applied, flat_model.accuracy(evaluate)))

    for k in range(updates):
        x, y = next(batches)
        w_pulled = w.copy() if compensation is not None else None
        in_flight.append((flat_model.gradient(x, y, weight_decay), w_pulled, k % workers))
        if len(in_flight) > tau:
            apply_oldest()
    while in_flight and applied < updates:
        apply_oldest()
    return w.copy(), evaluations


def endless(batches: Iterable) -> Iterator:
    """Batches epoch after epoch."""
    while True:
        yield from batches
