"""The built-in models the CLI can train: softmax regression, an MLP and a small convnet.

Why these three: they span the range the strategies are compared on (a convex problem, a small
non-convex one, and one with convolutions and batch norm), and all train in seconds on a CPU.
`linear` and `mlp` have no batch norm on purpose: batch statistics depend on the per-rank batch, so only
models without it give bitwise-comparable results between p ranks with batch B and one process with
batch p*B, which the equivalence tests rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from mpisgd import emulation
from mpisgd.errors import ConfigError


def _linear(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_features(input_shape), num_classes))


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    layers: list = [nn.Flatten()]
    width = _features(input_shape)
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model 'cnn' needs image-shaped input (channels, height, width), got input_shape {input_shape}; "
            "use 'mlp' or 'linear' for flat features"
        )
    channels = input_shape[0]

    def block(inputs: int, outputs: int, stride: int) -> list:
        return [
            nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
        ]

    return nn.Sequential(
        *block(channels, 32, 1),
        *block(32, 64, 2),
        *block(64, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def _features(input_shape: tuple[int, ...]) -> int:
    count = 1
    for dim in input_shape:
        count *= dim
    return count


MODELS: dict[str, Callable[[tuple[int, ...], int, Sequence[int]], nn.Module]] = {
    "linear": _linear,
    "mlp": _mlp,
    "cnn": _cnn,
}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (256, 128),
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build a built-in model.

    Args:
        name: "linear" (softmax regression: one Linear on the flattened input), "mlp" (Linear + ReLU
            per entry of `hidden`, then a Linear head; no batch norm) or "cnn" (three 3x3 conv + batch
            norm + ReLU blocks, 32/64/64 channels, the second with stride 2, global average pooling and a
            Linear head; needs input_shape (C, H, W)).
        input_shape: shape of one sample, without the batch dimension.
        num_classes: outputs (logits) of the model.
        hidden: hidden layer widths of "mlp" (ignored by the others).
        seed: when given, initialize the weights from this seed without touching the global torch RNG,
            so every rank can build identical replicas.

    Returns:
        The model, producing logits of shape (batch, num_classes).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    input_shape = tuple(int(dim) for dim in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ConfigError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    hidden = tuple(hidden)
    if any(not (isinstance(units, int) and units >= 1) for units in hidden):
        raise ConfigError(f"hidden must be positive ints, got {hidden}")
    if seed is None:
        model = MODELS[name](input_shape, num_classes, hidden)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODELS[name](input_shape, num_classes, hidden)
    return emulation.attach(model)  # benchmarks' emulated accelerators (nothing unless asked for)
