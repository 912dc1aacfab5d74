"""The coordinator's one-message cycle (mpisgd.horovod.torch.speculation) under mpiexec -n 1..4.

HOROVOD_CYCLE_TIME is set to 10 s here, so the background thread never runs a cycle during a test:
every cycle is the calling thread's, and the negotiated ones are counted exactly by the negotiator's
cycle number (a speculative cycle that did the work does not negotiate). References are torch on the
inputs gathered with plain mpi4py.
"""

import os

import pytest
import torch
from mpi4py import MPI

import mpisgd.horovod.torch as hvd
from mpisgd.horovod.torch.basics import HorovodInternalError, runtime
from mpisgd.horovod.torch.coordinator import COOLDOWN_CYCLES
from mpisgd.horovod.torch.speculation import IDLE_KEEP, PARTIAL_LIMIT

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
multi_rank = pytest.mark.skipif(P < 2, reason="needs two ranks")


@pytest.fixture(scope="module", autouse=True)
def horovod():
    saved = os.environ.get("HOROVOD_CYCLE_TIME")
    os.environ["HOROVOD_CYCLE_TIME"] = "10000"
    os.environ["MPISGD_HOROVOD_SPECULATION"] = "on"
    hvd.init()
    yield
    hvd.shutdown()
    os.environ.pop("MPISGD_HOROVOD_SPECULATION")
    if saved is None:
        os.environ.pop("HOROVOD_CYCLE_TIME")
    else:
        os.environ["HOROVOD_CYCLE_TIME"] = saved


def negotiated_cycles() -> int:
    return runtime().coordinator.negotiator.cycle


def data(shape, dtype, salt):
    generator = torch.Generator().manual_seed(1000 * RANK + salt)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    return torch.randint(-9, 9, shape, generator=generator).to(dtype)


def reference(tensor, op, postscale=1.0):
    everyone = torch.stack([torch.from_numpy(a).to(torch.float64 if tensor.dtype.is_floating_point else torch.int64)
                            for a in WORLD.allgather(tensor.to(torch.float64 if tensor.dtype.is_floating_point
                                                               else torch.int64).numpy())])
    out = {hvd.Sum: lambda: everyone.sum(0), hvd.Average: lambda: everyone.sum(0) / P,
           hvd.Min: lambda: everyone.min(0).values, hvd.Max: lambda: everyone.max(0).values}[op]()
    return (out * postscale if postscale != 1.0 else out).to(tensor.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                                   torch.int64], ids=str)
@pytest.mark.parametrize("op", [hvd.Sum, hvd.Average, hvd.Min, hvd.Max], ids=["sum", "average", "min", "max"])
def test_repeated_allreduce_is_one_message_and_matches_reference(dtype, op):
    if op == hvd.Average and not dtype.is_floating_point:
        pytest.skip("Horovod's average of integers truncates; covered in test_horovod.py")
    name = f"spec.{dtype}.{op}"
    hvd.allreduce(data((4, 33), dtype, 0), name=name, op=op)  # negotiated: the layout becomes this call's
    start = negotiated_cycles()
    for salt in (1, 2, 3):
        x = data((4, 33), dtype, salt)
        result = hvd.allreduce(x, name=name, op=op, postscale_factor=2.0 if dtype.is_floating_point else 1.0)
        expected = reference(x, op, 2.0 if dtype.is_floating_point else 1.0)
        tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(result, expected, rtol=tolerance, atol=tolerance * P)
        assert torch.equal(x, data((4, 33), dtype, salt))  # input untouched
    # P == 1: the postscale differs from the first call's signature: one more negotiation, then speculated
    assert negotiated_cycles() - start <= 1


def test_grouped_and_in_place_forms_speculate_alike():
    tensors = [data((100,), torch.float32, i) for i in range(5)]
    for _ in range(2):  # the first learns the layout, the second ends the cooldown of the failed speculation
        hvd.grouped_allreduce_([t.clone() for t in tensors], name="spec.grouped", op=hvd.Sum)
    start = negotiated_cycles()
    for _ in range(3):
        work = [t.clone() for t in tensors]
        hvd.grouped_allreduce_(work, name="spec.grouped", op=hvd.Sum)
        for w, t in zip(work, tensors):
            torch.testing.assert_close(w, reference(t, hvd.Sum))
    assert negotiated_cycles() == start


