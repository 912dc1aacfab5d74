"""The Horovod negotiation table and the small pure pieces of mpisgd.horovod, in one process.

Several ranks are simulated by feeding one Negotiator per rank the same messages, as the
coordinator's allgather does; every negotiator must reach the same decisions.
"""

import numpy as np
import pytest
import torch

from mpisgd.horovod.torch.compression import Compression
from mpisgd.horovod.torch.executor import adasum_combine, reducescatter_rows, scale_
from mpisgd.horovod.torch.negotiation import Kind, Message, Negotiator, Signature, fusion_plan
from mpisgd.horovod.torch.optimizer import split_list

SIZE = 3


def signature(shape=(4,), dtype="float32", op=1, root=-1, members=(0, 1, 2), kind=Kind.ALLREDUCE, process_set=0):
    return Signature(kind, dtype, shape, op, root, 1.0, 1.0, process_set, members)


def message(*entries, join=False, shutdown=False, clock=0.0):
    return Message(shutdown, join, clock, tuple(entries))


def step_all(negotiators, messages):
    outcomes = [n.step(messages) for n in negotiators]
    assert all([r._replace(extras=None) for r in o.responses] ==
               [r._replace(extras=None) for r in outcomes[0].responses] for o in outcomes)
    return outcomes[0]


def test_out_of_order_names_complete_in_one_agreed_order():
    negotiators = [Negotiator(SIZE) for _ in range(SIZE)]
    a, b = ("a", signature(), None), ("b", signature(), None)
    first = step_all(negotiators, [message(a), message(b), message()])
    assert first.responses == []
    second = step_all(negotiators, [message(b), message(a), message(a, b)])
    assert [r.name for r in second.responses] == ["a", "b"]  # the order names were first seen in
    assert all(r.error is None and r.participants == (0, 1, 2) for r in second.responses)


def test_mismatch_names_fields_and_ranks():
    negotiator = Negotiator(SIZE)
    outcome = negotiator.step([message(("x", signature(), None)), message(("x", signature(shape=(5,)), None)),
                               message(("x", signature(dtype="float64"), None))])
    [response] = outcome.responses
    assert "shape differs (ranks 0,2: (4,); rank 1: (5,))" in response.error
    assert "dtype differs (ranks 0,1: float32; rank 2: float64)" in response.error
    assert response.participants == (0, 1, 2)


def test_cache_ids_replace_names_once_every_rank_knows_them():
    negotiator = Negotiator(2)
    entry = negotiator.encode("grad.w", signature(members=(0, 1)), None)
    assert entry[0] == "grad.w"
    negotiator.step([message(entry), message(entry)])
    cached = negotiator.encode("grad.w", signature(members=(0, 1)), None)
    assert cached == (0, None)
    assert negotiator.encode("grad.w", signature(shape=(9,), members=(0, 1)), None)[0] == "grad.w"
    outcome = negotiator.step([message(cached), message(cached)])
    assert [r.name for r in outcome.responses] == ["grad.w"]
    auto = negotiator.encode("allreduce.noname.3", signature(members=(0, 1)), None)
    negotiator.step([message(auto), message(auto)])
    assert negotiator.encode("allreduce.noname.3", signature(members=(0, 1)), None)[0] == "allreduce.noname.3"


def test_stall_warning_then_failure_name_missing_ranks():
    negotiator = Negotiator(SIZE, stall_check_s=1.0, stall_shutdown_s=3.0)
    negotiator.step([message(("s", signature(), None), clock=0.0), message(), message()])
    assert negotiator.step([message(clock=0.5), message(), message()]).warnings == []
    warned = negotiator.step([message(clock=1.5), message(), message()])
    assert warned.warnings and "missing ranks 1,2" in warned.warnings[0]
    failed = negotiator.step([message(clock=3.5), message(), message()])
    assert "never by ranks 1,2" in failed.responses[0].error and failed.responses[0].participants == (0,)


def test_joined_ranks_take_part_in_allreduces_with_zeros():
    negotiator = Negotiator(SIZE)
    x = ("x", signature(), None)
    outcome = negotiator.step([message(x), message(x), message(join=True)])
    assert outcome.responses[0].joined == (2,) and outcome.last_joined is None
    assert negotiator.step([message(join=True), message(), message()]).last_joined is None
    assert negotiator.step([message(), message(join=True), message()]).last_joined == 1


def test_process_sets_complete_with_their_members_and_names_are_per_set():
    negotiator = Negotiator(SIZE)
    even, odd = signature(members=(0, 2), process_set=1), signature(members=(1,), process_set=2)
    outcome = negotiator.step([message(("x", even, None)), message(("x", odd, None)), message()])
    assert [(r.name, r.signature.process_set) for r in outcome.responses] == [("x", 2)]
    outcome = negotiator.step([message(), message(), message(("x", even, None))])
    assert [(r.name, r.signature.process_set) for r in outcome.responses] == [("x", 1)]


def test_allgather_extras_and_shutdown():
    negotiator = Negotiator(2)
    gather = signature(shape=(3,), kind=Kind.ALLGATHER, op=-1, members=(0, 1))
    outcome = negotiator.step([message(("g", gather, 2)), message(("g", gather, 5), shutdown=True)])
    assert outcome.responses[0].extras == {0: 2, 1: 5} and outcome.shutdown


def test_fusion_plan_groups_compatible_allreduces_under_the_threshold():
    negotiator = Negotiator(1)
    entries = [(f"t{i}", signature(members=(0,), dtype="float16" if i == 2 else "float32"), None) for i in range(5)]
    entries.append(("b", signature(kind=Kind.BROADCAST, root=0, members=(0,)), None))
    responses = negotiator.step([message(*entries)]).responses
    plan = fusion_plan(responses, 32, lambda r: 16)
    assert [[r.name for r in batch] for batch in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["b"]]
    assert [len(b) for b in fusion_plan(responses, 0, lambda r: 16)] == [1] * 6


def test_small_pieces():
    assert reducescatter_rows(7, 3) == [3, 2, 2] and sum(reducescatter_rows(2, 4)) == 2
    assert split_list(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    a = np.array([1.0, 0.0])
    np.testing.assert_allclose(adasum_combine(a, a), a)  # parallel: averaged
    np.testing.assert_allclose(adasum_combine(a, np.array([0.0, 2.0])), [1.0, 2.0])  # orthogonal: added
    t = torch.tensor([5, -5], dtype=torch.int32)
    scale_(t, 0.5)
    assert t.tolist() == [2, -2]  # truncated, as Horovod scales integers
    x = torch.ones(3, dtype=torch.float64)
    compressed, ctx = Compression.fp16.compress(x)
    assert compressed.dtype == torch.float16 and Compression.fp16.decompress(compressed, ctx).dtype == torch.float64
    assert Compression.none.compress(x)[0] is x


def test_not_initialized_is_horovods_value_error():
    import mpisgd.horovod.torch as hvd

    if hvd.is_initialized():
        pytest.skip("initialized by another test")
    with pytest.raises(ValueError, match="hvd.init"):
        hvd.rank()
