"""All-reduce correctness against the MPI library's own MPI_Allreduce (the independent reference).

Runs inside an MPI job at any size: expectations are derived from COMM_WORLD.size, and the
reference is computed with mpi4py directly on COMM_WORLD, never with mpisgd.
"""

import hashlib

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpisgd
from mpisgd import CommError, ConfigError
from mpisgd.comm import policy
from mpisgd.comm.algorithms import ALGORITHMS as ALGORITHM_REGISTRY
from mpisgd.errors import SharedConfigError

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
_NODE = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
ONE_NODE = _NODE.Get_size() == P
EQUAL_NODES = len(set(WORLD.allgather(_NODE.Get_size()))) == 1
NODE_LEADER = _NODE.bcast(RANK, root=0)  # names this rank's node
# shm serves one node; hier needs the same number of ranks on every node (both refuse otherwise, tested below)
ALGORITHMS = ["rhd", "ring", *(["shm"] if ONE_NODE else []), *(["hier"] if EQUAL_NODES else []), "native", "auto"]
LENGTHS = sorted({0, 1, max(P - 1, 0), P + 1, 7, 1_000_003})
MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def rank_data(n, dtype, salt=0):
    """Different data on every rank, reproducible."""
    rng = np.random.default_rng(1000 * RANK + 17 * n + salt)
    if np.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, size=n).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def reference(x: np.ndarray, op: str) -> np.ndarray:
    """MPI_Allreduce of the same data; half precision reduced in float64, then rounded."""
    work = x.astype(np.float64) if x.dtype == np.float16 else x.copy()
    out = np.empty_like(work)
    WORLD.Allreduce(work, out, op=MPI_OPS["sum" if op == "mean" else op])
    if op == "mean":
        out = out / P
    return out


def assert_same_on_every_rank(arr: np.ndarray):
    digests = WORLD.allgather(hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())
    assert all(d == digests[0] for d in digests), "ranks hold different bits"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "float16"])
def test_numpy_sum_matches_mpi_allreduce(algorithm, n, dtype):
    x = rank_data(n, dtype)
    result = mpisgd.allreduce(x, algorithm=algorithm)
    assert result.dtype == x.dtype and result.shape == x.shape and result is not x
    expected = reference(x, "sum")
    if dtype.startswith("int"):
        np.testing.assert_array_equal(result, expected)
    elif dtype == "float16":  # summed in float32, rounded once to float16
        np.testing.assert_allclose(result.astype(np.float64), expected, rtol=2e-3, atol=2e-3 * P)
    else:
        np.testing.assert_allclose(result, expected, rtol=1e-5 * P, atol=1e-5 * P)
    assert_same_on_every_rank(result)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["max", "min", "mean"])
def test_ops_matches_mpi_allreduce(algorithm, op):
    x = rank_data(1001, "float64", salt=3)
    result = mpisgd.allreduce(x, op, algorithm=algorithm)
    np.testing.assert_allclose(result, reference(x, op), rtol=1e-12, atol=1e-12)
    assert_same_on_every_rank(result)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16])
def test_torch_matches_mpi_allreduce(algorithm, dtype):
    base = rank_data(P + 1, "float64", salt=5)
    t = torch.from_numpy(base * (100 if not dtype.is_floating_point else 1)).to(dtype)
    before = t.clone()
    result = mpisgd.allreduce(t, algorithm=algorithm)
    assert isinstance(result, torch.Tensor) and result.dtype == dtype and result.device == t.device
    assert torch.equal(t, before), "out-of-place allreduce modified its input"
    expected = reference(t.to(torch.float64).numpy(), "sum")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6) * P
    np.testing.assert_allclose(result.to(torch.float64).numpy(), expected, rtol=tol, atol=tol)
    assert_same_on_every_rank(result.to(torch.float64).numpy())


@pytest.mark.parametrize("algorithm", ["rhd", "ring"])
@pytest.mark.parametrize("segment_bytes", [8, 24])
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16"])
def test_reduce_steps_in_pieces_match_mpi_allreduce(algorithm, segment_bytes, dtype):
    """Pieces of 1-6 elements: many pieces, a short last one, and half-vectors one element longer
    on one side of an exchange than on the other (the two must still cut alike)."""
    config = mpisgd.AllreduceConfig(segment_bytes=segment_bytes)
    with mpisgd.Communicator(config=config) as comm:
        for n in sorted({*LENGTHS, 2 * P + 1, 1001} - {1_000_003}):
            x = rank_data(n, dtype, salt=5)
            result = comm.allreduce(x, algorithm=algorithm)
            expected = reference(x, "sum")
            if dtype == "int64":
                np.testing.assert_array_equal(result, expected)
            else:
                tolerance = 2e-3 if dtype == "float16" else 1e-5
                np.testing.assert_allclose(result.astype(np.float64), expected, rtol=tolerance * P,
                                           atol=tolerance * P)
            assert_same_on_every_rank(result)


