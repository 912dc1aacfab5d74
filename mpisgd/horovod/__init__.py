"""A Horovod-compatible API on top of mpisgd's communicator: ``import mpisgd.horovod.torch as hvd``.

Horovod scripts for PyTorch run unchanged but for that import, with no compile step: the
background coordinator (name-matched negotiation, tensor fusion, mismatch checks, stall inspector)
is written in Python over mpi4py, and the reductions run on mpisgd's all-reduce algorithms.
See ``docs/horovod.rst`` for what is the same, what differs and what is not supported.
"""