def count_carried_payloads(monkeypatch) -> list:
    """Speculative cycles whose payload travelled apart, after its control block, from now on."""
    executor, carried = runtime().coordinator.executor, []
    run = executor.run_carried
    monkeypatch.setattr(executor, "run_carried", lambda ops: (carried.append(len(ops)), run(ops)))
    return carried


@pytest.mark.parametrize("dtype, op", [(torch.float32, hvd.Average), (torch.float16, hvd.Sum),
                                       (torch.int8, hvd.Sum), (torch.float64, hvd.Max)], ids=str)
def test_a_large_repeated_group_speculates_with_its_control_block_alone(dtype, op, monkeypatch):
    """SPECULATE_BELOW_BYTES and more (here ~100-200 KiB): the control block travels alone and, where every
    rank carried the same, the payload after it through mpisgd's fused all-reduce: no negotiation after
    the first call; results as torch's on the gathered inputs, postscale included."""
    shapes = [(80, 256), (5000,), (7, 9, 11), (1,)]
    name = f"spec.large.{dtype}.{op}"
    postscale = 0.5 if dtype.is_floating_point else 1.0
    for _ in range(2):  # negotiated: the first learns the layout, the second ends the failed speculation's cooldown
        hvd.grouped_allreduce_([data(s, dtype, 0) for s in shapes], name=name, op=op, postscale_factor=postscale)
    start = negotiated_cycles()
    carried = count_carried_payloads(monkeypatch)
    tolerance = {torch.float16: 1e-2}.get(dtype, 1e-5)
    for salt in (1, 2, 3):
        inputs = [data(s, dtype, salt) for s in shapes]
        work = [t.clone() for t in inputs]
        assert hvd.grouped_allreduce_(work, name=name, op=op, postscale_factor=postscale) == work
        for w, t in zip(work, inputs):
            torch.testing.assert_close(w, reference(t, op, postscale), rtol=tolerance, atol=tolerance * P)
    assert negotiated_cycles() == start and carried == [len(shapes)] * 3


def test_large_allreduces_of_one_cycle_keep_their_own_postscales(monkeypatch):
    """One layout may hold operations of different postscales (the layout is elements, dtype and op):
    carried apart, each is scaled by its own, as in the negotiated cycle's fusion plan."""
    x, y = data((9000,), torch.float32, 1), data((11000,), torch.float32, 2)
    carried = None
    for round_ in range(4):  # negotiated twice (the layout, then the cooldown), then speculated
        if round_ == 2:
            start, carried = negotiated_cycles(), count_carried_payloads(monkeypatch)
        handles = [hvd.allreduce_async(x, name="spec.scales.half", op=hvd.Sum, postscale_factor=0.5),
                   hvd.allreduce_async(y, name="spec.scales.one", op=hvd.Sum)]
        torch.testing.assert_close(hvd.synchronize(handles[0]), reference(x, hvd.Sum, 0.5))
        torch.testing.assert_close(hvd.synchronize(handles[1]), reference(y, hvd.Sum))
    assert negotiated_cycles() == start and carried == [2, 2]


def test_a_large_repeated_allreduce_speculates_and_leaves_its_input(monkeypatch):
    x = data((20000,), torch.float32, 3)
    for _ in range(2):
        hvd.allreduce(x, name="spec.large.single", op=hvd.Sum)
    start = negotiated_cycles()
    carried = count_carried_payloads(monkeypatch)
    for salt in (4, 5):
        x = data((20000,), torch.float32, salt)
        torch.testing.assert_close(hvd.allreduce(x, name="spec.large.single", op=hvd.Sum), reference(x, hvd.Sum))
        assert torch.equal(x, data((20000,), torch.float32, salt))
    assert negotiated_cycles() == start and carried == [1, 1]


