"""L-BFGS written in vector commands, so that Sandblaster can run it on vectors it never gathers.

This module is the optimizer with no MPI in it. :func:`minimize` is L-BFGS with the strong-Wolfe
line search of :mod:`mpisgd.sandblaster.line_search`, against a
:class:`~mpisgd.sandblaster.vector_program.Workspace` (run a vector program; evaluate the
objective at a named vector): :class:`~mpisgd.sandblaster.vector_program.LocalWorkspace` is the
one-process workspace used by tests, the distributed one lives in ``mpisgd.sandblaster.workspace``.

Why the two-loop recursion runs on a Gram matrix (Chen et al. 2014, "vector-free L-BFGS"): the
textbook recursion needs one dot product per history pair and loop, each depending on the previous
one, i.e. 2m round trips to the shards per iteration. Every vector it forms is a linear combination
of the base vectors s_0..s_{k-1}, y_0..y_{k-1}, g, so after one round trip that computes the new
dot products among them, the recursion runs on the coordinator on (2k+1)-vectors of coefficients,
and one more command forms the direction on the shards. Same direction in exact arithmetic; two
round trips per iteration instead of 2m.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpisgd.errors import MpisgdError
from mpisgd.sandblaster.line_search import LineSearchResult, strong_wolfe_line_search
from mpisgd.sandblaster.state import LBFGSState
from mpisgd.sandblaster.vector_program import (
    COMMANDS,
    LocalWorkspace,
    Workspace,
    combine_partials,
    run_program,
)

# The vector programs and the line search were in this module before it was split; their names stay
# importable from here (and from the deprecated ``mpisgd.optim.lbfgs``).
__all__ = ["COMMANDS", "DEFAULT_OBJECTIVE_TOLERANCE", "IterationRecord", "LBFGSResult", "LBFGSSettings",
           "LineSearchResult", "LocalWorkspace", "NonFiniteObjectiveError", "Workspace", "combine_partials",
           "minimize", "run_program", "strong_wolfe_line_search", "two_loop_coefficients", "two_loop_direction"]

#: scipy's L-BFGS-B default ftol (factr 1e7 times machine epsilon)
DEFAULT_OBJECTIVE_TOLERANCE = 1e7 * np.finfo(float).eps


class NonFiniteObjectiveError(MpisgdError):
    """The objective or its gradient is NaN/inf where the optimizer cannot step around it."""


# ---- two-loop recursion ------------------------------------------------------------------------

def two_loop_direction(gradient: np.ndarray, s_history: Sequence[np.ndarray],
                       y_history: Sequence[np.ndarray]) -> np.ndarray:
    """Textbook L-BFGS direction -H g (Nocedal & Wright alg. 7.4), oldest pair first; the reference."""
    q = np.array(gradient, dtype=np.float64)
    alphas = []
    for s, y in zip(reversed(s_history), reversed(y_history)):
        alpha = np.dot(s, q) / np.dot(s, y)
        q -= alpha * y
        alphas.append(alpha)
    if s_history:
        q *= np.dot(s_history[-1], y_history[-1]) / np.dot(y_history[-1], y_history[-1])
    for (s, y), alpha in zip(zip(s_history, y_history), reversed(alphas)):
        beta = np.dot(y, q) / np.dot(s, y)
        q += (alpha - beta) * s
    return -q


def two_loop_coefficients(gram: np.ndarray, pairs: int) -> np.ndarray:
    """Coefficients c with direction -H g = sum_j c_j b_j over b = (s_0..s_{k-1}, y_0..y_{k-1}, g).

    ``gram`` is the (2k+1)x(2k+1) matrix of dot products among the base vectors (oldest pair
    first). The recursion is :func:`two_loop_direction` with every vector replaced by its
    coefficients, so only these scalars are needed.
    """
    k = pairs
    size = 2 * k + 1
    if gram.shape != (size, size):
        raise ValueError(f"gram must be {size}x{size} for {k} pairs, got {gram.shape}")
    q = np.zeros(size)
    q[2 * k] = 1.0
    rho = [1.0 / gram[i, k + i] for i in range(k)]
    alphas = np.zeros(k)
    for i in reversed(range(k)):
        alphas[i] = rho[i] * (gram[i] @ q)
        q[k + i] -= alphas[i]
    if k:
        q *= gram[k - 1, 2 * k - 1] / gram[2 * k - 1, 2 * k - 1]
    for i in range(k):
        beta = rho[i] * (gram[k + i] @ q)
        q[i] += alphas[i] - beta
    return -q


# ---- the optimizer -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LBFGSSettings:
    """L-BFGS knobs; defaults follow scipy's L-BFGS-B where it has them."""

    history: int = 10
    max_iterations: int = 100
    gradient_tolerance: float = 1e-5
    objective_tolerance: float = DEFAULT_OBJECTIVE_TOLERANCE
    c1: float = 1e-4
    c2: float = 0.9
    max_line_search: int = 20

    def __post_init__(self) -> None:
        if self.history < 1 or self.max_iterations < 1 or self.max_line_search < 1:
            raise ValueError("history, max_iterations and max_line_search must be positive")
        if not (self.gradient_tolerance >= 0 and self.objective_tolerance >= 0):
            raise ValueError("tolerances must be >= 0")


