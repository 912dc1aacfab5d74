"""The MPI-free half of Sandblaster L-BFGS: vector commands, two-loop recursion, strong-Wolfe line
search and the optimizer on one process, each checked against an independent reference."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize as scipy_minimize
from scipy.optimize import rosen, rosen_der

from mpisgd.sandblaster.lbfgs import (
    LBFGSSettings,
    NonFiniteObjectiveError,
    minimize,
    two_loop_coefficients,
    two_loop_direction,
)
from mpisgd.sandblaster.line_search import strong_wolfe_line_search
from mpisgd.sandblaster.vector_program import LocalWorkspace, combine_partials, run_program


def curvature_pairs(rng, n, k):
    """k pairs (s, y = A s) of a random SPD matrix A, so s.y > 0 as along a real L-BFGS path."""
    root = rng.standard_normal((n, n))
    a = root @ root.T + n * np.eye(n)
    s = [rng.standard_normal(n) for _ in range(k)]
    return s, [a @ v for v in s]


def bfgs_inverse_hessian(s_history, y_history):
    """H from the explicit BFGS update H+ = (I - rho s y')H(I - rho y s') + rho s s', H0 = gamma I."""
    n = len(s_history[0])
    s_last, y_last = s_history[-1], y_history[-1]
    h = np.eye(n) * (s_last @ y_last) / (y_last @ y_last)
    for s, y in zip(s_history, y_history):
        rho = 1.0 / (y @ s)
        left = np.eye(n) - rho * np.outer(s, y)
        h = left @ h @ left.T + rho * np.outer(s, s)
    return h


@pytest.mark.parametrize("pairs", [1, 3, 7])
def test_two_loop_matches_explicit_bfgs_matrix(pairs):
    rng = np.random.default_rng(pairs)
    s, y = curvature_pairs(rng, 12, pairs)
    g = rng.standard_normal(12)
    expected = -bfgs_inverse_hessian(s, y) @ g
    np.testing.assert_allclose(two_loop_direction(g, s, y), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pairs", [0, 1, 4, 10])
def test_gram_coefficients_give_the_two_loop_direction(pairs):
    rng = np.random.default_rng(10 + pairs)
    s, y = curvature_pairs(rng, 30, pairs)
    g = rng.standard_normal(30)
    base = s + y + [g]
    gram = np.array([[a @ b for b in base] for a in base])
    coefficients = two_loop_coefficients(gram, pairs)
    direction = sum(c * v for c, v in zip(coefficients, base))
    np.testing.assert_allclose(direction, two_loop_direction(g, s, y), rtol=1e-9, atol=1e-12)


def test_vector_commands_on_shards_equal_whole_vectors():
    rng = np.random.default_rng(0)
    whole = {"a": rng.standard_normal(10), "b": rng.standard_normal(10)}
    shards = [{k: v[lo:hi].copy() for k, v in whole.items()} for lo, hi in ((0, 3), (3, 7), (7, 10))]
    program = [("axpy", 0.5, "a", "b"), ("scale", -2.0, "a"), ("copy", "b", "c"),
               ("combine", "d", ((1.5, "a"), (-1.0, "c"))), ("mul", "e", "d", "b"),
               ("dot", "d", "e"), ("max_abs", "e")]
    expected = combine_partials(program, [run_program(whole, program)])
    got = combine_partials(program, [run_program(shard, program) for shard in shards])
    assert got == pytest.approx(expected, rel=1e-13)
    assert np.allclose(np.concatenate([shard["e"] for shard in shards]), whole["e"])
    assert expected[1] == np.max(np.abs(whole["e"]))
    with pytest.raises(ValueError, match="unknown vector command 'norm'"):
        run_program(whole, [("norm", "a")])


# ---- line search -------------------------------------------------------------------------------

def line(fun, grad, x, d):
    def phi(alpha):
        point = x + alpha * d
        return fun(point), float(grad(point) @ d)
    return phi


def assert_strong_wolfe(result, f0, slope0, c1=1e-4, c2=0.9):
    assert result.status == "wolfe"
    assert result.f <= f0 + c1 * result.alpha * slope0
    assert abs(result.slope) <= c2 * abs(slope0)


@pytest.mark.parametrize("first_step", [1e-4, 0.3, 1.0, 50.0])
def test_line_search_on_a_quadratic_meets_strong_wolfe(first_step):
    a = np.diag([1.0, 10.0, 100.0])
    fun, grad = (lambda x: 0.5 * x @ a @ x), (lambda x: a @ x)
    x = np.array([1.0, 1.0, 1.0])
    d = -grad(x)
    phi = line(fun, grad, x, d)
    f0, slope0 = phi(0.0)
    result = strong_wolfe_line_search(phi, f0, slope0, first_step, c2=0.1)
    assert_strong_wolfe(result, f0, slope0, c2=0.1)
    exact = (d @ d) / (d @ a @ d)  # exact minimizer along d; c2=0.1 forces a step close to it
    assert abs(result.alpha - exact) < 0.2 * exact


@pytest.mark.parametrize("start", [(-1.2, 1.0), (0.0, 0.0), (2.0, 2.0)])
def test_line_search_on_rosenbrock_meets_strong_wolfe(start):
    x = np.array(start)
    d = -rosen_der(x)
    phi = line(rosen, rosen_der, x, d)
    f0, slope0 = phi(0.0)
    result = strong_wolfe_line_search(phi, f0, slope0, 1.0)
    assert_strong_wolfe(result, f0, slope0)
    assert result.evaluations <= 20


def test_line_search_backs_off_from_non_finite_values():
    # finite only for alpha < 0.01: the first steps overflow and must be cut back
    def phi(alpha):
        if alpha >= 0.01:
            return math.inf, math.nan
        return (alpha - 0.005) ** 2, 2 * (alpha - 0.005)
    result = strong_wolfe_line_search(phi, 0.005 ** 2, -0.01, 1.0)
    assert result.moved and result.alpha < 0.01 and result.f < 0.005 ** 2
    everywhere_nan = strong_wolfe_line_search(lambda alpha: (math.nan, math.nan), 1.0, -1.0, 1.0)
    assert everywhere_nan.status == "nonfinite" and not everywhere_nan.moved


def test_line_search_rejects_an_ascent_direction():
    with pytest.raises(ValueError, match="descent direction"):
        strong_wolfe_line_search(lambda a: (0.0, 0.0), 0.0, 1.0, 1.0)


# ---- the optimizer -----------------------------------------------------------------------------

def softmax_objective(x, y, classes, weight_decay):
    """Mean cross-entropy of softmax regression + (wd/2)||W||^2 (bias not penalized); flat
    parameters are W (classes x features, row-major) then b, as torch's Linear stores them."""
    n, features = x.shape
    onehot = np.eye(classes)[y]

    def fun(theta):
        w = theta[:classes * features].reshape(classes, features)
        b = theta[classes * features:]
        logits = x @ w.T + b
        shift = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - shift).sum(axis=1, keepdims=True)) + shift
        p = np.exp(logits - log_z)
        f = -(onehot * (logits - log_z)).sum() / n + 0.5 * weight_decay * (w * w).sum()
        grad_w = (p - onehot).T @ x / n + weight_decay * w
        grad_b = (p - onehot).sum(axis=0) / n
        return f, np.concatenate([grad_w.ravel(), grad_b])
    return fun, classes * features + classes


