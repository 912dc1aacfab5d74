"""Server update rules and DC-ASGD's delay compensation against values computed by hand."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpisgd.downpour.delay_compensation import DelayCompensation
from mpisgd.downpour.rules import AdagradRule, SGDRule, make_rule
from mpisgd.errors import ConfigError

G = np.array([0.5, -2.0, 0.0, 4.0], dtype=np.float32)
W = np.array([1.0, 1.0, -1.0, 0.5], dtype=np.float32)


def test_sgd_subtracts_lr_times_gradient():
    rule = SGDRule(4, lr=0.1)
    params = W.copy()
    rule.apply(params, G.copy(), slice(0, 4))
    np.testing.assert_allclose(params, [0.95, 1.2, -1.0, 0.1], rtol=1e-6)


def test_adagrad_per_parameter_rate_and_state_on_the_shard():
    rule = AdagradRule(4, lr=0.1, eps=1e-8)
    params = W.copy()
    rule.apply(params, G.copy(), slice(0, 4))
    # first step: G = g^2, so the step is lr * g / |g| = lr * sign(g) (0 where g = 0)
    np.testing.assert_allclose(params, [0.9, 1.1, -1.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(rule.state["sum_of_squares"], [0.25, 4.0, 0.0, 16.0])
    second = np.array([0.5, 1.0, 3.0, 0.0], dtype=np.float32)
    rule.apply(params, second.copy(), slice(0, 4))
    squares = np.array([0.5, 5.0, 9.0, 16.0])
    expected = np.array([0.9, 1.1, -1.0, 0.4]) - 0.1 * second / (np.sqrt(squares) + 1e-8)
    np.testing.assert_allclose(params, expected, rtol=1e-6)
    np.testing.assert_allclose(rule.state["sum_of_squares"], squares)


def test_rules_work_chunk_by_chunk_like_the_server():
    whole, chunked = AdagradRule(4, lr=0.3), AdagradRule(4, lr=0.3)
    a, b = W.copy(), W.copy()
    for _ in range(3):
        whole.apply(a, G.copy(), slice(0, 4))
        for where in (slice(0, 1), slice(1, 3), slice(3, 4)):
            chunked.apply(b[where], G[where].copy(), where)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.state["sum_of_squares"], chunked.state["sum_of_squares"])


def test_dc_constant_lambda():
    dc = DelayCompensation(4, lam=0.5)
    w_pulled = np.array([0.0, 2.0, 1.0, 0.0], dtype=np.float32)
    compensated = dc.compensate(G, W, w_pulled)
    # g + lambda * g * g * (w_now - w_pulled)
    expected = [0.5 + 0.5 * 0.25 * 1.0, -2.0 + 0.5 * 4.0 * -1.0, 0.0, 4.0 + 0.5 * 16.0 * 0.5]
    np.testing.assert_allclose(compensated, expected, rtol=1e-6)
    np.testing.assert_array_equal(G, [0.5, -2.0, 0.0, 4.0])  # the input is left alone
    np.testing.assert_array_equal(dc.compensate(G, W, W), G)  # no delay: no correction
    assert np.array_equal(DelayCompensation(4, lam=0.0).compensate(G, W, w_pulled), G)


def test_dc_adaptive_lambda_follows_the_mean_square():
    m, lam0, eps = 0.9, 0.2, 1e-7
    dc = DelayCompensation(4, lam=lam0, variant="adaptive", momentum=m, eps=eps)
    w_pulled = np.array([0.0, 2.0, 1.0, 0.0], dtype=np.float32)
    delta = W.astype(np.float64) - w_pulled
    g1 = G.astype(np.float64)
    mean_square = (1 - m) * g1 ** 2  # MeanSquare_1 = m * 0 + (1 - m) g^2
    expected1 = g1 + lam0 / np.sqrt(mean_square + eps) * g1 ** 2 * delta
    out = np.empty(4, dtype=np.float32)
    result = dc.compensate(G, W, w_pulled, out=out)
    assert result is out
    np.testing.assert_allclose(out, expected1, rtol=1e-5)
    g2 = np.array([1.0, 1.0, 2.0, -1.0])
    mean_square = m * mean_square + (1 - m) * g2 ** 2
    expected2 = g2 + lam0 / np.sqrt(mean_square + eps) * g2 ** 2 * delta
    np.testing.assert_allclose(dc.compensate(g2.astype(np.float32), W, w_pulled), expected2, rtol=1e-5)
    np.testing.assert_allclose(dc.mean_square, mean_square, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": -1.0}, "--dc-lambda must be a finite number >= 0"),
    ({"lam": float("nan")}, "--dc-lambda"),
    ({"lam": 0.1, "variant": "quadratic"}, "--dc-variant must be one of constant, adaptive"),
    ({"lam": 0.1, "variant": "adaptive", "momentum": 1.0}, r"--dc-momentum must be in \[0, 1\)"),
])
def test_dc_rejects_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DelayCompensation(4, **kwargs)


def test_dc_rejects_mismatched_shapes():
    with pytest.raises(ConfigError, match="w_now has shape"):
        DelayCompensation(4, lam=0.1).compensate(G, W[:3], W)


def test_make_rule_names_the_valid_rules():
    assert isinstance(make_rule("sgd", 3, lr=0.1), SGDRule)
    assert isinstance(make_rule("adagrad", 3, lr=0.1), AdagradRule)
    with pytest.raises(ConfigError, match="valid: sgd, adagrad"):
        make_rule("adam", 3, lr=0.1)
    with pytest.raises(ConfigError, match="lr must be a positive"):
        make_rule("sgd", 3, lr=0.0)


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="needs Linux autogroup scheduling")
def test_a_server_in_its_own_session_lowers_its_priority_and_its_autogroups():
    """As MPI launchers start ranks: each in a session of its own, where os.nice alone changes nothing
    between ranks (the CPU is shared between autogroups first)."""
    probe = ("import os; from mpisgd.downpour.server import lower_cpu_priority; lower_cpu_priority(7); "
             "print(os.getpriority(os.PRIO_PROCESS, 0)); print(open('/proc/self/autogroup').read().split()[-1])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            start_new_session=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "7"]
    untouched = subprocess.run([sys.executable, "-c", "print(open('/proc/self/autogroup').read().split()[-1])"],
                               capture_output=True, text=True, timeout=60, start_new_session=True)
    assert untouched.stdout.split() == ["0"]  # a new session starts at niceness 0 again


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="needs Linux autogroup scheduling")
def test_a_server_started_in_its_launchers_session_moves_into_one_of_its_own():
    """As Open MPI's launcher starts ranks: each a process-group leader in the launcher's session, where
    os.nice within the one shared autogroup starved the servers. The rank moves into a session of its own,
    leads its process group again (a launcher signalling the group still reaches it), and leaves the
    launcher's autogroup as it was."""
    probe = ("import os; from mpisgd.downpour.server import lower_cpu_priority; lower_cpu_priority(7); "
             "print(os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), "
             "open('/proc/self/autogroup').read().split()[-1])")
    launcher_autogroup = Path("/proc/self/autogroup").read_text()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            preexec_fn=os.setpgrp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "7", "7"]
    assert Path("/proc/self/autogroup").read_text() == launcher_autogroup


# a rank that must stay in its launcher's session: whether it moved, whether it leads its group, whether its
# group is still the one it started in, and its niceness
STAYS = ("import os, subprocess, sys; from mpisgd.downpour.server import lower_cpu_priority; group = os.getpgrp(); "
         "{setup}; lower_cpu_priority(7); "
         "print(os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid(), os.getpgrp() == group, "
         "os.getpriority(os.PRIO_PROCESS, 0))")


def test_a_server_sharing_its_group_with_another_process_stays_in_it():
    """As Slurm starts a step's tasks: task 0 leads a group the other tasks are in. setsid is refused there,
    and the rank ends in its own group again, not in its parent's; its niceness still applies."""
    setup = "other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    probe = STAYS.format(setup=setup) + "; other.kill()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            preexec_fn=os.setpgrp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "7"]


def test_a_server_in_its_launchers_process_group_stays_in_it():
    """A rank that does not lead its process group (another Slurm task; a child of a shell) is tracked by
    that group: it stays in it."""
    result = subprocess.run([sys.executable, "-c", STAYS.format(setup="pass")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True", "7"]
