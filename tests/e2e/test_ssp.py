"""Bounded staleness (``--max-staleness s``, SSP) for downpour and dcasgd, end to end under mpiexec.

The rule is "no worker starts step t+s+1 before every live worker has finished step t", so the clocks
(steps finished) of two live workers can differ by s+1 at most: the fast one may finish the step it was
allowed to start while the slow one still computes. The coordinator logs that difference on every
metrics line (``worker_clock_spread``), read here. A worker that sleeps a second without entering MPI
(the test-only fault hook) makes the others run ahead without the flag, which the control run shows, so
the bound is what holds them back. A worker hung for good is counted dead after --worker-timeout and no
longer holds anyone.
"""

import pytest
from helpers import mpisgd_command, run_mpi

from mpisgd.metrics import read_metrics

TIMEOUT = 180
FAULT_TIMEOUT = 300
WORKER_TIMEOUT = 20  # far beyond any pause of a live worker (as in test_downpour.py)
PAUSE = {"MPISGD_TEST_WORKER_FAULT": "2:4:sleep:1.5"}  # rank 2 (a worker) pauses 1.5 s at its 4th step




def train(nprocs, data, metrics, *flags, env=None, strategy="downpour", timeout=TIMEOUT):
    train_path, val_path = data
    result = run_mpi(nprocs, [mpisgd_command(), "train", "--strategy", strategy, "--data", str(train_path),
                              "--val", str(val_path), "--batch-size", "8", "--hidden", "16", "--no-progress",
                              "--servers", "1", "--log-every", "1", "--metrics", str(metrics),
                              *map(str, flags)], timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout
    return result, [r for r in read_metrics(metrics) if "worker_clock_spread" in r]


@pytest.mark.parametrize("nprocs", [4, 5])
@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_the_clock_spread_never_exceeds_the_bound(tmp_path, data, nprocs, staleness):
    strategy = "dcasgd" if staleness == 1 else "downpour"
    _, records = train(nprocs, data, tmp_path / "run.jsonl", "--epochs", "6", "--max-staleness", staleness,
                       env=PAUSE, strategy=strategy)
    spreads = [r["worker_clock_spread"] for r in records]
    assert len(spreads) >= 5, records
    assert max(spreads) <= staleness + 1, spreads
    # everybody trained: the shared budget was spent by all workers, the paused one included
    assert all(steps > 0 for steps in records[-1]["worker_steps"]), records[-1]


def test_without_the_bound_the_same_run_drifts_apart(tmp_path, data):
    """The control: the pause alone lets the others run far ahead (so the test above can fail)."""
    _, records = train(4, data, tmp_path / "run.jsonl", "--epochs", "6", env=PAUSE)
    assert max(r["worker_clock_spread"] for r in records) > 3, records


def test_a_dead_worker_does_not_hold_the_others(tmp_path, data):
    """Rank 3 hangs at its 6th step; once counted dead the others finish their share, within the bound
    among themselves."""
    result, records = train(4, data, tmp_path / "run.jsonl", "--epochs", "3", "--max-steps", "96",
                            "--max-staleness", "1", "--worker-timeout", WORKER_TIMEOUT,
                            env={"MPISGD_TEST_WORKER_FAULT": "3:6:sleep:600"}, timeout=FAULT_TIMEOUT)
    assert "worker rank 3: no heartbeat" in result.stdout and "finished after" in result.stdout, result.stdout
    assert records[-1]["dead_workers"] == [3]
    assert records[-1]["worker_steps"] == [96, 96, 6], records[-1]
    assert max(r["worker_clock_spread"] for r in records) <= 2, records
