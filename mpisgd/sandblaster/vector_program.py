"""Sandblaster's vector programs: commands on named vectors that each shard runs on its own slice.

Dean et al. (2012) keep the parameters and the optimizer's history vectors sharded over the
parameter-server ranks; the coordinator sends each shard commands from a small set (dot product,
scaling, coefficient-wise addition and multiplication, copy) and only scalars come back.
:func:`run_program` executes a program on a dict of numpy arrays (one shard's slices, or whole
vectors) and returns the partial scalars; :func:`combine_partials` adds up the shards' partials
(dots) or takes their maximum (max-norms) in shard order, so results do not depend on timing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

#: command name -> what it does (``a``, ``b``, ``x``, ``y``, ``dst``, ``src`` name vectors)
COMMANDS = {
    "dot": "('dot', a, b): partial sum of a*b; shards' partials are added",
    "max_abs": "('max_abs', a): partial max |a|; shards' partials are maxed",
    "axpy": "('axpy', alpha, x, y): y += alpha * x",
    "scale": "('scale', alpha, x): x *= alpha",
    "copy": "('copy', src, dst): dst = src",
    "combine": "('combine', dst, ((c1, v1), (c2, v2), ...)): dst = sum of c_i * v_i",
    "mul": "('mul', dst, a, b): dst = a * b coefficient-wise",
}
_SCALAR_COMMANDS = ("dot", "max_abs")

def run_program(vectors: dict, program: Sequence[tuple]) -> list:
    """Run ``program`` on ``vectors`` (name -> 1-d float array, changed in place).

    Vectors written by ``copy``/``combine``/``mul`` are created when missing. Returns one partial
    scalar per ``dot``/``max_abs`` command, in program order.
    """
    partials = []
    for command in program:
        name = command[0]
        if name == "dot":
            partials.append(float(np.dot(vectors[command[1]], vectors[command[2]])))
        elif name == "max_abs":
            values = vectors[command[1]]
            partials.append(float(np.max(np.abs(values))) if values.size else 0.0)
        elif name == "axpy":
            _, alpha, x, y = command
            vectors[y] += alpha * vectors[x]
        elif name == "scale":
            _, alpha, x = command
            vectors[x] *= alpha
        elif name == "copy":
            _, src, dst = command
            vectors[dst] = vectors[src].copy()
        elif name == "combine":
            _, dst, terms = command
            total = None
            for coefficient, source in terms:  # fixed order: the result does not depend on timing
                term = coefficient * vectors[source]
                total = term if total is None else total + term
            vectors[dst] = total
        elif name == "mul":
            _, dst, a, b = command
            vectors[dst] = vectors[a] * vectors[b]
        else:
            raise ValueError(f"unknown vector command {name!r}; valid: {', '.join(COMMANDS)}")
    return partials


def combine_partials(program: Sequence[tuple], partials_by_shard: Sequence[Sequence[float]]) -> list:
    """The full scalars of ``program`` from each shard's partials (added, or maxed, in shard order)."""
    kinds = [command[0] for command in program if command[0] in _SCALAR_COMMANDS]
    results = []
    for index, kind in enumerate(kinds):
        values = [partials[index] for partials in partials_by_shard]
        if kind == "dot":
            total = 0.0
            for value in values:
                total += value
            results.append(total)
        else:
            results.append(max(values))
    return results


class Workspace(Protocol):
    """Where the optimizer's vectors live: named vectors it can combine, and the objective.

    ``evaluate(point, gradient, before=..., then=...)`` runs ``before``, computes the objective
    at vector ``point``, stores its gradient in vector ``gradient``, runs ``then`` and returns
    (objective, scalars of ``then``): one round trip however the work is spread.
    """

    def run(self, program: Sequence[tuple]) -> list: ...

    def evaluate(self, point: str, gradient: str, *, before: Sequence[tuple] = (),
                 then: Sequence[tuple] = ()) -> tuple: ...


class LocalWorkspace:
    """All vectors in one process, the objective a plain function ``fun(x) -> (f, gradient)``."""

    def __init__(self, fun: Callable[[np.ndarray], tuple], x0: np.ndarray):
        self.fun = fun
        self.vectors = {"x": np.array(x0, dtype=np.float64).ravel()}
        self.evaluations = 0

    def run(self, program: Sequence[tuple]) -> list:
        return combine_partials(program, [run_program(self.vectors, program)])

    def evaluate(self, point: str, gradient: str, *, before: Sequence[tuple] = (),
                 then: Sequence[tuple] = ()) -> tuple:
        run_program(self.vectors, before)
        f, g = self.fun(self.vectors[point])
        self.evaluations += 1
        self.vectors[gradient] = np.array(g, dtype=np.float64).ravel()
        return float(f), self.run(then)
