"""The mismatch check carried in a small all-reduce's message (mpisgd.comm.agreement), under mpiexec -n 1..4.

Results are compared with MPI's own MPI_Allreduce on COMM_WORLD (the independent reference); a call's
collectives are counted by the watchdog's sequence number (one per MPI collective entered). The
mismatches below are the ones that, sent as payloads of different layouts, hang MPICH (counts on both
sides of its algorithm switch) or abort it (float32 against float64): each must instead be the same
clear error on every rank, and leave the communicator usable.
"""

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpisgd
from mpisgd import CommError
from mpisgd.comm.agreement import CARRY_BELOW_BYTES

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
MPI_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
needs_two = pytest.mark.skipif(P == 1, reason="a mismatch needs two ranks")


def rank_data(n, dtype, salt=0):
    rng = np.random.default_rng(100 * RANK + n + salt)
    if np.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, size=n).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def reference(x, op):
    out = np.empty_like(x)
    WORLD.Allreduce(x, out, op=MPI_OPS[op])
    return out / P if op == "mean" else out


def order_free(dtype, op):
    """Whether MPI's result cannot depend on the order it combines the ranks' values in."""
    return np.dtype(dtype).kind != "f" or op in ("max", "min") or P <= 2


def assert_equals_mpi(actual, x, op, rounded_to_eps=0.0):
    """``actual`` is MPI_Allreduce's reduction of each rank's ``x``: bitwise where the order does not
    matter, else within twice the float summation bound (P - 1) eps sum|x|. MPI fixes no order, and
    Open MPI's nonblocking all-reduce adds three ranks' values in another order than its blocking one
    (measured: 3 ulps apart at p = 3). ``rounded_to_eps``: the eps of a narrower dtype the result was
    rounded to afterwards (half a unit of it either way)."""
    actual, expected = np.asarray(actual, dtype=np.float64), reference(x, op).astype(np.float64)
    if order_free(x.dtype, op):
        np.testing.assert_array_equal(actual, expected)
        return
    # in whatever order MPI added, every rank must hold the same bits
    assert len(set(WORLD.allgather(np.ascontiguousarray(actual).tobytes()))) == 1, "ranks hold different sums"
    magnitude = reference(np.abs(x), op).astype(np.float64)
    bound = 2 * (P - 1) * np.finfo(x.dtype).eps * magnitude + rounded_to_eps * np.abs(expected)
    assert np.all(np.abs(actual - expected) <= bound), np.max(np.abs(actual - expected) - bound)


