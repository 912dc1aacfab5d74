"""mpisgd.horovod.torch under mpiexec: every collective against an independent reference.

References are torch computations on inputs gathered with plain mpi4py (``WORLD.allgather``) or MPI's
own collectives, never with the module under test. Every expectation derives from COMM_WORLD's size,
so the file runs at 1, 2, 3 and 4 ranks; error cases assert that every rank raised.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpisgd.horovod.torch as hvd

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
          torch.float64, torch.bfloat16]
OPS = {hvd.Sum: "sum", hvd.Average: "average", hvd.Min: "min", hvd.Max: "max", hvd.Product: "product"}
multi_rank = pytest.mark.skipif(P < 2, reason="needs two ranks")


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    yield
    hvd.shutdown()


def rank_tensor(shape, dtype, rank=RANK, salt=0):
    generator = torch.Generator().manual_seed(1000 * rank + salt)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    return torch.randint(1, 4 if dtype == torch.uint8 else 9, shape, generator=generator).to(dtype)


def gathered(tensor):
    """Every rank's tensor, in rank order, through plain mpi4py."""
    return [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in WORLD.allgather(tensor)]


def reference(tensors, op, dtype):
    wide = torch.float64 if dtype.is_floating_point else torch.int64
    stack = torch.stack([t.to(wide) for t in tensors])
    if op == hvd.Sum:
        out = stack.sum(0)
    elif op == hvd.Average:
        out = (stack.sum(0).double() * (1.0 / len(tensors)))
    elif op == hvd.Min:
        out = stack.min(0).values
    elif op == hvd.Max:
        out = stack.max(0).values
    else:
        out = stack.prod(0)
    return out.to(dtype)


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
    elif expected.dtype.is_floating_point:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(actual, expected)


def every_rank_raised(function, error=hvd.HorovodInternalError):
    """Run ``function``; assert it raised ``error`` on every rank; return this rank's message."""
    try:
        function()
        message = None
    except error as exc:
        message = str(exc)
    everyone = WORLD.allgather(message)
    assert all(m is not None for m in everyone), f"not every rank raised: {everyone}"
    return message


# ---- 1. basics -------------------------------------------------------------------------------
def test_basics_match_mpi():
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    assert hvd.is_initialized() and hvd.size() == P and hvd.rank() == RANK
    assert hvd.local_size() == node.Get_size() and hvd.local_rank() == node.Get_rank()
    leaders = WORLD.allgather((node.bcast(RANK), node.Get_rank()))
    same_local_rank = sorted({leader for leader, local in leaders if local == node.Get_rank()})
    assert hvd.cross_size() == len(same_local_rank) and hvd.cross_rank() == same_local_rank.index(node.bcast(RANK))
    assert hvd.is_homogeneous() == (len(set(WORLD.allgather(node.Get_size()))) == 1)
    node.Free()
    hvd.init()  # idempotent
    assert hvd.size() == P
    assert hvd.mpi_built() and hvd.mpi_enabled() and not hvd.gloo_built() and not hvd.nccl_built()
    assert hvd.mpi_threads_supported() == (MPI.Query_thread() == MPI.THREAD_MULTIPLE)
    assert [int(o) for o in (hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max, hvd.Product)] == [0, 1, 2, 3, 4, 5]
    assert issubclass(hvd.HorovodInternalError, RuntimeError)


# ---- 2. collectives ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allreduce_every_dtype_and_op(dtype):
    x = rank_tensor((3, 5), dtype)
    everyone = gathered(x)
    for op in OPS:
        if op == hvd.Product and dtype.is_floating_point:
            x_small = (x.float().abs() % 2 + 0.5).to(dtype)
            assert_close(hvd.allreduce(x_small, op=op), reference(gathered(x_small), op, dtype))
            continue
        assert_close(hvd.allreduce(x, op=op, name=f"every.{dtype}.{OPS[op]}"), reference(everyone, op, dtype))
    assert torch.equal(x, everyone[RANK])  # input untouched