@pytest.mark.parametrize("elements", [64, 20000], ids=["small", "apart"])
def test_a_cycle_in_which_no_rank_has_work_ends_without_a_negotiation(elements, monkeypatch):
    """Every rank idle: each sends an idle mark in the speculative message, which then ends the cycle (a
    negotiation would decide nothing): no negotiation, no cooldown. A small layout is forgotten after
    IDLE_KEEP such cycles (its idle messages carry the payload's zeros); one travelling apart is kept, so
    the loop's next call still speculates."""
    coordinator = runtime().coordinator
    name = f"spec.idle.{elements}"
    for _ in range(2):
        hvd.allreduce(data((elements,), torch.float32, 1), name=name, op=hvd.Sum)
    start = negotiated_cycles()
    for _ in range(IDLE_KEEP):
        with coordinator._cycle_lock:
            coordinator._cycle()
    assert negotiated_cycles() == start and coordinator._cooldown == 0
    assert (coordinator.speculation.layout is not None) == (elements > 64)
    general = count_general_cycles(monkeypatch)
    x = data((elements,), torch.float32, 2)
    torch.testing.assert_close(hvd.allreduce(x, name=name, op=hvd.Sum), reference(x, hvd.Sum))
    assert negotiated_cycles() - start == (0 if elements > 64 else 1) and len(general) == 1


def manual_cycles(count: int) -> None:
    coordinator = runtime().coordinator
    for _ in range(count):
        with coordinator._cycle_lock:
            coordinator._cycle()


@multi_rank
@pytest.mark.parametrize("elements", [64, 20000], ids=["small", "apart"])
@pytest.mark.parametrize("late_cycles", [1, PARTIAL_LIMIT + 1], ids=["once", "past-the-limit"])
def test_a_rank_that_carried_waits_for_idle_peers_then_they_speculate_together(elements, late_cycles):
    """Rank 0's operation is ready while the others are idle (still computing, as backward passes that
    end at different times): each such cycle ends PARTIAL on every rank, with nothing applied and no
    negotiation or cooldown, and rank 0's operation waits; when the others submit it too, the next
    cycle carries it. Past PARTIAL_LIMIT such cycles in a row, every rank negotiates in the same cycle
    (the stall inspector's path) and the result is the same."""
    coordinator = runtime().coordinator
    name = f"spec.partial.{elements}.{late_cycles}"
    for _ in range(2):
        hvd.allreduce(data((elements,), torch.float32, 1), name=name, op=hvd.Average)
    start = negotiated_cycles()
    x = data((elements,), torch.float32, 2)
    handle = hvd.allreduce_async(x, name=name, op=hvd.Average) if RANK == 0 else None
    manual_cycles(late_cycles)
    negotiated = 0 if late_cycles <= PARTIAL_LIMIT else 1
    assert negotiated_cycles() - start == negotiated
    assert coordinator._cooldown == (0 if not negotiated else COOLDOWN_CYCLES - 1)
    if RANK == 0:
        assert not hvd.poll(handle)
    else:
        handle = hvd.allreduce_async(x, name=name, op=hvd.Average)
    torch.testing.assert_close(hvd.synchronize(handle), reference(x, hvd.Average))
    if not negotiated:
        assert negotiated_cycles() == start  # the cycle after the others submitted carried it


@multi_rank
@pytest.mark.parametrize("late_cycles", [1, 3, PARTIAL_LIMIT + 1], ids=["once", "thrice", "past-the-limit"])
def test_a_synchronous_call_that_meets_idle_peers_waits_for_them_in_step(late_cycles):
    """Rank 0's synchronous call travels alone (Coordinator.allreduce_alone) while the others are idle:
    its message ends PARTIAL there as in their cycles (both paths count the partial cycles alike), the
    call goes on through the general path, and the peers' call carries it; past PARTIAL_LIMIT every
    rank negotiates in the same cycle. Results are torch's on the gathered inputs."""
    name = f"spec.partial.sync.{late_cycles}"
    for _ in range(2):
        hvd.allreduce(data((64,), torch.float32, 1), name=name, op=hvd.Sum)
    start = negotiated_cycles()
    x = data((64,), torch.float32, 3)
    if RANK != 0:
        manual_cycles(late_cycles)
    torch.testing.assert_close(hvd.allreduce(x, name=name, op=hvd.Sum), reference(x, hvd.Sum))
    assert (negotiated_cycles() > start) == (late_cycles > PARTIAL_LIMIT)
    assert runtime().coordinator.speculation._partials == 0  # reset by the carried (or failed) cycle


