"""Where an all-reduce's CPU time goes: user and kernel CPU per call on every rank, for one algorithm.

Run: ``mpiexec -n P python benchmarks/allreduce_cpu.py [--algorithm rhd] [--mib 16] [--buffer numpy|torch]``

Why: with more ranks than cores, wall time is the ranks' CPU time shared over the cores, so the CPU
time is the work there is to cut. Kernel time is mostly MPICH's single-copy transfers between
processes (CMA, ``process_vm_readv``); user time is the reduction, Python and MPI's progress loop.
``--buffer torch`` reduces a torch CPU tensor, which torch backs with 4 KiB pages, where a numpy array
of this size gets transparent huge pages (numpy asks for them; torch only with THP_MEM_ALLOC_ENABLE=1).
``--seconds`` keeps the calls going that long, for a sampling profiler to attach
(``perf record -a -F 2000 -- sleep 5``, then ``perf report --sort dso,symbol``).
"""

import argparse
import os
import resource
import time

import numpy as np
from mpi4py import MPI

from mpisgd import AllreduceConfig, Communicator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="rhd")
    parser.add_argument("--mib", type=int, default=16, help="vector size in MiB (float32)")
    parser.add_argument("--buffer", choices=("numpy", "torch"), default="numpy")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.0, help="then keep calling this long")
    args = parser.parse_args()
    comm = Communicator(config=AllreduceConfig(check_collectives=False))
    n = (args.mib << 20) // 4
    if args.buffer == "torch":
        import torch
        buf = torch.zeros(n, dtype=torch.float32).numpy()
    else:
        buf = np.zeros(n, dtype=np.float32)

    def call() -> None:
        comm.mpi.Barrier()
        comm.allreduce_(buf, algorithm=args.algorithm)

    for _ in range(3):
        call()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.calls):
        call()
    wall = (time.perf_counter() - start) / args.calls
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, kernel = ((getattr(after, field) - getattr(before, field)) / args.calls * 1e3
                    for field in ("ru_utime", "ru_stime"))
    cpu = comm.mpi.gather((user, kernel), root=0)
    wall = comm.mpi.reduce(wall * 1e3, op=MPI.MAX, root=0)
    end = time.perf_counter() + args.seconds
    while comm.mpi.allreduce(time.perf_counter() < end, op=MPI.LAND):
        call()
    if comm.rank == 0:
        cores = len(os.sched_getaffinity(0))
        user_sum, kernel_sum = (sum(c[i] for c in cpu) for i in (0, 1))
        print(f"{args.algorithm}, {args.mib} MiB float32 in a {args.buffer} buffer, {comm.size} ranks on "
              f"{cores} cores: {wall:.2f} ms per call (barrier included); CPU ms per call, all ranks: user "
              f"{user_sum:.2f}, kernel {kernel_sum:.2f}, total / cores {(user_sum + kernel_sum) / cores:.2f}")
    comm.free()


if __name__ == "__main__":
    main()