def test_allreduce_forms_scaling_and_compression():
    x = rank_tensor((64,), torch.float32)
    summed = reference(gathered(x), hvd.Sum, torch.float32)
    assert_close(hvd.allreduce(x, op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0), summed * 1.5)
    with pytest.warns(DeprecationWarning):
        assert_close(hvd.allreduce(x, average=False), summed)
    with pytest.raises(ValueError, match="supersedes"):
        hvd.allreduce(x, average=True, op=hvd.Sum)
    assert_close(hvd.allreduce(x, compression=hvd.Compression.fp16, op=hvd.Sum),
                 reference([t.half() for t in gathered(x)], hvd.Sum, torch.float16).float())
    y = x.clone()
    assert hvd.allreduce_(y, op=hvd.Sum) is y
    assert_close(y, summed)
    handle = hvd.allreduce_async(x, op=hvd.Max)
    while not hvd.poll(handle):
        pass
    assert_close(hvd.synchronize(handle), reference(gathered(x), hvd.Max, torch.float32))
    z = x.clone()
    handle = hvd.allreduce_async_(z, op=hvd.Sum)
    assert hvd.synchronize(handle) is z
    assert_close(z, summed)


def test_grouped_allreduce_and_fusion_of_many():
    tensors = [rank_tensor((7 + i,), torch.float32, salt=i) for i in range(20)]
    expected = [reference(gathered(t), hvd.Average, torch.float32) for t in tensors]
    for actual, want in zip(hvd.grouped_allreduce(tensors), expected):
        assert_close(actual, want)
    copies = [t.clone() for t in tensors]
    hvd.grouped_allreduce_(copies)
    for actual, want in zip(copies, expected):
        assert_close(actual, want)
    handles = [hvd.allreduce_async(t, name=f"fused.{i}") for i, t in enumerate(tensors)]
    for handle, want in zip(handles, expected):
        assert_close(hvd.synchronize(handle), want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float16, torch.float32, torch.bfloat16], ids=str)
def test_allgather_with_different_first_dimensions(dtype):
    x = rank_tensor((RANK + 1, 3), dtype)
    assert_close(hvd.allgather(x), torch.cat(gathered(x)))
    pieces = [rank_tensor((2 * RANK + 1,), dtype, salt=1), rank_tensor((1, 2), dtype, salt=2)]
    for actual, piece in zip(hvd.grouped_allgather(pieces), pieces):
        assert_close(actual, torch.cat(gathered(piece)))
    assert_close(hvd.synchronize(hvd.allgather_async(x)), torch.cat(gathered(x)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.bfloat16], ids=str)
def test_broadcast_from_every_root(dtype):
    x = rank_tensor((4, 2), dtype)
    everyone = gathered(x)
    for root in range(P):
        assert_close(hvd.broadcast(x, root), everyone[root])
        y = x.clone()
        assert hvd.broadcast_(y, root) is y
        assert_close(y, everyone[root])
        assert_close(hvd.synchronize(hvd.broadcast_async(x, root)), everyone[root])
    assert torch.equal(x, everyone[RANK])


