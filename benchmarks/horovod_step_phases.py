"""Where a training step through ``hvd.DistributedOptimizer`` spends its time, beside mpisgd's own.

Usage:  mpiexec -n 2 python benchmarks/horovod_step_phases.py [--steps 50] [--rounds 6] [--json out.json]

The MLP and data of ``benchmarks/horovod_api.py``'s training row. Per step, median of the rounds (the
two optimizers alternate): forward, backward (Horovod's per-parameter hooks submit each gradient during
it; mpisgd's optimizer does nothing there) and ``step`` (the reductions and the update). Then, over the
hvd rounds: how the coordinator's cycles ended (speculative messages carried, partial, all idle, failed;
negotiated cycles), the reason a step does or does not cost one negotiation.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from horovod_api import training_job
from mpi4py import MPI

import mpisgd.horovod.torch as hvd
from mpisgd.horovod.torch.basics import runtime


def count_cycles(counts: collections.Counter) -> None:
    """Count the endings of the coordinator's speculative messages and its negotiated cycles."""
    coordinator = runtime().coordinator
    exchange, step = coordinator.speculation.exchange, coordinator.negotiator.step

    def counted_exchange(*args, **kwargs):
        ended = exchange(*args, **kwargs)
        counts[f"speculative {ended}"] += 1
        return ended

    def counted_step(messages):
        outcome = step(messages)
        counts["negotiated"] += 1
        return outcome

    coordinator.speculation.exchange = counted_exchange
    coordinator.negotiator.step = counted_step


def phases(model, optimizer, data, target, steps: int, comm: MPI.Comm) -> list:
    """Milliseconds per step of forward, backward, step, and the whole step (the slowest rank's)."""
    spent = [0.0, 0.0, 0.0]
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(steps):
        a = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        b = time.perf_counter()
        loss.backward()
        c = time.perf_counter()
        optimizer.step()
        d = time.perf_counter()
        spent[0] += b - a
        spent[1] += c - b
        spent[2] += d - c
    total = time.perf_counter() - start
    mine = np.array([*spent, total]) / steps * 1e3
    slowest = np.empty_like(mine)
    comm.Allreduce(mine, slowest, op=MPI.MAX)
    return slowest.tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    comm = MPI.COMM_WORLD
    data, target, models, optimizers = training_job(args.batch, comm)
    for _ in range(5):
        for name in models:
            phases(models[name], optimizers[name], data, target, 1, comm)
    counts: collections.Counter = collections.Counter()
    count_cycles(counts)
    rounds: dict = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            rounds[name].append(phases(models[name], optimizers[name], data, target, args.steps, comm))
    hvd_steps = args.rounds * args.steps
    medians = {name: [statistics.median(r[i] for r in kept) for i in range(4)] for name, kept in rounds.items()}
    if comm.Get_rank() == 0:
        print(f"p={comm.Get_size()}, {args.steps} steps x {args.rounds} rounds; ms per step (median of rounds)")
        for name, (forward, backward, step, total) in medians.items():
            print(f"{name:>7}: forward {forward:.3f}, backward {backward:.3f}, step {step:.3f}, total {total:.3f}")
        print(f"hvd / mpisgd steps/s: {medians['mpisgd'][3] / medians['hvd'][3]:.2f}x")
        print(f"hvd's {hvd_steps} steps: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if args.json:
            with open(args.json, "w") as file:
                json.dump({"ranks": comm.Get_size(), "ms_per_step": medians, "hvd_steps": hvd_steps,
                           "cycles": dict(counts)}, file, indent=2)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