def test_minimize_matches_scipy_on_softmax_regression():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 8))
    y = rng.integers(0, 3, 200)
    fun, size = softmax_objective(x, y, 3, 1e-2)
    x0 = 0.1 * rng.standard_normal(size)
    reference = scipy_minimize(fun, x0, jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-15})
    records = []
    workspace = LocalWorkspace(fun, x0)
    result = minimize(workspace, LBFGSSettings(history=5, gradient_tolerance=1e-8, max_iterations=200),
                      callback=records.append)
    assert result.stopped in ("gradient_tolerance", "objective_tolerance", "line_search")
    assert abs(result.objective - reference.fun) <= 1e-9 * abs(reference.fun)
    assert [r.iteration for r in records] == list(range(result.iterations + 1))
    assert np.all(np.diff([r.objective for r in records]) < 0)
    assert workspace.evaluations == result.function_evaluations
    assert fun(workspace.vectors["x"])[0] == pytest.approx(result.objective, rel=1e-14)


def test_minimize_rosenbrock_and_stops():
    def fun(v):
        return rosen(v), rosen_der(v)
    result = minimize(LocalWorkspace(fun, np.array([-1.2, 1.0, -0.5, 0.8])),
                      LBFGSSettings(history=10, gradient_tolerance=1e-7, objective_tolerance=0.0,
                                    max_iterations=500))
    assert result.objective < 1e-12 and result.stopped in ("gradient_tolerance", "line_search")
    capped = minimize(LocalWorkspace(fun, np.array([-1.2, 1.0])), LBFGSSettings(max_iterations=3))
    assert capped.stopped == "max_iterations" and capped.iterations == 3
    at_minimum = minimize(LocalWorkspace(fun, np.ones(3)))
    assert at_minimum.stopped == "gradient_tolerance" and at_minimum.iterations == 0