@dataclass
class IterationRecord:
    """What one iteration did (iteration 0 is the starting point)."""

    iteration: int
    objective: float
    gradient_max_norm: float
    step_size: float = 0.0
    step_norm: float = 0.0
    line_search_evaluations: int = 0
    function_evaluations: int = 0
    line_search_status: str = ""


@dataclass
class LBFGSResult:
    iterations: int
    objective: float
    gradient_max_norm: float
    function_evaluations: int
    stopped: str
    message: str
    history: list = field(default_factory=list)


STARTED_CONVERGED = ("gradient_tolerance", "the starting point already meets the gradient tolerance")


def _gradient_converged(g_max: float, settings: LBFGSSettings) -> tuple[str, str] | None:
    """(stop reason, message) when the max-norm of the gradient meets the gradient tolerance."""
    if g_max <= settings.gradient_tolerance:
        return "gradient_tolerance", f"max |gradient| {g_max:.3g} <= {settings.gradient_tolerance:g}"
    return None


def _converged(f_previous: float, f: float, g_max: float, settings: LBFGSSettings) -> tuple[str, str] | None:
    """(stop reason, message) when an iteration from ``f_previous`` to ``f`` met a tolerance."""
    gradient = _gradient_converged(g_max, settings)
    if gradient:
        return gradient
    if (f_previous - f) / max(abs(f_previous), abs(f), 1.0) <= settings.objective_tolerance:
        return "objective_tolerance", f"relative decrease of the objective <= {settings.objective_tolerance:.3g}"
    return None


class _Gram:
    """Dot products among the named base vectors, kept as the history changes."""

    def __init__(self) -> None:
        self.values: dict = {}

    def set(self, a: str, b: str, value: float) -> None:
        self.values[(a, b)] = self.values[(b, a)] = value

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        return np.array([[self.values[(a, b)] for b in names] for a in names])

    def forget(self, name: str) -> None:
        for key in [key for key in self.values if name in key]:
            del self.values[key]