def test_alltoall_with_and_without_splits():
    splits = [(RANK + d) % 3 for d in range(P)]
    x = torch.arange(sum(splits) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * RANK
    everyone, all_splits = gathered(x), WORLD.allgather(splits)
    expected = torch.cat([everyone[s][sum(all_splits[s][:RANK]):sum(all_splits[s][:RANK + 1])] for s in range(P)])
    output, received = hvd.alltoall(x, splits=torch.tensor(splits, dtype=torch.int32))
    assert_close(output, expected)
    assert received.tolist() == [all_splits[s][RANK] for s in range(P)]
    even = torch.arange(2 * P, dtype=torch.int64) + 10 * RANK
    expected_even = torch.cat([gathered(even)[s][2 * RANK:2 * RANK + 2] for s in range(P)])
    assert_close(hvd.alltoall(even), expected_even)
    output, received = hvd.synchronize(hvd.alltoall_async(even))
    assert_close(output, expected_even)


@pytest.mark.parametrize("op", [hvd.Sum, hvd.Average])
def test_reducescatter_uneven_rows(op):
    rows = 2 * P + 1
    x = rank_tensor((rows, 3), torch.float32)
    full = reference(gathered(x), op, torch.float32)
    counts = [rows // P + (1 if r < rows % P else 0) for r in range(P)]
    mine = full[sum(counts[:RANK]):sum(counts[:RANK + 1])]
    assert_close(hvd.reducescatter(x, op=op), mine)
    halves = hvd.grouped_reducescatter([x, x.half()], op=op)
    assert_close(halves[0], mine)
    assert_close(halves[1], mine.half())


def test_barrier_and_join():
    hvd.barrier()
    x = torch.full((5,), float(RANK + 1))
    if RANK == P - 1:
        last = hvd.join()
    else:
        result = hvd.allreduce(x, op=hvd.Sum, name="while.joined")
        assert_close(result, torch.full((5,), float(sum(range(1, P)))))  # the joined rank gave zeros
        last = hvd.join()
    everyone = WORLD.allgather(last)
    assert len(set(everyone)) == 1 and 0 <= last < P
    if P > 1:
        assert last != P - 1


# ---- 3. autograd -------------------------------------------------------------------------------
def test_gradients_as_horovod():
    x = rank_tensor((2 * P, 3), torch.float64).requires_grad_()
    upstream = rank_tensor((2 * P, 3), torch.float64, salt=5)
    ups = gathered(upstream)
    (hvd.allreduce(x, op=hvd.Sum) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, sum(ups))

    x.grad = None
    gathered_up = rank_tensor((2 * P * P, 3), torch.float64, salt=6)
    (hvd.allgather(x) * gathered_up).sum().backward()
    mean_up = sum(gathered(gathered_up)) / P
    torch.testing.assert_close(x.grad, mean_up[2 * P * RANK:2 * P * (RANK + 1)])

    x.grad = None
    (hvd.broadcast(x, 0) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, sum(ups) / P if RANK == 0 else torch.zeros_like(x))

    x.grad = None
    out = hvd.alltoall(x)
    (out * upstream).sum().backward()  # the gradient travels back to where each row came from
    back = [u.reshape(P, 2, 3) for u in ups]
    torch.testing.assert_close(x.grad, torch.cat([back[d][RANK] for d in range(P)]))

    x.grad = None
    part = hvd.reducescatter(x, op=hvd.Sum)
    (part * upstream[:part.shape[0]]).sum().backward()
    torch.testing.assert_close(x.grad, torch.cat([u[:part.shape[0]] for u in ups]) * P)


# ---- 4. name matching, errors, stalls --------------------------------------------------------------
def test_out_of_order_submission():
    names = [f"order.{i}" for i in range(6)]
    order = names[RANK % 6:] + names[:RANK % 6]
    if RANK % 2:
        order.reverse()
    tensors = {n: rank_tensor((i + 1,), torch.float32, salt=i) for i, n in enumerate(names)}
    expected = {n: reference(gathered(tensors[n]), hvd.Sum, torch.float32) for n in names}
    handles = {n: hvd.allreduce_async(tensors[n], name=n, op=hvd.Sum) for n in order}
    for n in reversed(order):
        assert_close(hvd.synchronize(handles[n]), expected[n])


def test_name_in_flight_is_a_value_error():
    from mpisgd.horovod.torch.basics import runtime

    with runtime().coordinator._cycle_lock:  # no cycle can complete it meanwhile: deterministic at any size
        handle = hvd.allreduce_async(torch.ones(2), name="busy")
        with pytest.raises(ValueError, match="busy"):
            hvd.allreduce_async(torch.ones(2), name="busy")
    hvd.synchronize(handle)


@multi_rank
@pytest.mark.parametrize("case", ["shape", "dtype", "root", "op"])
def test_mismatch_raises_on_every_rank_naming_ranks(case):
    odd = RANK == P - 1
    if case == "shape":
        call = lambda: hvd.allreduce(torch.ones(3 + odd), name="bad.shape")  # noqa: E731
    elif case == "dtype":
        call = lambda: hvd.allreduce(torch.ones(3, dtype=torch.float64 if odd else torch.float32),  # noqa: E731
                                     name="bad.dtype")
    elif case == "root":
        call = lambda: hvd.broadcast(torch.ones(3), int(odd), name="bad.root")  # noqa: E731
    else:
        call = lambda: hvd.allreduce(torch.ones(3), op=hvd.Max if odd else hvd.Sum, name="bad.op")  # noqa: E731
    message = every_rank_raised(call)
    assert len(set(WORLD.allgather(message))) == 1
    assert f"rank {P - 1}" in message and {"shape": "shape", "dtype": "dtype", "root": "root rank",
                                           "op": "reduction op"}[case] in message
    assert_close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(P)))  # still usable


