"""All-reduce: mpisgd (rhd, ring, auto) vs the MPI library's MPI_Allreduce vs torch.distributed gloo.

Usage:  mpiexec -n 4 python benchmarks/allreduce_vs_anchors.py [--sizes 4KiB:64MiB] [--json out.json]

All four run on the same ranks, the same float32 torch tensors, interleaved in the same rounds
in a rotating order (so machine noise hits all alike). Time of a call = slowest rank, after a barrier; reported = median.
Bus bandwidth as nccl-tests: bytes/time * 2(p-1)/p. Ratios are to MPI_Allreduce (lower is faster)
and gloo's time over mpisgd auto's (higher is better for mpisgd).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.distributed as dist
from mpi4py import MPI

from gloo_setup import init_gloo
from mpisgd import AllreduceConfig, Communicator
from mpisgd.bench import format_size, iterations_for, parse_sizes, time_calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4KiB,64KiB,256KiB,1MiB,2MiB,4MiB,16MiB,64MiB")
    parser.add_argument("--rounds", type=int, default=5)
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
        for fn in methods.values():  # warm-up
            fn(tensor), fn(tensor)
        names = list(methods)
        for round_number in range(args.rounds):  # the order rotates: no method always follows gloo
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                # one untimed call first: the call after gloo's ran up to 1.5x slower, whatever the
                # method (measured: rhd, which followed gloo in 5 of 6 rounds, 20 ms vs auto's 13.7 ms
                # for the very same algorithm), and at 2-3 calls per round that skewed the medians
                methods[name](tensor)
                times[name] += time_calls(comm, lambda: methods[name](tensor), per_round)
        native = statistics.median(times["MPI_Allreduce"])
        auto = statistics.median(times["mpisgd auto"])
        for name in methods:
            t = statistics.median(times[name])
            rows.append({"size_bytes": nbytes, "method": name, "time_s": t, "ranks": p,
                         "busbw_gbs": nbytes / t * 2 * (p - 1) / p / 1e9 if p > 1 else 0.0,
                         "ratio_to_mpi": t / native, "gloo_over_auto": None})
        rows[-len(methods) + 1]["gloo_over_auto"] = statistics.median(times["gloo"]) / auto
    if comm.rank == 0:
        print(f"ranks: {p}{' (oversubscribed)' if comm.oversubscribed else ''}, float32, torch CPU tensors")
        print(f"{'size':>7} {'method':>18} {'time [us]':>11} {'busbw [GB/s]':>13} {'x MPI':>7} {'gloo/auto':>10}")
        for r in rows:
            extra = f"{r['gloo_over_auto']:.1f}" if r["gloo_over_auto"] else ""
            print(f"{format_size(r['size_bytes']):>7} {r['method']:>18} {r['time_s'] * 1e6:>11.1f} "
                  f"{r['busbw_gbs']:>13.2f} {r['ratio_to_mpi']:>7.2f} {extra:>10}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"command": " ".join(sys.argv), "rows": rows}, out, indent=1)
    dist.destroy_process_group()
    checked.free()
    comm.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
