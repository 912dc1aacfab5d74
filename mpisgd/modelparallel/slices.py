"""Which elements of the unsplit model's flat parameter vector one partition (stage, split) holds.

The parameter servers of Downpour hold ``parameters_to_vector(model.parameters())`` of the *unsplit* model,
cut into shards (:class:`~mpisgd.training.layout.ShardLayout`). A partition of a split replica holds the
parameters of its stage's layers: one contiguous range of that vector per stage, and, with splits within
layers, rows ``[lo, hi)`` of each split Linear (a contiguous block of its row-major weight, and of its bias).
A parameter a split stage keeps whole (a norm layer after a split Linear) is held by every split with the
same gradient, so every split pulls it and split 0 alone pushes it: each element of the vector is pushed
by exactly one partition of a replica. No MPI here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch import nn

from mpisgd.modelparallel.tensor_parallel import ColumnParallelLinear


class Piece(NamedTuple):
    """``length`` elements at ``start`` of the unsplit flat vector, at ``local`` of the partition's own
    vector; ``pushed``: whether this partition pushes their gradient (False: another split does)."""

    start: int
    local: int
    length: int
    pushed: bool


def global_offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (offset, numel)} in ``parameters_to_vector(model.parameters())``."""
    offsets, offset = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (offset, p.numel())
        offset += p.numel()
    return offsets


def partition_pieces(model: nn.Module, module: nn.Module, split: int = 0) -> list[Piece]:
    """The pieces of the unsplit ``model``'s flat vector that ``module`` (a stage's sub-module, its children
    named as in ``model``, Linears possibly split) holds, in the order of ``module.parameters()``; pieces
    that follow each other in both vectors are merged."""
    offsets = global_offsets(model)
    pieces: list[Piece] = []
    local = 0
    for child_name, child in module.named_children():
        for field, p in child.named_parameters(recurse=True):
            name = f"{child_name}.{field}"
            if name not in offsets:
                raise KeyError(f"the stage's parameter {name!r} is not a parameter of the unsplit model")
            offset, numel = offsets[name]
            if isinstance(child, ColumnParallelLinear):
                row = child.in_features if field == "weight" else 1
                start, length, pushed = offset + child.lo * row, p.numel(), True
            else:
                if p.numel() != numel:
                    raise ValueError(f"{name}: {p.numel()} elements here, {numel} in the unsplit model")
                start, length, pushed = offset, numel, split == 0
            _append(pieces, Piece(start, local, length, pushed))
            local += length
    return pieces


def _append(pieces: list[Piece], piece: Piece) -> None:
    if piece.length == 0:
        return
    if pieces:
        last = pieces[-1]
        if (last.start + last.length == piece.start and last.local + last.length == piece.local
                and last.pushed == piece.pushed):
            pieces[-1] = last._replace(length=last.length + piece.length)
            return
    pieces.append(piece)


def gather_pieces(flat: np.ndarray, pieces: list[Piece]) -> np.ndarray:
    """The partition's own vector taken out of an unsplit flat vector (for tests and initial values)."""
    out = np.empty(sum(p.length for p in pieces), dtype=flat.dtype)
    for p in pieces:
        out[p.local:p.local + p.length] = flat[p.start:p.start + p.length]
    return out
