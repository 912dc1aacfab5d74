"""L-BFGS stopped after any iteration and continued from its saved state (the vectors it names, the
scalars through JSON, as a Sandblaster checkpoint holds them) takes exactly the steps of an
uninterrupted run, and ends bitwise at the same point."""

import copy
import json

import numpy as np
import pytest
from scipy.optimize import rosen, rosen_der

from mpisgd.errors import ConfigError
from mpisgd.sandblaster.lbfgs import LBFGSSettings, minimize
from mpisgd.sandblaster.state import LBFGSState
from mpisgd.sandblaster.vector_program import LocalWorkspace

SETTINGS = LBFGSSettings(history=4, gradient_tolerance=1e-9, max_iterations=60)
START = np.array([-1.2, 1.0, -0.5, 0.8, 1.5])


def fun(v):
    return rosen(v), rosen_der(v)


class Stop(Exception):
    pass


def stopped_after(iteration):
    """Run until ``iteration``, then stop as a preempted coordinator does: (workspace, last state)."""
    workspace, states = LocalWorkspace(fun, START), []

    def callback(record):
        if record.iteration == iteration:
            raise Stop

    with pytest.raises(Stop):
        minimize(workspace, SETTINGS, callback=callback, on_state=states.append)
    return workspace, states[-1]


def test_the_uninterrupted_run_is_long_enough():
    result = minimize(LocalWorkspace(fun, START), SETTINGS)
    assert result.iterations > 20 and result.stopped != "max_iterations"


@pytest.mark.parametrize("iteration", [0, 1, 3, 4, 5, 12, 20])
def test_resumed_after_any_iteration_it_ends_bitwise_as_uninterrupted(iteration):
    uninterrupted = LocalWorkspace(fun, START)
    expected = minimize(uninterrupted, SETTINGS)
    workspace, state = stopped_after(iteration)
    saved = json.loads(json.dumps(state.to_json()))  # the checkpoint's metadata
    restored = LBFGSState.from_json(saved, history=SETTINGS.history)
    resumed = LocalWorkspace(fun, START)
    resumed.vectors = {name: copy.deepcopy(workspace.vectors[name]) for name in restored.vector_names}
    result = minimize(resumed, SETTINGS, start=restored)
    assert np.array_equal(resumed.vectors["x"], uninterrupted.vectors["x"])
    assert (result.iterations, result.objective, result.stopped, result.function_evaluations) == \
        (expected.iterations, expected.objective, expected.stopped, expected.function_evaluations)
    assert [r.iteration for r in result.history] == list(range(iteration + 1, expected.iterations + 1))


def test_resumed_at_the_iteration_that_converged_it_stops_there():
    expected = minimize(LocalWorkspace(fun, START), SETTINGS)
    workspace, state = stopped_after(expected.iterations)
    resumed = LocalWorkspace(fun, START)
    resumed.vectors = {name: workspace.vectors[name] for name in state.vector_names}
    result = minimize(resumed, SETTINGS, start=state)
    assert (result.iterations, result.stopped) == (expected.iterations, expected.stopped)
    assert resumed.evaluations == 0


def test_a_state_of_another_history_length_is_refused():
    _, state = stopped_after(6)
    with pytest.raises(ConfigError, match="--history 7"):
        LBFGSState.from_json(state.to_json(), history=7)


def test_resumed_at_a_starting_point_that_already_met_the_gradient_tolerance_it_stops_there():
    """Iteration 0 has no previous objective: the gradient test alone decides, as in a fresh run."""
    minimum = np.ones_like(START)  # Rosenbrock's minimizer: the gradient is exactly zero there
    states: list = []
    expected = minimize(LocalWorkspace(fun, minimum), SETTINGS, on_state=states.append)
    assert (expected.iterations, expected.stopped) == (0, "gradient_tolerance")
    resumed = LocalWorkspace(fun, minimum)
    result = minimize(resumed, SETTINGS, start=states[-1])
    assert (result.iterations, result.stopped, result.message) == (0, "gradient_tolerance", expected.message)
    assert resumed.evaluations == 0
