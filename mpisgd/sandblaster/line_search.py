"""The strong-Wolfe line search of Nocedal & Wright (alg. 3.5/3.6) that Sandblaster's L-BFGS steps with.

It sees the objective only through ``phi(alpha) -> (value, slope)`` along the search direction, so
it does not know whether the vectors live in one process or on the shards. NaN/inf is read as
"too far" and cut back, because a diverging trial step must not end a run that can still move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class LineSearchResult:
    """Outcome of :func:`strong_wolfe_line_search`.

    ``status``: "wolfe" (both strong Wolfe conditions hold), "decrease" (sufficient decrease only:
    the evaluation budget ran out in the zoom), "failed" (no step decreased the objective) or
    "nonfinite" (every step tried gave NaN/inf).
    """

    alpha: float
    f: float
    slope: float
    evaluations: int
    status: str

    @property
    def moved(self) -> bool:
        return self.status in ("wolfe", "decrease")


def _cubic_minimizer(a, fa, da, b, fb, db) -> float | None:
    """Minimizer of the cubic through (a, fa, da) and (b, fb, db), None when it has none."""
    d1 = da + db - 3 * (fa - fb) / (a - b)
    radicand = d1 * d1 - da * db
    if radicand < 0 or not math.isfinite(radicand):
        return None
    d2 = math.copysign(math.sqrt(radicand), b - a)
    denominator = db - da + 2 * d2
    if denominator == 0:
        return None
    result = b - (b - a) * (db + d2 - d1) / denominator
    return result if math.isfinite(result) else None


def _quadratic_minimizer(a, fa, da, b, fb) -> float | None:
    """Minimizer of the parabola with value fa, slope da at a and value fb at b."""
    curvature = (fb - fa - da * (b - a)) / ((b - a) ** 2)
    if curvature <= 0 or not math.isfinite(curvature):
        return None
    return a - da / (2 * curvature)


def strong_wolfe_line_search(phi: Callable[[float], tuple], f0: float, slope0: float, alpha: float, *,
                             c1: float = 1e-4, c2: float = 0.9, max_evaluations: int = 20,
                             alpha_max: float = 1e10) -> LineSearchResult:
    """A step satisfying the strong Wolfe conditions along a descent direction (N&W alg. 3.5/3.6).

    Args:
        phi: alpha -> (objective, directional derivative) at x + alpha * d; may return NaN/inf,
            which is treated as "too far": the step is cut back (by 10x) until values are finite.
        f0, slope0: phi(0) and phi'(0) (< 0).
        alpha: first step to try.
        c1, c2: sufficient-decrease and curvature constants, 0 < c1 < c2 < 1.
        max_evaluations: budget of phi calls.
        alpha_max: largest step the bracketing phase may try.
    """
    if not slope0 < 0:
        raise ValueError(f"line search needs a descent direction, got phi'(0) = {slope0}")
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    evaluations = 0
    finite_seen = False
    previous = (0.0, f0, slope0)
    while evaluations < max_evaluations:
        f, slope = phi(alpha)
        evaluations += 1
        current = (alpha, f, slope)
        if not (math.isfinite(f) and math.isfinite(slope)):
            return _zoom(phi, previous, (alpha, math.inf, math.nan), f0, slope0, c1, c2,
                         evaluations, max_evaluations, finite_seen)
        finite_seen = True
        if f > f0 + c1 * alpha * slope0 or (evaluations > 1 and f >= previous[1]):
            return _zoom(phi, previous, current, f0, slope0, c1, c2, evaluations, max_evaluations, True)
        if abs(slope) <= -c2 * slope0:
            return LineSearchResult(alpha, f, slope, evaluations, "wolfe")
        if slope >= 0:
            return _zoom(phi, current, previous, f0, slope0, c1, c2, evaluations, max_evaluations, True)
        # still going down steeply: extrapolate to between 1.1x and 4x the last increment
        low, high = alpha + 1.1 * (alpha - previous[0]), alpha + 4.0 * (alpha - previous[0])
        guess = _cubic_minimizer(previous[0], previous[1], previous[2], alpha, f, slope)
        next_alpha = high if guess is None or guess > high else max(low, guess)
        previous = current
        alpha = min(next_alpha, alpha_max)
        if alpha == previous[0]:
            break
    alpha_p, f_p, slope_p = previous
    status = "decrease" if alpha_p > 0 else ("failed" if finite_seen else "nonfinite")
    return LineSearchResult(alpha_p, f_p, slope_p, evaluations, status)


def _zoom(phi, low, high, f0, slope0, c1, c2, evaluations, max_evaluations, finite_seen) -> LineSearchResult:
    """N&W alg. 3.6: shrink [low, high] (low: best point with sufficient decrease) to a Wolfe step."""
    while evaluations < max_evaluations:
        a_lo, f_lo, s_lo = low
        a_hi, f_hi, s_hi = high
        width = a_hi - a_lo
        if abs(width) <= 1e-12 * max(abs(a_lo), abs(a_hi)) or width == 0:
            break
        if math.isfinite(f_hi):
            lower, upper = sorted((a_lo, a_hi))
            margin = 0.1 * (upper - lower)
            trial = _cubic_minimizer(a_lo, f_lo, s_lo, a_hi, f_hi, s_hi) if math.isfinite(s_hi) else None
            if trial is None or not lower + margin <= trial <= upper - margin:
                trial = _quadratic_minimizer(a_lo, f_lo, s_lo, a_hi, f_hi)
                margin = 0.2 * (upper - lower)
                if trial is None or not lower + margin <= trial <= upper - margin:
                    trial = a_lo + 0.5 * width
        else:
            trial = a_lo + 0.1 * width  # non-finite values: back off hard
        f, slope = phi(trial)
        evaluations += 1
        if not (math.isfinite(f) and math.isfinite(slope)):
            high = (trial, math.inf, math.nan)
            continue
        finite_seen = True
        if f > f0 + c1 * trial * slope0 or f >= f_lo:
            high = (trial, f, slope)
        else:
            if abs(slope) <= -c2 * slope0:
                return LineSearchResult(trial, f, slope, evaluations, "wolfe")
            if slope * (a_hi - a_lo) >= 0:
                high = low
            low = (trial, f, slope)
    a_lo, f_lo, s_lo = low
    status = "decrease" if a_lo > 0 else ("failed" if finite_seen else "nonfinite")
    return LineSearchResult(a_lo, f_lo, s_lo, evaluations, status)