def collectives_of(comm, call):
    """How many collectives ``call()`` entered on ``comm``."""
    before = comm.watchdog.sequence
    call()
    return comm.watchdog.sequence - before


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("op", ["sum", "max", "min", "mean"])
@pytest.mark.parametrize("n", [1, 7, 1024])
def test_repeated_small_allreduce_is_one_collective_and_equals_mpi(dtype, op, n):
    if op == "mean" and dtype.startswith("int"):
        pytest.skip("mean needs a floating dtype")
    comm = mpisgd.get_communicator()
    x = rank_data(n, dtype, salt=1)
    first = x.copy()
    mpisgd.allreduce_(first, op)  # the layout becomes this call's (signature alone, then the payload)
    for salt in (2, 3):  # every call of the same kind after it: the payload travels with its check
        x = rank_data(n, dtype, salt=salt)
        reduced = x.copy()
        assert collectives_of(comm, lambda r=reduced: mpisgd.allreduce_(r, op)) == 1
        assert_equals_mpi(reduced, x, op)
    assert_equals_mpi(first, rank_data(n, dtype, salt=1), op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_torch_tensors_through_the_carried_check_equal_mpi(dtype):
    base = torch.from_numpy(rank_data(33, "float64", salt=4) * (1 if dtype.is_floating_point else 100)).to(dtype)
    for _ in range(2):
        t = base.clone()
        mpisgd.allreduce_(t)
        reduced_in = np.float32 if dtype.is_floating_point else np.int64  # half precision: summed in float32
        x = base.to(torch.float64).numpy().astype(reduced_in)
        if order_free(reduced_in, "sum"):
            expected = torch.from_numpy(reference(x, "sum")).to(dtype).double()
            np.testing.assert_array_equal(t.to(torch.float64).numpy(), expected)
        else:
            assert_equals_mpi(t.to(torch.float64).numpy(), x, "sum", rounded_to_eps=torch.finfo(dtype).eps)


def test_large_messages_and_other_algorithms_keep_the_separate_check():
    comm = mpisgd.get_communicator()
    large = np.ones(CARRY_BELOW_BYTES // 4, dtype=np.float32)
    small = np.ones(16, dtype=np.float32)
    for _ in range(2):
        assert collectives_of(comm, lambda: mpisgd.allreduce_(large)) == (2 if P > 1 else 1)
        assert collectives_of(comm, lambda: mpisgd.allreduce_(small, algorithm="ring")) == (2 if P > 1 else 1)
    np.testing.assert_array_equal(small, np.full(16, float(P) ** 2))


# rank 1's call differs in one field; each after an agreed call that made the layout 1024 float32 sums
MISMATCHES = {
    "shape": lambda: mpisgd.allreduce_(np.ones(300 if RANK == 1 else 1024, dtype=np.float32)),  # hangs MPICH
    "dtype": lambda: mpisgd.allreduce_(np.ones(1024, dtype=np.float64 if RANK == 1 else np.float32)),  # aborts it
    "op": lambda: mpisgd.allreduce_(np.ones(1024, dtype=np.float32), "max" if RANK == 1 else "sum"),
    "call": lambda: (mpisgd.broadcast_(np.ones(1024, dtype=np.float32)) if RANK == 1
                     else mpisgd.allreduce_(np.ones(1024, dtype=np.float32))),
}


@needs_two
@pytest.mark.parametrize("what", sorted(MISMATCHES))
def test_mismatch_after_a_carried_call_is_the_same_error_on_every_rank(what):
    layout = np.ones(1024, dtype=np.float32)
    mpisgd.allreduce_(layout)
    mpisgd.allreduce_(layout)  # carried
    with pytest.raises(CommError) as info:
        MISMATCHES[what]()
    message = str(info.value)
    assert f"{what} differs" in message and "ranks 1" in message, message
    assert len(set(WORLD.allgather(message))) == 1, "ranks raised different messages"
    x = rank_data(1024, "float32", salt=9)
    reduced = x.copy()
    mpisgd.allreduce_(reduced)  # the communicator is still usable, and carries again
    assert_equals_mpi(reduced, x, "sum")


@needs_two
def test_a_failed_check_leaves_the_callers_array_untouched():
    x = np.full(64, float(RANK), dtype=np.float32)
    mpisgd.allreduce_(x.copy())
    mpisgd.allreduce_(x.copy())
    y = np.full(64, float(RANK), dtype=np.float32)
    with pytest.raises(CommError, match="op differs"):
        mpisgd.allreduce_(y, "min" if RANK == 0 else "sum")
    np.testing.assert_array_equal(y, np.full(64, float(RANK), dtype=np.float32))


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_the_steady_state_equals_mpi_for_half_precision_and_every_memory_layout(op):
    """A numpy array carried before takes the steady state (agreement.py); float16 is reduced in float32
    and rounded once, as MPI's float32 reduction of the ranks' float16 values rounded to float16; a
    non-contiguous view of the same dtype and shape takes it too (only its own elements are written), and
    a read-only array is refused, untouched."""
    x = rank_data(64, "float16", salt=10)

    def assert_reduced(reduced):
        if order_free(np.float32, op):
            np.testing.assert_array_equal(reduced, reference(x.astype(np.float32), op).astype(np.float16))
        else:
            assert_equals_mpi(reduced.astype(np.float32), x.astype(np.float32), op,
                              rounded_to_eps=float(np.finfo(np.float16).eps))

    for _ in range(3):  # the layout's call, the first carried one, then the steady state
        reduced = x.copy()
        mpisgd.allreduce_(reduced, op)
        assert_reduced(reduced)
    strided = np.zeros(128, dtype=np.float16)
    strided[::2] = x
    mpisgd.allreduce_(strided[::2], op)
    assert_reduced(strided[::2])
    np.testing.assert_array_equal(strided[1::2], 0)  # only the view's elements were written
    frozen = x.copy()
    frozen.flags.writeable = False
    with pytest.raises(mpisgd.ConfigError, match="read-only"):
        mpisgd.allreduce_(frozen, op)
    np.testing.assert_array_equal(frozen, x)


def test_alternating_shapes_and_more_layouts_than_get_a_persistent_request_equal_mpi(monkeypatch):
    """Every shape change moves the layout; past PERSISTENT_LAYOUTS layouts the messages are
    nonblocking all-reduces instead of persistent ones, alike on every rank."""
    from mpisgd.comm import agreement

    monkeypatch.setattr(agreement, "PERSISTENT_LAYOUTS", 2)
    comm = mpisgd.Communicator()
    try:
        for round_ in range(3):
            for n in (5, 6, 7, 5):
                x = rank_data(n, "float64", salt=20 + round_)
                reduced = x.copy()
                comm.allreduce_(reduced)
                assert_equals_mpi(reduced, x, "sum")
        messages = list(comm._agreement._messages.values())
        overflow = comm._agreement._overflow
        if P > 1:  # the signature-only layout and n=5 kept, persistent; n=6, then n=7, only the latest kept
            assert [m.request is not None for m in messages] == [True, True]
            assert overflow is not None and overflow.layout.elements == 7 and overflow.request is None
    finally:
        comm.free()
    assert all(m.request is None for m in messages), "free() left persistent requests"