@multi_rank
@pytest.mark.parametrize("elements", [64, 20000], ids=["small", "apart"])
def test_the_same_layout_in_another_order_is_negotiated_and_correct(elements):
    a, b = data((elements,), torch.float32, 5), data((elements,), torch.float32, 6)
    for order in (("a", "b"), ("a", "b"), ("b", "a") if RANK == P - 1 else ("a", "b")):
        handles = {n: hvd.allreduce_async({"a": a, "b": b}[n], name=f"spec.pair.{elements}.{n}", op=hvd.Sum)
                   for n in order}
        before = negotiated_cycles()
        torch.testing.assert_close(hvd.synchronize(handles["a"]), reference(a, hvd.Sum))
        torch.testing.assert_close(hvd.synchronize(handles["b"]), reference(b, hvd.Sum))
    assert negotiated_cycles() > before  # the last, out-of-order round missed its speculation


@multi_rank
@pytest.mark.parametrize("elements", [256, 20000], ids=["small", "apart"])
@pytest.mark.parametrize("case", ["shape", "dtype", "op"])
def test_mismatch_after_a_speculated_call_raises_on_every_rank(case, elements):
    odd = RANK == P - 1
    name = f"spec.bad.{case}.{elements}"
    for _ in range(2):  # the layout is this name's, the second call speculated
        hvd.allreduce(torch.ones(elements), name=name, op=hvd.Sum)
    shape = (elements + 44 if odd and case == "shape" else elements,)
    dtype = torch.float64 if odd and case == "dtype" else torch.float32
    op = hvd.Max if odd and case == "op" else hvd.Sum
    with pytest.raises(HorovodInternalError) as info:
        hvd.allreduce(torch.ones(shape, dtype=dtype), name=name, op=op)
    message = str(info.value)
    assert len(set(WORLD.allgather(message))) == 1
    assert f"rank {P - 1}" in message and {"shape": "shape", "dtype": "dtype", "op": "reduction op"}[case] in message
    torch.testing.assert_close(hvd.allreduce(torch.ones(2), op=hvd.Sum, name=name), torch.full((2,), float(P)))


def count_general_cycles(monkeypatch) -> list:
    """The coordinator's general cycles from now on (a synchronous call that travels alone runs none)."""
    coordinator, general = runtime().coordinator, []
    cycle = coordinator._cycle
    monkeypatch.setattr(coordinator, "_cycle", lambda *a, **k: (general.append(1), cycle(*a, **k)))
    return general


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                                   torch.int64], ids=str)
def test_repeated_in_place_allreduce_is_one_message_and_matches_reference(dtype, monkeypatch):
    """The synchronous call's own cycle (Coordinator.allreduce_alone: no general cycle runs), through a
    kept numpy view where numpy has the dtype and the tensor owns its memory: a parameter (requires
    grad), fresh tensors at new addresses, and a row of a larger buffer whose neighbours stay as they were."""
    name = f"spec.inplace.{dtype}"
    work = torch.nn.Parameter(data((3, 40), dtype, 0), requires_grad=True) if dtype.is_floating_point \
        else data((3, 40), dtype, 0)
    for _ in range(2):  # negotiated: the first learns the layout, the second ends the failed speculation's cooldown
        hvd.allreduce_(work, name=name, op=hvd.Sum)
    start = negotiated_cycles()
    general = count_general_cycles(monkeypatch)
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    for salt in (1, 2, 3):
        x = data((3, 40), dtype, salt)
        work.data.copy_(x)
        assert hvd.allreduce_(work, name=name, op=hvd.Sum) is work
        torch.testing.assert_close(work.detach(), reference(x, hvd.Sum), rtol=tolerance, atol=tolerance * P)
        fresh = x.clone()  # another address each time
        assert hvd.allreduce_(fresh, name=name, op=hvd.Sum) is fresh
        torch.testing.assert_close(fresh, reference(x, hvd.Sum), rtol=tolerance, atol=tolerance * P)
        rows = torch.stack([data((3, 40), dtype, 50 + salt), x, data((3, 40), dtype, 60 + salt)])
        before = rows.clone()
        hvd.allreduce_(rows[1], name=name, op=hvd.Sum)  # a view into a larger buffer: copied through torch
        torch.testing.assert_close(rows[1], reference(x, hvd.Sum), rtol=tolerance, atol=tolerance * P)
        assert torch.equal(rows[0], before[0]) and torch.equal(rows[2], before[2])
    assert negotiated_cycles() == start and not general


