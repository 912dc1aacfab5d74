"""The collective watchdog's cost per call: ``allreduce_`` with the watchdog vs without it vs MPI's own.

Usage:  mpiexec -n 2 python benchmarks/watchdog_cost.py [--sizes 4KiB,16MiB] [--rounds 7]

Three variants on the same ranks and buffers, interleaved in rounds in a new order each round (the same on
every rank): ``watched`` (a Communicator with the default 600 s timeout: nonblocking MPI polled under the
deadline, the arrival board published on entry), ``unwatched`` (``timeout=0``: the same algorithms, waits
blocking in ``MPI_Waitall``, as before the watchdog) and the anchor ``MPI_Allreduce`` itself. Collective
checks are off in both mpisgd variants, so only the waits differ. Time of a call = slowest rank after a
barrier; per round the median; reported: the median over rounds, and the median of each round's own
ratio watched/unwatched ("paired").
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np
from mpi4py import MPI

from mpisgd import AllreduceConfig, Communicator
from mpisgd.bench import format_size, iterations_for, parse_sizes, time_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4KiB,16MiB")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = AllreduceConfig(check_collectives=False)
    watched = Communicator(config=config)
    unwatched = Communicator(config=config, timeout=0)
    world = watched.mpi
    rows = []
    for nbytes in parse_sizes(args.sizes):
        x = np.ones(nbytes // 4, dtype=np.float32)
        calls = {"watched": lambda x=x: watched.allreduce_(x), "unwatched": lambda x=x: unwatched.allreduce_(x),
                 "MPI_Allreduce": lambda x=x: world.Allreduce(MPI.IN_PLACE, x)}
        iterations = max(5, iterations_for(nbytes) // args.rounds)
        medians: dict = {name: [] for name in calls}
        rng = random.Random(nbytes)
        for _ in range(args.rounds):
            order = list(calls)
            rng.shuffle(order)
            for name in order:
                calls[name]()  # warm
                medians[name].append(statistics.median(time_calls(watched, calls[name], iterations)))
        paired = statistics.median(w / u for w, u in zip(medians["watched"], medians["unwatched"]))
        rows.append((nbytes, *(statistics.median(medians[n]) for n in calls), paired))
    if world.Get_rank() == 0:
        print(f"p={world.Get_size()}  {MPI.Get_library_version().rstrip(chr(0)).splitlines()[0]}")
        print(f"{'size':>8} {'watched':>12} {'unwatched':>12} {'MPI_Allreduce':>14} {'watched/unwatched':>18} "
              f"{'paired':>7} {'watched/MPI':>12}")
        for nbytes, w, u, m, paired in rows:
            print(f"{format_size(nbytes):>8} {w * 1e6:>10.1f}us {u * 1e6:>10.1f}us {m * 1e6:>12.1f}us "
                  f"{w / u:>18.3f} {paired:>7.3f} {w / m:>12.3f}")
    unwatched.free()
    watched.free()


if __name__ == "__main__":
    main()
