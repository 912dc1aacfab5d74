"""The server's take/check/apply path and the client's input checks, on a parameter server of one rank.

Every rank runs its own one-rank server on COMM_SELF (it pushes to and pulls from itself through the
same RMA calls a remote worker uses), so the tests hold at any job size.
"""

import numpy as np
import pytest
from mpi4py import MPI

from mpisgd.downpour import (
    AdagradRule,
    NonFinitePushError,
    ParameterClient,
    ParameterServerWindows,
    Roles,
    SGDRule,
    ShardLayout,
    ShardServer,
)
from mpisgd.downpour.windows import PUSHES, REJECTED, VERSION
from mpisgd.errors import ConfigError

N = 1000


@pytest.fixture
def self_server():
    """Windows, a server of the whole vector (SGD, lr 0.5, chunks of 64) and a client, on COMM_SELF."""
    windows = ParameterServerWindows(MPI.COMM_SELF, Roles(servers=(0,), workers=()), ShardLayout(N, 1))
    server = ShardServer(windows, SGDRule(N, lr=0.5), chunk_elements=64)
    server.initialize(np.arange(N, dtype=np.float32))
    yield windows, server, ParameterClient(windows)
    windows.free()


def pull(client):
    out = np.zeros(N, dtype=np.float32)
    client.pull_parameters(out)
    return out


def test_push_then_update_is_sgd(self_server):
    _, server, client = self_server
    gradient = np.full(N, 2.0, dtype=np.float32)
    assert client.push_gradients(gradient).tolist() == [0]
    client.push_gradients(gradient)
    assert server.pending()
    assert server.serve_once()
    np.testing.assert_array_equal(pull(client), np.arange(N) - 0.5 * 4.0)
    assert not server.pending() and not server.serve_once()
    counters = client.read_counters()[0]
    assert counters[VERSION] == 1 and counters[PUSHES] == 2 and counters[REJECTED] == 0
    assert client.push_gradients(gradient).tolist() == [0]  # pulled after the update: not stale
    server.drain()
    assert client.push_gradients(gradient).tolist() == [1]  # one update since that pull


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros(N - 1, dtype=np.float32), ConfigError, "flat vector of 1000 elements"),
    (np.zeros(N, dtype=np.float64), ConfigError, "dtype float32"),
    (np.zeros((N, 1), dtype=np.float32), ConfigError, "flat vector"),
    (np.zeros(2 * N, dtype=np.float32)[::2], ConfigError, "C-contiguous"),
    ([0.0] * N, ConfigError, "numpy array"),
    (np.where(np.arange(N) == 7, np.nan, 1.0).astype(np.float32), NonFinitePushError, "1 NaN/Inf"),
    (np.full(N, np.inf, dtype=np.float32), NonFinitePushError, "1000 NaN/Inf"),
])
def test_bad_pushes_raise_before_any_rma(self_server, bad, error, message):
    _, server, client = self_server
    with pytest.raises(error, match=message):
        client.push_gradients(bad)
    assert client.read_counters()[0][PUSHES] == 0 and not server.pending()
    assert not server.take_gradients().any(), "something reached the accumulation buffer"
    np.testing.assert_array_equal(pull(client), np.arange(N))


def test_non_finite_sum_in_the_buffer_is_rejected_and_the_shard_kept(self_server):
    windows, server, client = self_server
    # bypass the client's check, as a buggy or foreign writer could
    poison = np.ones(N, dtype=np.float32)
    poison[N - 1] = np.nan
    windows.grads[0].Accumulate([poison, MPI.FLOAT], 0, (0, N, MPI.FLOAT), op=MPI.SUM)
    windows.grads[0].Flush(0)
    client.push_gradients(np.ones(N, dtype=np.float32))
    assert not server.serve_once()
    assert server.rejected == 1 and client.read_counters()[0][REJECTED] == 1
    np.testing.assert_array_equal(pull(client), np.arange(N))
    client.push_gradients(np.ones(N, dtype=np.float32))  # the buffer was reset: training goes on
    assert server.serve_once()
    np.testing.assert_array_equal(pull(client), np.arange(N) - 0.5)


def test_chunked_adagrad_update_equals_one_numpy_update():
    windows = ParameterServerWindows(MPI.COMM_SELF, Roles(servers=(0,), workers=()), ShardLayout(N, 1))
    try:
        server = ShardServer(windows, AdagradRule(N, lr=0.1), chunk_elements=37)
        start = np.linspace(-1, 1, N, dtype=np.float32)
        server.initialize(start)
        client = ParameterClient(windows)
        gradient = np.cos(np.arange(N)).astype(np.float32)
        reference, rule = start.copy(), AdagradRule(N, lr=0.1)
        for _ in range(3):
            client.push_gradients(gradient)
            server.serve_once()
            rule.apply(reference, gradient.copy(), slice(0, N))
        np.testing.assert_array_equal(server.params, reference)
        np.testing.assert_array_equal(server.rule.state["sum_of_squares"], rule.state["sum_of_squares"])
    finally:
        windows.free()


def test_windows_used_after_free_raise():
    windows = ParameterServerWindows(MPI.COMM_SELF, Roles(servers=(0,), workers=()), ShardLayout(3, 1))
    windows.free()
    windows.free()  # idempotent
    with pytest.raises(RuntimeError, match="after free"):
        windows.local_params()