def test_half_precision_accumulates_in_float32():
    # 2048 + 1 + 1 + ... is exactly representable in float32 but every partial sum in float16
    # would round 2049 back to 2048; only a float32 accumulation gives 2048 + (P - 1).
    t = torch.tensor([2048.0 if RANK == 0 else 1.0], dtype=torch.float16)
    mpisgd.allreduce_(t, algorithm="rhd")
    expected = torch.tensor([2048.0 + (P - 1)], dtype=torch.float32).to(torch.float16)
    assert t.item() == expected.item()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_in_place_on_non_contiguous_views(algorithm):
    full = rank_data(40, "float32").reshape(8, 5)
    view = full[:, 1:4]  # not contiguous
    expected_view = reference(np.ascontiguousarray(view), "sum")
    untouched = full[:, 0].copy()
    returned = mpisgd.allreduce_(view, algorithm=algorithm)
    assert returned is view
    np.testing.assert_allclose(view, expected_view, rtol=1e-5 * P, atol=1e-5 * P)
    np.testing.assert_array_equal(full[:, 0], untouched)
    t = torch.from_numpy(rank_data(40, "float32").reshape(8, 5)).t()  # transposed view
    expected_t = reference(np.ascontiguousarray(t.numpy()), "sum")
    mpisgd.allreduce_(t, algorithm=algorithm)
    np.testing.assert_allclose(t.numpy(), expected_t, rtol=1e-5 * P, atol=1e-5 * P)


@pytest.mark.parametrize("bucket_bytes", [64, 1 << 20])
def test_fused_many_matches_per_tensor_reference(bucket_bytes):
    shapes = [(3, 4), (7,), (0,), (2, 2, 2), (1,), ()]
    tensors = [torch.from_numpy(rank_data(int(np.prod(s)), "float32", salt=i)).reshape(s)
               for i, s in enumerate(shapes)]
    tensors.append(torch.from_numpy(rank_data(12, "float32", salt=7)).reshape(4, 3).t())  # transposed view
    tensors += [torch.from_numpy(rank_data(5, "float64", salt=9)), torch.ones(3, dtype=torch.bfloat16) * RANK]
    expected = [reference(t.to(torch.float64).numpy(), "mean") for t in tensors]
    mpisgd.allreduce_many_(tensors, "mean", bucket_bytes=bucket_bytes)
    for t, e in zip(tensors, expected):
        np.testing.assert_allclose(t.to(torch.float64).numpy(), e, rtol=1e-2 if t.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if t.dtype == torch.bfloat16 else 1e-6)


def test_fused_torch_tensors_count_the_write_and_refuse_a_tensor_that_overlaps_itself():
    """CPU tensors are copied in and out of a bucket all at once: the copy out is still torch's own,
    so autograd sees each in-place write (a saved tensor's version) and a tensor whose elements share
    memory is refused as by ``copy_``; tensors that share memory with each other (one given twice,
    views of one buffer) get their mean once, as separate copies would give it."""
    parameter = torch.nn.Parameter(torch.from_numpy(rank_data(6, "float32", salt=1)).reshape(2, 3))
    counts = torch.from_numpy(rank_data(5, "int32", salt=2))
    expected = [reference(parameter.detach().numpy(), "sum"), reference(counts.numpy(), "sum")]
    version = counts._version
    mpisgd.allreduce_many_([parameter, counts], "sum")
    np.testing.assert_allclose(parameter.detach().numpy(), expected[0], rtol=1e-5 * P, atol=1e-5 * P)
    np.testing.assert_array_equal(counts.numpy(), expected[1])
    assert counts._version > version
    saved = torch.ones(4, requires_grad=True)
    product = saved * 2
    out = (product * product).sum()  # saves product for backward
    mpisgd.allreduce_many_([product.detach(), torch.ones(3)], "sum")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    with pytest.raises(RuntimeError, match="single memory location"):
        mpisgd.allreduce_many_([torch.ones(3), torch.zeros(1).expand(4)], "sum")
    twice = torch.from_numpy(rank_data(7, "float32", salt=3))
    buffer = torch.from_numpy(rank_data(8, "float32", salt=4))
    expected = [reference(twice.numpy(), "mean"), reference(buffer.numpy(), "mean")]
    mpisgd.allreduce_many_([twice, twice, buffer[:3], buffer[3:]], "mean")
    for got, want in zip([twice, buffer], expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5 * P, atol=1e-5 * P)
    memory = rank_data(6, "float32", salt=5)  # two tensors over overlapping numpy views: the later one wins
    first, second = torch.from_numpy(memory[:4]), torch.from_numpy(memory[2:])
    means = [reference(memory[:4], "mean"), reference(memory[2:], "mean")]
    mpisgd.allreduce_many_([first, second], "mean")
    np.testing.assert_allclose(memory, np.concatenate([means[0][:2], means[1]]), rtol=1e-5 * P, atol=1e-5 * P)


