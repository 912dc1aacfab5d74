"""No lost update: workers push known vectors concurrently while the servers take and apply them.

Runs inside an MPI job of any size: the parameter server is built on the first P ranks for every
P = 2..5 the job has (ranks 0..S-1 serve, the others push), with S = 1 and 2. tests/test_mpi_suites.py
runs it in jobs of 2, 3 and 4 ranks on the shared-memory path; tests/e2e/test_downpour.py in jobs of 5
ranks, on the shared-memory path and with MPIR_CVAR_NOLOCAL=1 (MPICH's network path).

Values are small integers, so every float32 sum is exact and any lost or doubled push shows.
"""

import time

import numpy as np
import pytest
from mpi4py import MPI

from mpisgd.downpour import ParameterClient, ParameterServerWindows, Roles, SGDRule, ShardLayout, ShardServer
from mpisgd.downpour.windows import PUSHES, VERSION

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
NUM_PARAMS = 50_003  # odd: shards of different sizes
PUSHES_PER_WORKER = 100
CHUNK = 4096  # small chunks: many takes interleave with the pushes


def pushed_vector(worker_index: int) -> np.ndarray:
    i = np.arange(NUM_PARAMS)
    return (((i * (worker_index + 3)) % 11) + 1).astype(np.float32)


@pytest.mark.parametrize("size", [2, 3, 4, 5])
@pytest.mark.parametrize("servers", [1, 2])
def test_concurrent_pushes_are_all_applied_exactly(size, servers):
    if size > P or size - servers < 1:
        pytest.skip(f"needs a job of at least {size} ranks, and {servers + 1} for {servers} servers")
    comm = WORLD.Split(0 if RANK < size else MPI.UNDEFINED, RANK)
    if comm == MPI.COMM_NULL:
        return  # not among the first `size` ranks
    try:
        _stress(comm, servers)
    finally:
        comm.Free()


def _stress(comm: MPI.Intracomm, servers: int) -> None:
    rank = comm.Get_rank()
    roles = Roles.assign(comm.Get_size(), servers)
    layout = ShardLayout(NUM_PARAMS, servers)
    windows = ParameterServerWindows(comm, roles, layout)
    workers = len(roles.workers)
    total_pushes = workers * PUSHES_PER_WORKER
    expected = -PUSHES_PER_WORKER * sum(pushed_vector(w).astype(np.float64) for w in range(workers))
    problems = []  # gathered, so that a failure on one rank fails every rank instead of hanging the rest
    try:
        server = None
        if windows.shard is not None:
            rule = SGDRule(layout.shard_size(windows.shard), lr=1.0)
            server = ShardServer(windows, rule, chunk_elements=CHUNK)
            server.initialize(np.zeros(layout.shard_size(windows.shard), dtype=np.float32))
        comm.Barrier()
        client = ParameterClient(windows)
        if server is not None:
            deadline = time.monotonic() + 60
            while server.counters()[PUSHES] < total_pushes and time.monotonic() < deadline:
                if not server.serve_once():
                    server.poll()
            server.drain()
            counters = server.counters()
            if counters[PUSHES] != total_pushes or counters[VERSION] != server.updates:
                problems.append(f"shard {windows.shard}: counters {counters}, {server.updates} updates")
            lost = np.count_nonzero(server.params != expected[layout.shard_slice(windows.shard)])
            if lost:
                problems.append(f"shard {windows.shard}: {lost} elements differ from the exact sum")
        else:
            vector = pushed_vector(roles.worker_index(rank))
            scratch = np.zeros(NUM_PARAMS, dtype=np.float32)
            for k in range(PUSHES_PER_WORKER):
                if k % 10 == 0:
                    client.pull_parameters(scratch)  # reads interleave with the pushes
                staleness = client.push_gradients(vector)
                if staleness.shape != (servers,) or (staleness < 0).any():
                    problems.append(f"staleness {staleness}")
        comm.Barrier()  # servers have applied everything
        pulled = np.zeros(NUM_PARAMS, dtype=np.float32)
        client.pull_parameters(pulled)
        if not np.array_equal(pulled, expected):
            problems.append(f"rank {rank} pulled {np.count_nonzero(pulled != expected)} wrong elements")
        if not (client.read_counters()[:, PUSHES] == total_pushes).all():
            problems.append(f"rank {rank} read push counters {client.read_counters()[:, PUSHES]}")
    finally:
        everything = [p for rank_problems in comm.allgather(problems) for p in rank_problems]
        windows.free()
    assert not everything, "; ".join(everything)
