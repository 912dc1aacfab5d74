"""A push can never write outside its shard: refused pushes leave every shard bitwise untouched.

Runs inside an MPI job of any size (tests/test_mpi_suites.py: 1, 2, 3, 4 ranks): ranks 0..S-1 serve
(S = 1, or 2 from 3 ranks), every rank pushes. Worker ranks open the windows with a layout of more
parameters than the servers' (a worker whose model disagrees with the servers'), so their whole-vector
pushes would overrun the shards; every rank also tries partial pushes out of range. Each server compares
its parameter and accumulation memory, byte for byte, with a copy taken before, and the REFUSED counters
with the number of refusals the ranks report. A final valid push must change the accumulation buffer by
exactly what numpy computes, so the comparison can fail.
"""

import numpy as np
import pytest
from mpi4py import MPI

from mpisgd.downpour import NonFinitePushError, ParameterClient, ParameterServerWindows, Roles, ShardLayout
from mpisgd.downpour.client import PushOutOfShardError, out_of_shard
from mpisgd.downpour.windows import PUSHES, REFUSED, window_array
from mpisgd.errors import ConfigError

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
S = 1 if P < 3 else 2
N = 1001  # odd: shards of different sizes
SERVERS, WORKERS = tuple(range(S)), tuple(range(S, P))
IS_SERVER = RANK in SERVERS


@pytest.fixture
def windows():
    """The servers' layout is N parameters; workers believe in N + 7."""
    layout = ShardLayout(N if IS_SERVER else N + 7, S)
    win = ParameterServerWindows(WORLD, Roles(servers=SERVERS, workers=WORKERS), layout)
    if IS_SERVER:
        shard = SERVERS.index(RANK)
        params = window_array(win.params, np.float32)
        grads = window_array(win.grads[shard], np.float32)
        rng = np.random.default_rng(RANK)
        params[:] = rng.standard_normal(len(params)).astype(np.float32)
        grads[:] = rng.integers(-5, 5, len(grads)).astype(np.float32)
        window_array(win.control, np.int64)[:] = 0  # Win.Allocate's memory is not zeroed (ShardServer does it)
        for window in (win.params, win.grads[shard], win.control):
            window.Sync()
    WORLD.Barrier()
    yield win
    WORLD.Barrier()
    win.free()


def own_memory(win):
    shard = SERVERS.index(RANK)
    win.params.Sync()
    win.grads[shard].Sync()
    return (window_array(win.params, np.float32).copy(), window_array(win.grads[shard], np.float32).copy())


def test_every_rank_knows_what_each_shard_exposes(windows):
    true_layout = ShardLayout(N, S)
    assert windows.exposed == tuple(true_layout.shard_size(s) for s in range(S))


def test_out_of_shard_ranges_are_named():
    assert out_of_shard((10, 5), 0, 0, 10) is None and out_of_shard((10, 5), 1, 4, 1) is None
    assert "outside shard 1, which holds 5" in out_of_shard((10, 5), 1, 4, 2)
    assert "outside shard 0" in out_of_shard((10, 5), 0, -1, 1)
    assert "shard 2 does not exist" in out_of_shard((10, 5), 2, 0, 1)
    assert "must be ints" in out_of_shard((10, 5), 0, 0.5, 1)


def test_refused_pushes_leave_every_shard_bitwise_untouched(windows):
    before = own_memory(windows) if IS_SERVER else None
    WORLD.Barrier()
    client = ParameterClient(windows)
    refused = 0
    attempts = [
        (PushOutOfShardError, lambda: client.push_range(S - 1, windows.exposed[S - 1] - 1, np.ones(2, np.float32))),
        (PushOutOfShardError, lambda: client.push_range(0, -1, np.ones(1, np.float32))),
        (PushOutOfShardError, lambda: client.push_range(S, 0, np.ones(1, np.float32))),
        (PushOutOfShardError, lambda: client.push_range(0, 0, np.ones(windows.exposed[0] + 1, np.float32))),
    ]
    if not IS_SERVER:  # its layout says N + 7: a whole-vector push would overrun a shard
        attempts.append((PushOutOfShardError, lambda: client.push_gradients(np.ones(N + 7, np.float32))))
    for error, attempt in attempts:
        with pytest.raises(error, match="nothing sent"):
            attempt()
        refused += 1
    # refused before any RMA and not counted as out of shard: wrong length, dtype, NaN
    with pytest.raises(ConfigError, match="flat vector"):
        client.push_gradients(np.ones(client.num_params + 1, np.float32))
    with pytest.raises(NonFinitePushError):
        client.push_range(0, 0, np.array([np.nan], np.float32))
    if IS_SERVER:
        gradient = np.ones(N, np.float32)
        gradient[3] = np.inf
        with pytest.raises(NonFinitePushError):
            client.push_gradients(gradient)
    assert client.refused_pushes == refused
    total_refused = WORLD.allreduce(refused, op=MPI.SUM)
    WORLD.Barrier()  # every rank's attempts are over (each flushed what it did send: counters only)
    counters = client.read_counters()
    assert int(counters[:, REFUSED].sum()) == total_refused
    assert int(counters[:, PUSHES].sum()) == 0
    if IS_SERVER:
        after = own_memory(windows)
        for name, old, new in zip(("parameters", "accumulated gradients"), before, after):
            assert old.tobytes() == new.tobytes(), f"refused pushes changed shard {RANK}'s {name}"
    WORLD.Barrier()

    # a valid push does reach the shards, by exactly what numpy says
    if IS_SERVER:
        client.push_gradients(np.full(N, 0.5, np.float32))
        client.push_range(0, 1, np.array([2.0, 4.0], np.float32))
    WORLD.Barrier()
    if IS_SERVER:
        params, grads = own_memory(windows)
        expected = before[1] + np.float32(0.5) * S
        if RANK == SERVERS[0]:
            expected[1:3] += np.float32(2.0 * S), np.float32(4.0 * S)
        assert params.tobytes() == before[0].tobytes()
        np.testing.assert_array_equal(grads, expected)
    assert int(client.read_counters()[:, PUSHES].sum()) == S * S + S  # S whole pushes to S shards, S ranges
