"""Which negotiated cycles become the speculative layout (mpisgd.horovod.torch.speculation), with no MPI.

The reduced signature is compared bitwise: a float32 transport holds it exactly only below
mpisgd.comm.agreement.FLOAT32_EXACT_BELOW_RANKS ranks (p * 15**2 < 2**24), computed here independently.
"""

import pytest

from mpisgd.horovod.torch.basics import ReduceOp
from mpisgd.horovod.torch.negotiation import Kind, Response, Signature
from mpisgd.horovod.torch.speculation import SPECULATE_BELOW_BYTES, Speculation, layout_of

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
