"""Which negotiated cycles become the speculative layout (mpisgd.horovod.torch.speculation), with no MPI.

The reduced signature is compared bitwise: a float32 transport holds it exactly only below
mpisgd.comm.agreement.FLOAT32_EXACT_BELOW_RANKS ranks (p * 15**2 < 2**24), computed here independently.
"""

import pytest

from mpisgd.horovod.torch.basics import ReduceOp
from mpisgd.horovod.torch.negotiation import Kind, Response, Signature
from mpisgd.horovod.torch.speculation import Speculation

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