def test_minimize_reports_non_finite_objective_clearly():
    with pytest.raises(NonFiniteObjectiveError, match="starting point"):
        minimize(LocalWorkspace(lambda v: (math.nan, v), np.ones(2)))
    calls = []

    def fun(v):  # finite at the start, NaN at every step tried after it
        calls.append(1)
        return (float(v @ v), 2 * v) if len(calls) == 1 else (math.nan, v * math.nan)
    with pytest.raises(NonFiniteObjectiveError, match="not finite at every step"):
        minimize(LocalWorkspace(fun, np.ones(2)))


# ---- Sandblaster shard bookkeeping (the shard's logic with a recording stand-in for MPI) -----------

class RecordingComm:
    """Records what a shard sends instead of sending it."""

    def __init__(self):
        self.sent = []

    def send(self, obj, dest, tag):
        self.sent.append((obj, dest, tag))

    def Isend(self, buffer, dest, tag):
        self.sent.append((np.array(buffer), dest, tag))
        return type("Done", (), {"Test": lambda self: True})()


def gradient_message(pass_id, portion, values):
    return np.concatenate([[float(pass_id), float(portion)], values])


def test_shard_adds_each_portion_exactly_once_in_id_order():
    from mpisgd.sandblaster.protocol import Tag
    from mpisgd.sandblaster.shard import VectorShard

    comm = RecordingComm()
    x = np.array([1.0, -2.0, 3.0, 0.5])
    shard = VectorShard(comm, coordinator=9, initial=x, decay_mask=np.array([1.0, 1.0, 0.0, 0.0]),
                        weight_decay=0.5, num_samples=10, num_portions=3, worker_timeout=5.0)
    shard._answer_pull(7, 1)  # before "begin" of pass 1 reached the shard: deferred, then answered
    assert comm.sent == []
    shard._command(("begin", 1, "x", []))
    assert comm.sent[-1][1:] == (7, Tag.PARAMETERS) and comm.sent[-1][0][:2].tolist() == [1.0, 1.0]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(4) * 10.0 ** k for k in range(3)]
    for portion in (2, 0, 0, 1, 2):  # out of order, with two backup copies
        shard._accept_gradient(gradient_message(1, portion, grads[portion]))
    shard._accept_gradient(gradient_message(0, 1, grads[1] + 1))  # a slow copy of an earlier pass
    shard._command(("end", 1, "g", [("dot", "g", "g")]))
    shard._try_end()
    kind, pass_id, missing, (regularizer, partials, stats) = comm.sent[-1][0]
    assert (kind, pass_id, missing) == ("end", 1, [])
    assert stats == {"accepted": 3, "duplicates": 2, "stale": 1}
    expected = ((grads[0] + grads[1]) + grads[2]) / 10 + 0.5 * np.array([1.0, 1.0, 0.0, 0.0]) * x
    assert np.array_equal(shard.vectors["g"], expected)  # bitwise: id order, whatever the arrival order
    assert regularizer == pytest.approx(0.25 * (1.0 + 4.0))
    assert partials == [pytest.approx(float(expected @ expected))]
    shard._accept_gradient(gradient_message(1, 0, grads[0]))  # after "end": too late, not added
    assert np.array_equal(shard.vectors["g"], expected) and shard.stale == 1
    shard._answer_pull(8, 1)  # the point stays available until the next pass (re-runs of missing portions)
    assert comm.sent[-1][0][:2].tolist() == [1.0, 1.0]
    shard._command(("begin", 2, "x", []))
    shard._answer_pull(8, 1)  # pass 1 is over: the worker is told so and drops its portion
    assert comm.sent[-1][0].tolist() == [1.0, 0.0]


def test_shard_refuses_a_portion_counted_twice_and_reports_missing_ones():
    from mpisgd.errors import CommError
    from mpisgd.sandblaster.shard import VectorShard

    comm = RecordingComm()
    shard = VectorShard(comm, coordinator=9, initial=np.zeros(2), decay_mask=np.ones(2), weight_decay=0.0,
                        num_samples=4, num_portions=2, worker_timeout=0.0)
    shard._command(("begin", 1, "x", []))
    shard._accept_gradient(gradient_message(1, 1, np.ones(2)))
    shard._command(("end", 1, "g", []))
    shard._try_end()  # portion 0 never came and the timeout (0 s) is over: reported, not waited for
    assert comm.sent[-1][0] == ("end", 1, [0], None)
    shard._accept_gradient(gradient_message(1, 0, np.ones(2)))
    shard.current.contributions[1] += 1  # what a double count would look like
    shard._command(("end", 1, "g", []))
    with pytest.raises(CommError, match=r"portions \[1\] were added \[2\] times"):
        shard._try_end()