def test_unnamed_repeated_allreduce_speculates_and_names_alike():
    x = data((50,), torch.float64, 7)
    for _ in range(2):
        hvd.allreduce(x, op=hvd.Average)
    start = negotiated_cycles()
    results = [hvd.allreduce(x, op=hvd.Average) for _ in range(3)]
    for result in results:  # each its own tensor, not the message's buffer
        torch.testing.assert_close(result, reference(x, hvd.Average))
    assert len({r.data_ptr() for r in results}) == 3
    assert negotiated_cycles() == start
    handle = hvd.allreduce_async(x, op=hvd.Average)  # the auto-name counters stayed in step
    torch.testing.assert_close(hvd.synchronize(handle), reference(x, hvd.Average))


@multi_rank
@pytest.mark.parametrize("other", ["async", "strided", "async-unnamed"])
@pytest.mark.parametrize("dtype, op", [(torch.float32, hvd.Sum), (torch.float64, hvd.Average), (torch.float16, hvd.Max),
                                       (torch.int64, hvd.Min)], ids=["f32-sum", "f64-average", "f16-max", "i64-min"])
def test_a_rank_off_the_synchronous_path_still_matches(other, dtype, op, monkeypatch):
    """One rank reduces through the general path (an async handle, or a tensor the synchronous path does
    not take) while the others' calls travel alone: its cycle sends the same speculative message, so every
    rank agrees, with the same bits, and no rank negotiates; unnamed, the auto-name counters stay in step."""
    name = None if other == "async-unnamed" else f"spec.mixed.{other}.{dtype}.{op}"
    x = data((8, 16), dtype, 9)
    for _ in range(2):
        hvd.allreduce(x, name=name, op=op)
    start = negotiated_cycles()
    general = count_general_cycles(monkeypatch)
    off_path = RANK == P - 1
    for _ in range(3):
        if off_path and other != "strided":
            result = hvd.synchronize(hvd.allreduce_async(x, name=name, op=op))
        elif off_path:  # the same values, not contiguous: snapshot and submitted
            result = hvd.allreduce(x.t().contiguous().t(), name=name, op=op)
        else:
            result = hvd.allreduce(x, name=name, op=op)
        tolerance = 1e-2 if dtype == torch.float16 else 1e-6
        torch.testing.assert_close(result, reference(x, op), rtol=tolerance, atol=tolerance)
        assert len(set(WORLD.allgather(result.numpy().tobytes()))) == 1
    assert negotiated_cycles() == start
    assert bool(general) == off_path  # the others' calls never ran a general cycle


def test_idle_cycles_between_speculated_calls_do_not_add_up():
    """A small layout is forgotten after IDLE_KEEP idle cycles in a row, not in all: a loop with a
    few idle cycles between its calls keeps speculating."""
    name, x = "spec.idle.between", data((64,), torch.float32, 1)
    for _ in range(2):
        hvd.allreduce(x, name=name, op=hvd.Sum)
    start = negotiated_cycles()
    for _ in range(IDLE_KEEP + 2):
        manual_cycles(IDLE_KEEP - 1)
        torch.testing.assert_close(hvd.allreduce(x, name=name, op=hvd.Sum), reference(x, hvd.Sum))
    assert negotiated_cycles() == start