@pytest.mark.skipif(not ONE_NODE, reason="shm serves one node (across nodes: the hier test)")
@pytest.mark.parametrize("algorithm", ["shm", "auto"])
def test_shared_memory_takes_long_vectors_in_pieces_and_cuts_fused_buckets_to_its_area(algorithm):
    """A 4 KiB area: a 40 KB vector goes through the window in pieces, fused buckets are cut to the
    area and packed straight into it, and a tensor larger than the area takes the copying path."""
    comm = mpisgd.Communicator(config=mpisgd.AllreduceConfig(shm_area_bytes=4096, native_below_bytes=0,
                                                             shm_below_bytes=1 << 30))
    assert comm.choose_algorithm(1 << 20) == ("native" if P == 1 else "shm")
    check_window_path(comm, algorithm)
    comm.free()


def test_auto_runs_what_the_policy_table_says_at_this_process_count(monkeypatch):
    """The communicator asks the table with its own layout, and runs the algorithm the table names:
    sizes on both sides of every threshold of the table (no numbers pinned here)."""
    comm = mpisgd.Communicator(config=mpisgd.AllreduceConfig(native_below_bytes=None, shm_below_bytes=None,
                                                             shared_memory=True))
    situation = comm.situation
    assert situation.size == P and (situation.nodes is policy.Nodes.ONE) == ONE_NODE
    assert situation.library is policy.detect_library(MPI.Get_library_version())
    limits = {situation.bytes_of(band.below) for rule in policy.RULES for band in rule.bands if band.below}
    sizes = sorted({4, *(n + d for n in limits for d in (-4, 0) if n + d > 0)})
    ran = []
    for name, algorithm in ALGORITHM_REGISTRY.items():
        monkeypatch.setattr(algorithm, "allreduce_", lambda *args, name=name, run=algorithm.allreduce_:
                            (ran.append(name), run(*args))[1])
    for nbytes in sizes:
        expected = policy.choose(situation, policy.Request(nbytes))
        assert comm.choose_algorithm(nbytes) == expected
        assert comm.choose_algorithm(nbytes, host=False) == policy.choose(situation, policy.Request(nbytes, False))
        ran.clear()
        x = rank_data(nbytes // 4, "float32", salt=nbytes % 97)
        np.testing.assert_allclose(comm.allreduce(x), reference(x, "sum"), rtol=1e-5 * P, atol=1e-5 * P)
        assert ran == [expected], (nbytes, ran)
    # what was measured, whatever the thresholds: one rank never leaves MPI's own, GPU buffers never use
    # the window, single vectors never go through it for power-of-two counts
    chosen = {comm.choose_algorithm(n) for n in sizes}
    assert chosen == {"native"} if P == 1 else "native" in chosen
    assert not {comm.choose_algorithm(n, host=False) for n in sizes} & {"shm", "hier"}
    if P & (P - 1) == 0:
        assert "shm" not in chosen
    comm.free()


def check_window_path(comm, algorithm):
    """With a 4 KiB window: a 40 KB vector (in pieces) and fused buckets of several sizes and dtypes
    match MPI_Allreduce and are bitwise identical on every rank."""
    x = rank_data(10_001, "float32", salt=11)
    result = comm.allreduce(x, algorithm=algorithm)
    np.testing.assert_allclose(result, reference(x, "sum"), rtol=1e-5 * P, atol=1e-5 * P)
    assert_same_on_every_rank(result)
    for op in ("max", "min"):
        np.testing.assert_array_equal(comm.allreduce(x, op, algorithm=algorithm), reference(x, op))
    tensors = [torch.from_numpy(rank_data(n, "float32", salt=n)) for n in (300, 5, 700, 2500, 1, 0)]
    tensors.append(torch.from_numpy(rank_data(900, "float64", salt=2)))
    expected = [reference(t.numpy(), "mean") for t in tensors]
    comm.allreduce_many_(tensors, "mean", algorithm=algorithm)
    for t, e in zip(tensors, expected):
        np.testing.assert_allclose(t.numpy(), e, rtol=1e-5 * P, atol=1e-6 * P)
        assert_same_on_every_rank(t.numpy())


@pytest.mark.parametrize("short", ["every node", "the first node only"])
def test_too_little_shared_memory_is_an_error_for_shm_and_auto_goes_around_it(monkeypatch, short):
    """1 MiB of /dev/shm: on every node, or (across nodes, with hier on) on the first node only,
    which must refuse the window on every node alike (a node using it alone would hang the others)."""
    if short == "the first node only" and ONE_NODE:
        pytest.skip("needs several nodes")
    lacking = short == "every node" or NODE_LEADER == 0
    monkeypatch.setattr("mpisgd.comm.shm._free_shared_memory", lambda: 1 << 20 if lacking else 1 << 50)
    comm = mpisgd.Communicator(config=mpisgd.AllreduceConfig(hierarchical=True))
    x = rank_data(300_000, "float32", salt=4)
    if EQUAL_NODES:
        with pytest.raises(SharedConfigError, match="/dev/shm"):  # exit 2 under `mpisgd`, on every rank
            comm.allreduce(x, algorithm="shm" if ONE_NODE else "hier")
    for _ in range(2):  # auto: the same shortage seen on every rank, so all go around it together
        np.testing.assert_allclose(comm.allreduce(x), reference(x, "sum"), rtol=1e-5 * P, atol=1e-5 * P)
        tensors = [torch.from_numpy(rank_data(200_000, "float32", salt=s)) for s in range(3)]
        expected = [reference(t.numpy(), "sum") for t in tensors]
        comm.allreduce_many_(tensors)
        for t, e in zip(tensors, expected):
            np.testing.assert_allclose(t.numpy(), e, rtol=1e-5 * P, atol=1e-5 * P)
    assert not comm.shm_for_fusion and comm.shm_below_bytes == 0 and not comm.hierarchical
    comm.free()


def test_hierarchical_all_reduce_across_nodes():
    """Across nodes (tests/test_mpi_suites.py makes them with MPICH's MPIR_CVAR_NUM_CLIQUES, which
    splits one machine into nodes for MPI): ``hier`` sums each node
    through its window and the node sums across nodes; ``auto`` takes it for large vectors and every
    fused bucket. With unequal nodes it is refused on every rank, and auto goes around it."""
    # native_below_bytes=0: even the small blocks cross the nodes with rhd or ring, not MPI_Allreduce
    comm = mpisgd.Communicator(config=mpisgd.AllreduceConfig(shm_area_bytes=4096, native_below_bytes=0,
                                                             hierarchical=True))
    multi_node = comm.num_nodes > 1
    usable = multi_node and comm.uniform_nodes and comm.local_size > 1
    assert comm.hierarchical == usable
    assert (comm.choose_algorithm(8 << 20) == "hier") == usable
    if multi_node:
        with pytest.raises(ConfigError, match="one node"):
            comm.allreduce(np.ones(3, np.float32), algorithm="shm")
    algorithms = ["auto", "hier"] if comm.uniform_nodes else ["auto"]
    if not comm.uniform_nodes:
        with pytest.raises(ConfigError, match="same number of ranks"):
            comm.allreduce(np.ones(3, np.float32), algorithm="hier")
    for algorithm in algorithms:
        check_window_path(comm, algorithm)
    comm.free()


def test_broadcast_matches_root():
    x = rank_data(11, "float32")
    root_values = WORLD.bcast(x.copy() if RANK == P - 1 else None, root=P - 1)
    mpisgd.broadcast_(x, root=P - 1)
    np.testing.assert_array_equal(x, root_values)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown op"):
        mpisgd.allreduce(np.ones(3), "product")
    with pytest.raises(ConfigError, match="unknown algorithm"):
        mpisgd.allreduce(np.ones(3), algorithm="tree")
    with pytest.raises(ConfigError, match="not supported"):
        mpisgd.allreduce(np.ones(3, dtype=np.complex64))
    with pytest.raises(ConfigError, match="floating"):
        mpisgd.allreduce(np.ones(3, dtype=np.int32), "mean")
    with pytest.raises(ConfigError, match="read-only"):
        ro = np.ones(3)
        ro.flags.writeable = False
        mpisgd.allreduce_(ro)
    with pytest.raises(ConfigError, match="numpy array, torch tensor"):
        mpisgd.allreduce([1.0, 2.0])


@pytest.mark.skipif(P == 1, reason="a mismatch needs two ranks")
def test_settings_that_differ_between_ranks_are_an_error_on_every_rank():
    """They decide which collectives run (MPISGD_* variables set on one node only, say)."""
    config = mpisgd.AllreduceConfig(shm_area_bytes=8192 if RANK == P - 1 else 4096)
    with pytest.raises(ConfigError, match=rf"settings differ between ranks \(shm_area_bytes; ranks {P - 1} "):
        mpisgd.Communicator(config=config)
    mpisgd.Communicator(config=mpisgd.AllreduceConfig(yield_when_waiting="1" if RANK else "0")).free()  # free


@pytest.mark.skipif(P == 1, reason="a mismatch needs two ranks")
@pytest.mark.parametrize("what", ["shape", "dtype", "op"])
def test_mismatched_calls_raise_same_error_on_every_rank(what):
    shape = (5,) if (what == "shape" and RANK == 1) else (4,)
    dtype = "float64" if (what == "dtype" and RANK == 1) else "float32"
    op = "max" if (what == "op" and RANK == 1) else "sum"
    with pytest.raises(CommError) as info:
        mpisgd.allreduce(np.ones(shape, dtype=dtype), op)
    message = str(info.value)
    assert what in message and "ranks 1" in message
    assert len(set(WORLD.allgather(message))) == 1, "ranks raised different messages"
    # and the communicator is still usable afterwards
    np.testing.assert_array_equal(mpisgd.allreduce(np.ones(2)), np.full(2, float(P)))


def test_user_communicator_and_free():
    sub = WORLD.Split(color=RANK % 2, key=RANK)
    comm = mpisgd.Communicator(sub)
    assert comm.size == sub.Get_size() and comm.rank == sub.Get_rank()
    assert comm.mpi != sub  # a duplicate, never the user's own communicator
    x = np.full(3, float(RANK))
    expected = sum(r for r in range(P) if r % 2 == RANK % 2)
    np.testing.assert_array_equal(mpisgd.allreduce(x, comm=sub), np.full(3, float(expected)))
    comm.free()
    with pytest.raises(RuntimeError, match="after free"):
        comm.allreduce(x)
    sub.Free()


def test_node_local_ranks_partition_the_world():
    comm = mpisgd.get_communicator()
    # a node is what MPI's shared-memory split says: a host, or a "clique" of one (tests/test_mpi_suites.py)
    layout = WORLD.allgather(((MPI.Get_processor_name(), NODE_LEADER), comm.local_rank, comm.local_size))
    hosts = {}
    for host, local_rank, local_size in layout:
        hosts.setdefault(host, []).append((local_rank, local_size))
    for entries in hosts.values():
        assert sorted(r for r, _ in entries) == list(range(len(entries)))
        assert all(s == len(entries) for _, s in entries)
    assert comm.num_nodes == len(hosts)


def test_raise_together_reaches_every_rank():
    error = ConfigError("shard unreadable") if RANK == P - 1 else None
    with pytest.raises(ConfigError, match=f"rank {P - 1}.*shard unreadable"):
        mpisgd.get_communicator().raise_together(error)


def test_oversubscribed_counts_the_cores_of_the_node_ranks_together(monkeypatch):
    """A launcher that binds each rank to a core of its own (Open MPI's default) is not oversubscription:
    the node's cores are the union of its ranks' affinities. Here each rank is made to see one core, its
    own local rank's: one rank per core, on any machine, whatever the launcher binds."""
    import os

    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {local.Get_rank()})
    with mpisgd.Communicator() as comm:
        assert not comm.oversubscribed
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # every rank on core 0
    with mpisgd.Communicator() as comm:
        assert comm.oversubscribed == (local.Get_size() > 1)
    local.Free()
