"""Where the time of one shared-memory all-reduce goes: CPU seconds per phase on every rank.

Run: ``mpiexec -n P python benchmarks/shm_cpu_profile.py [--mib 16] [--calls 30]``

Why CPU time (``time.thread_time``) and not wall time: with more ranks than cores, a rank's wall time
includes the time it waits for a core, which says nothing about the work. The sum of CPU time over
the ranks, divided by the cores, is the least wall time the call can take on this machine, whatever
the synchronization. Phases: copy of the vector into the rank's slot, the reduction of its block
with the two barriers around it, copy of the result out.
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

from mpisgd import AllreduceConfig, Communicator
from mpisgd.comm.shm import SharedMemoryAllreduce


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=16, help="vector size in MiB (float32)")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    comm = Communicator()
    shm = SharedMemoryAllreduce(comm.local, AllreduceConfig().shm_area_bytes, polite=comm.polite)
    n = (args.mib << 20) // 4
    buf = np.full(n, float(comm.rank), dtype=np.float32)
    step = shm.capacity("float32")
    totals = np.zeros(3)

    def one_call(phases: np.ndarray) -> None:
        for start in range(0, n, step):
            piece = buf[start:start + step]
            t0 = time.thread_time()
            np.copyto(shm.slot(len(piece), "float32"), piece)
            t1 = time.thread_time()
            result = shm.reduce(len(piece), "float32", "sum")
            t2 = time.thread_time()
            np.copyto(piece, result)
            phases += (t1 - t0, t2 - t1, time.thread_time() - t2)

    for _ in range(3):  # warm-up: pages of the window and of the buffer mapped
        one_call(np.zeros(3))
    walls = []
    for _ in range(args.calls):
        comm.barrier()
        start = time.perf_counter()
        one_call(totals)
        walls.append(time.perf_counter() - start)
    per_call = comm.mpi.gather(totals / args.calls * 1e3, root=0)
    wall = comm.mpi.reduce(float(np.median(walls)) * 1e3, op=MPI.MAX, root=0)
    if comm.rank == 0:
        cores = len(__import__("os").sched_getaffinity(0))
        print(f"{args.mib} MiB float32, {comm.size} ranks on {cores} cores; CPU ms per call:")
        print(f"{'rank':>4} {'copy in':>8} {'reduce+barriers':>16} {'copy out':>9} {'total':>7}")
        for rank, (copy_in, reduce, copy_out) in enumerate(per_call):
            print(f"{rank:>4} {copy_in:>8.2f} {reduce:>16.2f} {copy_out:>9.2f} {copy_in + reduce + copy_out:>7.2f}")
        cpu = sum(float(p.sum()) for p in per_call)
        print(f"CPU over all ranks {cpu:.1f} ms = at least {cpu / min(cores, comm.size):.1f} ms of wall time "
              f"on {min(cores, comm.size)} cores; measured wall time (median, slowest rank) {wall:.1f} ms")
    shm.free()
    comm.free()


if __name__ == "__main__":
    main()
