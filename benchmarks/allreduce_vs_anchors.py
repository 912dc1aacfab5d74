"""All-reduce: mpisgd (rhd, ring, auto) vs the MPI library's MPI_Allreduce vs torch.distributed gloo.

Usage:  mpiexec -n 4 python benchmarks/allreduce_vs_anchors.py [--sizes 4KiB:64MiB] [--json out.json]

All four run on the same ranks, the same float32 torch tensors, interleaved in the same rounds, in a
new random order each round (the same on every rank), so machine noise, and the slowdown of whatever
runs right after gloo, hit all of them alike. Time of a call = slowest rank, after a barrier; reported =
median. Bus bandwidth as nccl-tests: bytes/time * 2(p-1)/p. Ratios are to MPI_Allreduce (lower is
faster) and gloo's time over mpisgd auto's (higher is better for mpisgd): of the medians, and the
median over rounds of each round's own ratio ("paired"), which cancels drift of the machine's speed
between rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

import torch
import torch.distributed as dist
from gloo_setup import init_gloo
from mpi4py import MPI

from mpisgd import AllreduceConfig, Communicator
from mpisgd.bench import format_size, iterations_for, parse_sizes, time_calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4KiB,64KiB,256KiB,1MiB,2MiB,4MiB,16MiB,64MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed calls of each method before its timed calls in a round")
    parser.add_argument("--json")
    args = parser.parse_args()

    comm = Communicator(config=AllreduceConfig(check_collectives=False))
    checked = Communicator()  # the default user path, mismatch check included
    init_gloo(comm)
    p = comm.size
    methods = {
        "MPI_Allreduce": lambda t: comm.mpi.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM),
        "gloo": lambda t: dist.all_reduce(t),
        "mpisgd rhd": lambda t: comm.allreduce_(t, algorithm="rhd"),
        "mpisgd ring": lambda t: comm.allreduce_(t, algorithm="ring"),
        "mpisgd auto": lambda t: comm.allreduce_(t),
        "mpisgd auto+check": lambda t: checked.allreduce_(t),
    }
    rows = []
    for nbytes in parse_sizes(args.sizes):
        tensor = torch.zeros(nbytes // 4, dtype=torch.float32)  # stays finite however often summed
        per_round = max(1, iterations_for(nbytes) // args.rounds)
        times = {name: [] for name in methods}
        paired = []  # each round's median gloo time over its median auto time
        for fn in methods.values():  # warm-up
            fn(tensor), fn(tensor)
        order = random.Random(nbytes)  # seeded alike on every rank: all ranks call in the same order
        for _ in range(args.rounds):
            # a random order, not a rotation: in a rotation one method always follows gloo, and the
            # first calls after gloo's run up to 1.5x slower whatever the method (measured: 15-25 ms
            # for rhd's 11 ms at 16 MiB, p = 4, decaying over ~4 calls), which biased that one method
            names = order.sample(list(methods), len(methods))
            this_round = {}
            for name in names:
                for _ in range(args.settle):
                    methods[name](tensor)
                this_round[name] = time_calls(comm, lambda call=methods[name], data=tensor: call(data), per_round)
                times[name] += this_round[name]
            gloo_time, auto_time = (statistics.median(this_round[k]) for k in ("gloo", "mpisgd auto"))
            paired.append(gloo_time / auto_time)
        native = statistics.median(times["MPI_Allreduce"])
        auto = statistics.median(times["mpisgd auto"])
        for name in methods:
            t = statistics.median(times[name])
            rows.append({"size_bytes": nbytes, "method": name, "time_s": t, "ranks": p,
                         "busbw_gbs": nbytes / t * 2 * (p - 1) / p / 1e9 if p > 1 else 0.0,
                         "ratio_to_mpi": t / native, "gloo_over_auto": None, "gloo_over_auto_paired": None})
        rows[-len(methods) + 1]["gloo_over_auto"] = statistics.median(times["gloo"]) / auto
        rows[-len(methods) + 1]["gloo_over_auto_paired"] = statistics.median(paired)
    if comm.rank == 0:
        print(f"ranks: {p}{' (oversubscribed)' if comm.oversubscribed else ''}, float32, torch CPU tensors")
        print(f"{'size':>7} {'method':>18} {'time [us]':>11} {'busbw [GB/s]':>13} {'x MPI':>7} "
              f"{'gloo/auto':>10} {'(paired)':>9}")
        for r in rows:
            extra = (f"{r['gloo_over_auto']:>10.1f} {r['gloo_over_auto_paired']:>9.1f}" if r["gloo_over_auto"]
                     else "")
            print(f"{format_size(r['size_bytes']):>7} {r['method']:>18} {r['time_s'] * 1e6:>11.1f} "
                  f"{r['busbw_gbs']:>13.2f} {r['ratio_to_mpi']:>7.2f} {extra}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"command": " ".join(sys.argv), "rows": rows}, out, indent=1)
    dist.destroy_process_group()
    checked.free()
    comm.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