class SimulatedClock:
    """Time that passes only when the code under test sleeps (or the test says so): deterministic."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class SimulatedWorkers:
    """The coordinator rank's communicator, with workers simulated on a simulated clock: ``delays[w]`` is
    how long worker w takes per portion (None: it never answers); ``drop_first`` workers answer their
    first portion with ok=0 (a pass-over reply from a shard)."""

    def __init__(self, delays, drop_first=()):
        self.clock = SimulatedClock()
        self.delays, self.drop_first = delays, set(drop_first)
        self.inbox = []  # (ready at, worker, [pass, portion, loss, ok])
        self.busy_until = dict.fromkeys(delays, 0.0)
        self.assignments = []

    def send(self, message, dest, tag):
        self.assignments.append((dest, message))
        delay = self.delays[dest]
        if message[0] == "stop" or delay is None:
            return
        pass_id, portion = message[0], message[1]
        ok = 0.0 if dest in self.drop_first else 1.0
        self.drop_first.discard(dest)
        done = max(self.clock(), self.busy_until[dest]) + delay  # FIFO, one portion at a time
        self.busy_until[dest] = done
        self.inbox.append((done, dest, [pass_id, portion, float(portion) + 0.5, ok]))

    def _ready(self, source, tag):
        from mpi4py import MPI

        from mpisgd.sandblaster.protocol import Tag
        now = self.clock()
        for item in sorted(self.inbox):
            if item[0] <= now and tag in (Tag.RESULT, MPI.ANY_TAG) and source in (item[1], MPI.ANY_SOURCE):
                return item
        return None

    def Iprobe(self, source, tag, status):
        item = self._ready(source, tag)
        if item is not None:
            status.source, status.tag = item[1], tag
        return item is not None

    def Recv(self, buffer, source, tag):
        item = self._ready(source, tag)
        self.inbox.remove(item)
        buffer[:] = item[2]


def scheduler(comm, **options):
    from mpisgd.sandblaster.protocol import Portions
    from mpisgd.sandblaster.scheduler import PortionScheduler
    settings = {"backup_tasks": True, "worker_timeout": 5.0, **options}
    return PortionScheduler(comm, workers=(2, 3), portions=Portions(80, 10), clock=comm.clock,
                            sleep=comm.clock.sleep, **settings)


def test_scheduler_reissues_the_portions_of_a_silent_worker():
    comm = SimulatedWorkers({2: 0.001, 3: None})
    plan = scheduler(comm, backup_tasks=False, worker_timeout=0.2)
    losses = plan.run_pass(1, range(8))
    assert sorted(losses) == list(range(8)) and all(losses[k] == k + 0.5 for k in losses)
    counters = plan.take_counters()
    assert plan.lost == {3} and counters["workers_lost"] == 1 and counters["reissued_portions"] == 2
    assert counters["portions_per_worker"] == {"2": 8, "3": 0}
    assert plan.run_pass(2, range(8)).keys() == set(range(8))  # the lost worker gets nothing more
    assert {dest for dest, message in comm.assignments if message[0] == 2} == {2}


def test_scheduler_backs_up_a_straggler_and_drops_the_late_copy():
    comm = SimulatedWorkers({2: 0.002, 3: 1.0})
    plan = scheduler(comm)
    start = comm.clock()
    assert plan.run_pass(1, range(8)).keys() == set(range(8))
    assert comm.clock() - start < 0.8  # did not wait for the straggler's portions (1 s each)
    counters = plan.take_counters()
    assert counters["backup_portions"] >= 1 and counters["accepted_losses"] == 8
    assert counters["portions_per_worker"] == {"2": 8, "3": 0}  # every copy of the straggler's lost the race
    comm.clock.sleep(1.0)
    plan.run_pass(2, range(8))  # the straggler's late answers to pass 1 arrive now: dropped as stale
    assert plan.take_counters()["stale_results"] >= 1


def test_scheduler_hands_out_again_a_portion_dropped_as_stale():
    comm = SimulatedWorkers({2: 0.001, 3: 0.001}, drop_first=[2])
    plan = scheduler(comm, backup_tasks=False)
    assert plan.run_pass(1, range(8)).keys() == set(range(8))
    assert plan.take_counters()["reissued_portions"] == 1
