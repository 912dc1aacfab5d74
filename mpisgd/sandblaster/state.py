"""The state of L-BFGS between two iterations, so that a preempted Sandblaster run continues exactly.

Between iterations :func:`mpisgd.sandblaster.lbfgs.minimize` holds only scalars on the coordinator (the
objective, max |gradient|, the history slots in use and the Gram matrix of dot products among the
history vectors) and the vectors themselves on the shards: ``x``, ``g`` and the pairs ``s<j>``, ``y<j>``
of :attr:`LBFGSState.pairs`. A checkpoint holds both (the vectors gathered, float64); resuming puts the
vectors back on the shards and hands this state to ``minimize(start=...)``, which goes on with the next
iteration as if never stopped: the same directions, the same line searches, bitwise (the run's sums do
not depend on timing; see :mod:`mpisgd.sandblaster.job`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mpisgd.errors import ConfigError


@dataclass
class LBFGSState:
    """What :func:`~mpisgd.sandblaster.lbfgs.minimize` needs to continue after ``iteration``."""

    iteration: int
    objective: float
    gradient_max_norm: float
    gradient_dot: float  # g . g
    function_evaluations: int
    pairs: list  # history slots in use, oldest first
    free_slots: list
    gram: dict = field(default_factory=dict)  # (name, name) -> dot product
    previous_objective: Optional[float] = None  # before this iteration (None after iteration 0)

    @property
    def vector_names(self) -> list:
        """The shard vectors this state refers to."""
        return ["x", "g", *(f"s{j}" for j in self.pairs), *(f"y{j}" for j in self.pairs)]

    def to_json(self) -> dict:
        """For a checkpoint's metadata (floats survive JSON exactly: repr round-trips)."""
        return {"iteration": self.iteration, "objective": self.objective,
                "gradient_max_norm": self.gradient_max_norm, "gradient_dot": self.gradient_dot,
                "function_evaluations": self.function_evaluations, "pairs": list(self.pairs),
                "free_slots": list(self.free_slots), "gram": [[a, b, value] for (a, b), value in self.gram.items()],
                "previous_objective": self.previous_objective}

    @classmethod
    def from_json(cls, saved: dict, *, history: int) -> LBFGSState:
        """The state written by :meth:`to_json`; ConfigError when it does not fit ``--history``."""
        state = cls(int(saved["iteration"]), float(saved["objective"]), float(saved["gradient_max_norm"]),
                    float(saved["gradient_dot"]), int(saved["function_evaluations"]),
                    [int(j) for j in saved["pairs"]], [int(j) for j in saved["free_slots"]],
                    {(str(a), str(b)): float(value) for a, b, value in saved["gram"]},
                    None if saved.get("previous_objective") is None else float(saved["previous_objective"]))
        if sorted(state.pairs + state.free_slots) != list(range(history + 1)):
            raise ConfigError(f"its L-BFGS history has {len(state.pairs) + len(state.free_slots) - 1} pairs, "
                              f"this run --history {history}: resume with the same --history")
        return state
