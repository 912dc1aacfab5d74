"""Where to cut a ``torch.nn.Sequential`` into pipeline stages: contiguous runs of layers, balanced.

No MPI here: :class:`~mpisgd.modelparallel.ModelParallel` computes the partition on rank 0 and broadcasts
it, so ranks can never disagree (a ``time`` balance measured separately on each rank would differ).

| balance | weight of a layer | when |
|---------|-------------------|------|
| ``"params"`` | its parameter count (+1, so parameter-free layers spread out) | memory-bound models, the default |
| ``"time"`` | measured seconds of its forward and backward on an example batch | compute-bound models |
| ``"uniform"`` | 1 | layers of equal cost |
| ``[n0, n1, ...]`` | (given) ``n_s`` layers on stage s | a known good split |
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from mpisgd.errors import SharedConfigError

Balance = Union[str, Sequence[int]]
BALANCES = ("params", "time", "uniform")
TIMING_REPEATS = 5


def layer_counts(weights: Sequence[float], stages: int) -> tuple[int, ...]:
    """Cut ``weights`` (one per layer) into ``stages`` contiguous non-empty runs whose heaviest run is as
    light as possible (linear partitioning by dynamic programming); returns the number of layers per stage.

    Ties go to the cut that puts fewer layers on earlier stages, deterministically.
    """
    layers = len(weights)
    if not 1 <= stages <= layers:
        raise SharedConfigError(f"cannot cut {layers} layers into {stages} stages (each stage needs a layer; "
                                f"stages can be 1..{layers})")
    prefix = [0.0]
    for weight in weights:
        prefix.append(prefix[-1] + float(weight))
    infinity = float("inf")
    # best[k][n]: lightest heaviest-run cutting the first n layers into k runs; cut[k][n]: the last run's start
    best = [[infinity] * (layers + 1) for _ in range(stages + 1)]
    cut = [[0] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for n in range(k, layers - (stages - k) + 1):
            for start in range(k - 1, n):
                candidate = max(best[k - 1][start], prefix[n] - prefix[start])
                if candidate < best[k][n]:
                    best[k][n], cut[k][n] = candidate, start
    counts = []
    end = layers
    for k in range(stages, 0, -1):
        start = cut[k][end]
        counts.append(end - start)
        end = start
    return tuple(reversed(counts))


def parameter_weights(model: nn.Sequential) -> list[float]:
    """Parameters per layer, plus one so that layers without parameters still count a little."""
    return [1.0 + sum(p.numel() for p in layer.parameters()) for layer in model]


def timed_weights(model: nn.Sequential, example_input: torch.Tensor, repeats: int = TIMING_REPEATS) -> list[float]:
    """Median seconds of each layer's forward plus backward on ``example_input`` (the model's parameters and
    gradients are left as they were)."""
    saved_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    weights = []
    activation = example_input.detach()
    for layer in model:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            inputs = activation.detach().requires_grad_(activation.is_floating_point())
            output = layer(inputs)
            if output.requires_grad:
                output.backward(torch.ones_like(output))
            samples.append(time.perf_counter() - start)
        weights.append(statistics.median(samples))
        with torch.no_grad():
            activation = layer(activation)
    for p, grad in zip(model.parameters(), saved_grads):
        p.grad = grad
    return weights


def resolve_balance(model: nn.Sequential, stages: int, balance: Balance,
                    example_input: Optional[torch.Tensor] = None) -> tuple[int, ...]:
    """The number of layers of each stage for ``balance`` (see the module's table).

    Raises:
        SharedConfigError: an unknown balance, a list that does not fit the model, ``"time"`` without an
            example input, or more stages than layers.
    """
    layers = len(model)
    if isinstance(balance, str):
        if balance not in BALANCES:
            raise SharedConfigError(f"unknown balance {balance!r}; valid: {', '.join(BALANCES)} or a list of "
                                    "layer counts per stage")
        if balance == "uniform":
            return layer_counts([1.0] * layers, stages)
        if balance == "params":
            return layer_counts(parameter_weights(model), stages)
        if example_input is None:
            raise SharedConfigError("balance='time' needs example_input= (a batch to time each layer on)")
        return layer_counts(timed_weights(model, example_input), stages)
    counts = tuple(int(n) for n in balance)
    if len(counts) != stages or min(counts, default=0) < 1 or sum(counts) != layers:
        raise SharedConfigError(f"balance {list(counts)} must give each of the {stages} stages at least one "
                                f"layer and {layers} layers in all")
    return counts