@multi_rank
def test_stall_inspector_names_missing_ranks(caplog):
    hvd.shutdown()
    os.environ.update(HOROVOD_STALL_CHECK_TIME_SECONDS="0.2", HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="0.6")
    try:
        hvd.init()
        if RANK == 0:
            with caplog.at_level("WARNING"):
                with pytest.raises(hvd.HorovodInternalError, match=f"never by rank{'s' if P > 2 else ''} 1"):
                    hvd.allreduce(torch.ones(1), name="lonely")
            assert any("missing rank" in r.getMessage() and "lonely" in r.getMessage() for r in caplog.records)
        WORLD.Barrier()
    finally:
        del os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"], os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]
        hvd.shutdown()
        hvd.init()
    assert_close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(P)))


@pytest.mark.parametrize("variable, value", [("HOROVOD_CYCLE_TIME", "fast"), ("HOROVOD_CACHE_CAPACITY", "inf"),
                                             ("MPISGD_HOROVOD_SPECULATION", "sometimes")])
def test_a_malformed_setting_on_one_rank_is_the_same_error_on_every_rank(variable, value):
    """Read on the last rank only: the others have nothing wrong to raise about, and must not wait."""
    hvd.shutdown()
    saved = os.environ.get(variable)
    if RANK == P - 1:
        os.environ[variable] = value
    try:
        with pytest.raises(ValueError) as info:
            hvd.init()
    finally:
        os.environ.pop(variable, None)
        if saved is not None:
            os.environ[variable] = saved
    message = str(info.value)
    assert len(set(WORLD.allgather(message))) == 1, "ranks raised different messages"
    assert f"rank {P - 1}: " in message and variable in message and repr(value) in message, message
    assert not hvd.is_initialized()
    hvd.init()
    assert_close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(P)))


# ---- 5. process sets ------------------------------------------------------------------------------
@multi_rank
def test_process_sets():
    evens = hvd.add_process_set(list(range(0, P, 2)))
    odds = hvd.add_process_set(hvd.ProcessSet(list(range(1, P, 2))))
    mine = evens if RANK % 2 == 0 else odds
    members = list(range(RANK % 2, P, 2))
    assert mine.included() and mine.size() == len(members) and mine.rank() == members.index(RANK)
    other = odds if mine is evens else evens
    assert not other.included() and other.rank() == -1
    x = rank_tensor((4,), torch.float32)
    everyone = gathered(x)
    assert_close(hvd.allreduce(x, op=hvd.Sum, process_set=mine),
                 reference([everyone[r] for r in members], hvd.Sum, torch.float32))
    assert_close(hvd.broadcast(x, members[-1], process_set=mine), everyone[members[-1]])  # a global root
    assert_close(hvd.allgather(x, process_set=mine), torch.cat([everyone[r] for r in members]))
    with pytest.raises(ValueError, match="not a member"):
        hvd.allreduce(x, process_set=other)
    assert hvd.remove_process_set(evens) and hvd.remove_process_set(odds)
    assert not hvd.remove_process_set(hvd.global_process_set)