def minimize(workspace: Workspace, settings: LBFGSSettings = LBFGSSettings(), *,
             callback: Callable[[IterationRecord], None] | None = None, start: LBFGSState | None = None,
             on_state: Callable[[LBFGSState], None] | None = None) -> LBFGSResult:
    """Minimize the workspace's objective from vector ``x``; the minimizer is left in ``x``.

    ``start``: continue after the iteration of a saved state (its vectors already in the workspace);
    ``on_state``: called with the state after every iteration, before ``callback``.

    Vectors used on the workspace: x, g (gradient at x), d (direction), x_trial, g_trial, and the
    history pairs s0..s{m}, y0..y{m} (m + 1 slots, so a new pair never overwrites an old one before
    it is known to be usable). Stops on: max-norm of the gradient <= gradient_tolerance,
    relative decrease (f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= objective_tolerance (scipy's
    ftol), max_iterations, or a line search that finds no decrease (the objective cannot be
    lowered any further at working precision; scipy's ABNORMAL_TERMINATION_IN_LNSRCH).

    Raises:
        NonFiniteObjectiveError: the objective is not finite at the start, or at every step tried.
    """
    m = settings.history
    gram = _Gram()
    log: list = []

    def finish(iterations, stopped, message):
        return LBFGSResult(iterations, f, g_max, evaluations, stopped, message, log)

    def report(record: IterationRecord) -> None:
        log.append(record)
        if on_state:
            on_state(LBFGSState(record.iteration, f, g_max, gg, evaluations, list(pairs), list(free_slots),
                                dict(gram.values), f_previous))
        if callback:
            callback(record)

    f_previous: float | None = None
    if start is None:
        f, (g_max, gg) = workspace.evaluate("x", "g", then=[("max_abs", "g"), ("dot", "g", "g")])
        evaluations, first_iteration = 1, 1
        if not (math.isfinite(f) and math.isfinite(g_max)):
            raise NonFiniteObjectiveError(f"the objective is not finite at the starting point (f = {f}, "
                                          f"max |gradient| = {g_max}): check the data, model and weight decay")
        gram.set("g", "g", gg)
        pairs: list = []  # history slots, oldest first
        free_slots = list(range(m + 1))
        report(IterationRecord(0, f, g_max, function_evaluations=evaluations))
        if g_max <= settings.gradient_tolerance:
            return finish(0, *STARTED_CONVERGED)
    else:
        f, g_max, gg, evaluations = start.objective, start.gradient_max_norm, start.gradient_dot, \
            start.function_evaluations
        pairs, free_slots, gram.values = list(start.pairs), list(start.free_slots), dict(start.gram)
        first_iteration = start.iteration + 1
        f_previous = start.previous_objective
        if f_previous is None:  # saved at the starting point: only the gradient test applies there
            converged = _gradient_converged(g_max, settings) and STARTED_CONVERGED
        else:
            converged = _converged(f_previous, f, g_max, settings)
        if converged:  # stopped right at the iteration that met a tolerance: the run was over
            return finish(start.iteration, *converged)
    evaluated: dict = {}  # the last trial step and its max |gradient|

    def phi(alpha: float) -> tuple:
        """Objective and slope along d at x + alpha d: one pass, the trial point formed on the shards."""
        f_a, (slope_a, g_max_a) = workspace.evaluate(
            "x_trial", "g_trial", before=[("combine", "x_trial", ((1.0, "x"), (alpha, "d")))],
            then=[("dot", "g_trial", "d"), ("max_abs", "g_trial")])
        evaluated["last"] = (alpha, g_max_a)
        return f_a, slope_a

    for iteration in range(first_iteration, settings.max_iterations + 1):
        # -- direction: coefficients over (s.., y.., g) from the Gram matrix, formed on the shards
        names = [f"s{j}" for j in pairs] + [f"y{j}" for j in pairs] + ["g"]
        coefficients = two_loop_coefficients(gram.matrix(names), len(pairs))
        terms = tuple((float(c), name) for c, name in zip(coefficients, names) if c != 0.0)
        (slope0,) = workspace.run([("combine", "d", terms), ("dot", "g", "d")])
        if not slope0 < 0:  # rounding made H lose positive definiteness: restart from steepest descent
            for j in pairs:
                gram.forget(f"s{j}")
                gram.forget(f"y{j}")
            free_slots = list(range(m + 1))
            pairs = []
            (slope0,) = workspace.run([("combine", "d", ((-1.0, "g"),)), ("dot", "g", "d")])
        first_step = 1.0 if pairs else min(1.0, 1.0 / math.sqrt(gg))

        search = strong_wolfe_line_search(phi, f, slope0, first_step, c1=settings.c1, c2=settings.c2,
                                          max_evaluations=settings.max_line_search)
        evaluations += search.evaluations
        if search.status == "nonfinite":
            raise NonFiniteObjectiveError(
                f"iteration {iteration}: the objective was not finite at every step tried along the search "
                f"direction ({search.evaluations} steps, the smallest cut back 10x each time); "
                "the model or data produce NaN/inf (try a larger --weight-decay or rescale the inputs)")
        if not search.moved:
            return finish(iteration - 1, "line_search",
                          f"the line search found no decrease in {search.evaluations} evaluations: "
                          "the objective cannot be lowered further at working precision")
        if evaluated["last"][0] != search.alpha:  # the accepted step was an earlier trial: recompute it
            phi(search.alpha)
            evaluations += 1
        g_max_new = evaluated["last"][1]

        # -- accept: new pair into a free slot, move to the trial point, and every new dot product at once
        j = free_slots.pop(0)
        s, y = f"s{j}", f"y{j}"
        kept = [f"s{i}" for i in pairs] + [f"y{i}" for i in pairs]
        program = [("combine", s, ((search.alpha, "d"),)), ("combine", y, ((1.0, "g_trial"), (-1.0, "g"))),
                   ("copy", "x_trial", "x"), ("copy", "g_trial", "g")]
        dots = [(s, s), (s, y), (y, y)] + [(new, old) for new in (s, y) for old in kept]
        dots += [("g", name) for name in kept + [s, y, "g"]]
        values = workspace.run(program + [("dot", a, b) for a, b in dots])
        for (a, b), value in zip(dots, values):
            gram.set(a, b, value)
        sy, yy, ss = gram.values[(s, y)], gram.values[(y, y)], gram.values[(s, s)]
        if sy > np.finfo(float).eps * yy:
            pairs.append(j)
            if len(pairs) > m:
                oldest = pairs.pop(0)
                gram.forget(f"s{oldest}")
                gram.forget(f"y{oldest}")
                free_slots.append(oldest)
        else:  # no positive curvature along s (possible when the step only met sufficient decrease)
            gram.forget(s)
            gram.forget(y)
            free_slots.insert(0, j)
        f_previous = f
        f, g_max, gg = search.f, g_max_new, gram.values[("g", "g")]
        report(IterationRecord(iteration, f, g_max, search.alpha, math.sqrt(ss), search.evaluations,
                               evaluations, search.status))
        converged = _converged(f_previous, f, g_max, settings)
        if converged:
            return finish(iteration, *converged)
    return finish(settings.max_iterations, "max_iterations", f"reached {settings.max_iterations} iterations")
