"""Which negotiated cycles become the speculative layout (mpisgd.horovod.torch.speculation), with no MPI.

The reduced signature is compared bitwise: a float32 transport holds it exactly only below
mpisgd.comm.agreement.FLOAT32_EXACT_BELOW_RANKS ranks (p * 15**2 < 2**24), computed here independently.
"""

import numpy as np
import pytest

from mpisgd.horovod.torch.basics import ReduceOp
from mpisgd.horovod.torch.negotiation import Kind, Response, Signature
from mpisgd.horovod.torch.speculation import (
    ALL_IDLE,
    CARRIED,
    CONTROL,
    FAILED,
    PARTIAL,
    PARTIAL_LIMIT,
    SPECULATE_BELOW_BYTES,
    Speculation,
    layout_of,
)

EXACT_BELOW = (1 << 24) // 15 ** 2  # the first rank count whose float32 sums of 15**2 are no longer exact


def cycle(dtype):
    signature = Signature(Kind.ALLREDUCE, dtype, (4, 3), int(ReduceOp.SUM), -1, 1.0, 1.0, 0, (0, 1))
    return [Response("grad", signature, {}, None, (0, 1), ())]


@pytest.mark.parametrize("dtype, size, speculates", [
    ("float32", 4, True), ("float32", EXACT_BELOW - 1, True), ("float32", EXACT_BELOW, False),
    ("float16", EXACT_BELOW, False), ("float64", EXACT_BELOW, True), ("int64", 10 * EXACT_BELOW, True)])
def test_a_float32_layout_speculates_only_where_its_signature_is_exact(dtype, size, speculates):
    speculation = Speculation(size)
    speculation.learn(cycle(dtype), traffic=True)
    assert (speculation.layout is not None) == speculates


@pytest.mark.parametrize("nbytes, apart", [(4, False), (SPECULATE_BELOW_BYTES - 4, False), (SPECULATE_BELOW_BYTES, True),
                                           (4 << 20, True)])
def test_from_the_speculation_limit_the_payload_travels_apart_from_the_control_block(nbytes, apart):
    signature = Signature(Kind.ALLREDUCE, "float32", (nbytes // 4,), int(ReduceOp.SUM), -1, 1.0, 1.0, 0, (0, 1))
    layout = layout_of([signature])
    assert layout is not None and layout.elements == nbytes // 4 and layout.apart == apart


def test_a_speculation_without_apart_layouts_negotiates_large_cycles_and_keeps_small_ones():
    """Where ranks outnumber cores ("auto"), a payload of SPECULATE_BELOW_BYTES or more is not speculated."""
    large = Signature(Kind.ALLREDUCE, "float32", (SPECULATE_BELOW_BYTES // 4,), int(ReduceOp.SUM), -1, 1.0, 1.0, 0,
                      (0, 1))
    for apart in (True, False):
        speculation = Speculation(2, apart=apart)
        speculation.learn([Response("grad", large, {}, None, (0, 1), ())], traffic=True)
        assert (speculation.layout is not None) == apart
        speculation.learn(cycle("float32"), traffic=True)
        assert speculation.layout is not None and not speculation.layout.apart


def reduced(blocks: list, op: ReduceOp) -> np.ndarray:
    """What MPI's all-reduce of the ranks' control blocks gives (sum for Sum and Average)."""
    stacked = np.stack(blocks)
    return stacked.max(0) if op == ReduceOp.MAX else stacked.min(0) if op == ReduceOp.MIN else stacked.sum(0)


@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.AVERAGE, ReduceOp.MIN, ReduceOp.MAX])
@pytest.mark.parametrize("ranks, ends", [
    ("cccc", CARRIED), ("iiii", ALL_IDLE), ("ccii", PARTIAL), ("ciii", PARTIAL), ("cciz", FAILED),
    ("cccz", FAILED), ("zzzz", FAILED), ("cxii", PARTIAL), ("cxxx", FAILED)])
def test_every_rank_reads_the_same_ending_from_the_reduced_control_block(op, ranks, ends):
    """4 ranks: c carries the operations, x carries others (another signature), i is idle, z sends zeros.
    Every rank, whatever it sent, reads the same ending; a partial cycle is read only from a sum, which
    counts the ranks (min and max cannot: there it fails, and the cycle negotiates)."""
    speculation = Speculation(4)
    carried = speculation._signature((("grad", "sig"),))
    other = speculation._signature((("grad", "other"),))
    idle = speculation._idle_control(op)
    sent = {"c": carried, "x": other, "i": idle, "z": None}
    head = reduced([np.zeros(CONTROL) if sent[r] is None else sent[r] for r in ranks], op)
    if op in (ReduceOp.MIN, ReduceOp.MAX) and ends == PARTIAL:
        ends = FAILED
    for r in ranks:  # each rank its own state
        assert Speculation(4)._ended(head, sent[r], int(op)) == ends, r


def test_partial_cycles_in_a_row_end_in_a_negotiation_at_the_limit():
    speculation = Speculation(2)
    head = reduced([speculation._signature((("g", "s"),)), speculation._idle_control(ReduceOp.SUM)], ReduceOp.SUM)
    endings = [speculation._ended(head, None, int(ReduceOp.SUM)) for _ in range(2 * PARTIAL_LIMIT + 2)]
    assert endings == ([PARTIAL] * PARTIAL_LIMIT + [FAILED]) * 2


def test_a_carried_cycle_starts_the_count_of_partial_cycles_again():
    speculation = Speculation(2)
    carried = speculation._signature((("g", "s"),))
    partial = reduced([carried, speculation._idle_control(ReduceOp.SUM)], ReduceOp.SUM)
    everyone = reduced([carried, carried], ReduceOp.SUM)
    endings = [speculation._ended(partial, carried, int(ReduceOp.SUM)) for _ in range(PARTIAL_LIMIT - 1)]
    endings.append(speculation._ended(everyone, carried, int(ReduceOp.SUM)))
    endings += [speculation._ended(partial, carried, int(ReduceOp.SUM)) for _ in range(PARTIAL_LIMIT + 1)]
    assert endings == [PARTIAL] * (PARTIAL_LIMIT - 1) + [CARRIED] + [PARTIAL] * PARTIAL_LIMIT + [FAILED]