# ---- 6. training helpers --------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_distributed_optimizer_matches_full_batch_sgd():
    model, reference_model = _model(), _model()
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                         named_parameters=model.named_parameters())
    assert isinstance(optimizer, torch.optim.SGD)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        data, target = rank_tensor((6, 4), torch.float32, salt=step), rank_tensor((6, 1), torch.float32, salt=9)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(data), target).backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference_model(torch.cat(gathered(data))), torch.cat(gathered(target))).backward()
        reference_optimizer.step()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_distributed_optimizer_options_and_errors():
    model = _model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="unique"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named + named[:1])
    with pytest.raises(ValueError, match="not named"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named[:1])
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backward_passes_per_step=0)
    for options in ({"backward_passes_per_step": 2}, {"groups": 2}, {"op": hvd.Sum},
                    {"gradient_predivide_factor": 2.0}, {"compression": hvd.Compression.fp16}):
        model = _model()
        optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters(), **options)
        passes = options.get("backward_passes_per_step", 1)
        data = [rank_tensor((3, 4), torch.float32, salt=k) for k in range(passes)]
        for batch in data:
            model(batch).sum().backward()
        optimizer.synchronize()
        scale = P if options.get("op") == hvd.Sum else 1
        reference_model = _model()
        for batch in data:
            reference_model(torch.cat(gathered(batch))).sum().backward()
        for p, q in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad * scale / P, rtol=2e-3, atol=2e-3)
        with optimizer.skip_synchronize():
            optimizer.step()
        optimizer.zero_grad()
    model(data[0]).sum().backward()
    optimizer.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        optimizer.step()


@pytest.mark.parametrize("sparse_as_dense", [False, True])
def test_sparse_gradients(sparse_as_dense):
    torch.manual_seed(1)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(embedding.parameters(), lr=1.0),
                                         named_parameters=embedding.named_parameters(),
                                         sparse_as_dense=sparse_as_dense)
    ids = torch.tensor([RANK % 10, (RANK + 3) % 10, 7])
    embedding(ids).sum().backward()
    optimizer.synchronize()
    dense = torch.zeros(10, 3)
    for rank_ids in gathered(ids):
        dense.index_add_(0, rank_ids, torch.ones(len(rank_ids), 3))
    torch.testing.assert_close(embedding.weight.grad.to_dense(), dense / P)


def test_broadcast_parameters_state_and_objects():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(RANK)
    root_values = [p.detach().clone() for p in model.parameters()] if RANK == 0 else None
    root_values = WORLD.bcast(root_values)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for p, want in zip(model.parameters(), root_values):
        assert torch.equal(p.detach(), want)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 if RANK == 0 else 7, momentum=0.5)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    assert optimizer.param_groups[0]["lr"] == 0.1 and type(optimizer.param_groups[0]["lr"]) is float
    assert hvd.broadcast_object({"rank": RANK, "t": torch.ones(2)} if RANK == 0 else None, 0)["rank"] == 0
    assert hvd.allgather_object(("r", RANK)) == [("r", r) for r in range(P)]


def test_sync_batch_norm_matches_batch_norm_on_the_global_batch():
    torch.manual_seed(2)
    sync, plain = hvd.SyncBatchNorm(3), torch.nn.BatchNorm1d(3)
    x = rank_tensor((4, 3, 2), torch.float64).requires_grad_()
    sync, plain = sync.double(), plain.double()
    upstream = rank_tensor((4, 3, 2), torch.float64, salt=3)
    y = sync(x)
    (y * upstream).sum().backward()
    full = torch.cat(gathered(x.detach())).requires_grad_()
    out = plain(full)
    (out * torch.cat(gathered(upstream))).sum().backward()
    torch.testing.assert_close(y.detach(), out.detach()[4 * RANK:4 * RANK + 4])
    torch.testing.assert_close(x.grad, full.grad[4 * RANK:4 * RANK + 4])
    torch.testing.assert_close(sync.running_mean, plain.running_mean)
    torch.testing.assert_close(sync.running_var, plain.running_var)


def test_shutdown_and_reinit():
    hvd.shutdown()
    assert not hvd.is_initialized()
    with pytest.raises(ValueError, match="not been initialized"):
        hvd.size()
    hvd.init()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(hvd.allreduce(torch.ones(1), op=hvd.Sum), torch.full((1,), float(P)))
