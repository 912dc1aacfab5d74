"""Cost of the Horovod-compatible API (mpisgd.horovod.torch) against its anchors, in the same job.

Usage:  mpiexec -n 4 python benchmarks/horovod_api.py [--sizes 4096,65536,1048576] [--iters 300] [--json out.json]

1. Per-call latency of ``hvd.allreduce_`` (in place, Sum, float32) vs MPI's own ``MPI_Allreduce`` on
   a numpy array of the same bytes, by size (target: <= 1.3x at 4 KiB), with the default (checked)
   ``mpisgd.allreduce_`` beside them.
2. ``hvd.grouped_allreduce_`` of 100 tensors of 40 KiB vs one fused ``mpisgd`` all-reduce of the
   same 4 MB (target: <= 1.2x), and vs Horovod's own method written in plain mpi4py (copy the 100
   tensors into one fusion buffer, ``MPI_Allreduce`` it, copy them back out): the floor of any fusion
   that copies, beside the fused tensor, which copies nothing.
3. A training step (forward, backward, gradient averaging, SGD step) through
   ``hvd.DistributedOptimizer`` vs mpisgd's own ``mpisgd.DistributedOptimizer`` and torch DDP (gloo),
   same MLP and data (target: hvd >= 0.95x mpisgd's steps/s).
Each measurement alternates with its anchor in rounds; medians of the rounds and the ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from gloo_setup import close_gloo, init_gloo
from mpi4py import MPI

import mpisgd
import mpisgd.horovod.torch as hvd


def timed(function, iters: int, comm: MPI.Comm) -> float:
    """Seconds per call, the slowest rank's (every rank starts together)."""
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        function()
    elapsed = (time.perf_counter() - start) / iters
    return comm.allreduce(elapsed, op=MPI.MAX)


def paired(*functions, iters: int, rounds: int, comm: MPI.Comm) -> tuple:
    """Median seconds per call of each function, timed in alternating rounds."""
    times: list = [[] for _ in functions]
    for _ in range(3):  # warm-up: the first call of a name negotiates it in full, later ones by cache id
        for function in functions:
            function()
    for _ in range(rounds):
        for function, kept in zip(functions, times):
            kept.append(timed(function, iters, comm))
    return tuple(statistics.median(kept) for kept in times)


def latency(sizes: list, iters: int, rounds: int, comm: MPI.Comm) -> list:
    rows = []
    for nbytes in sizes:
        tensor = torch.ones(nbytes // 4)
        array = np.ones(nbytes // 4, dtype=np.float32)
        checked = np.ones(nbytes // 4, dtype=np.float32)
        name = f"bench.{nbytes}"
        hvd_time, mpi_time, mpisgd_time = paired(
            lambda t=tensor, n=name: hvd.allreduce_(t, op=hvd.Sum, name=n),
            lambda a=array: comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM),
            lambda a=checked: mpisgd.allreduce_(a, "sum"), iters=iters, rounds=rounds, comm=comm)
        rows.append({"bytes": nbytes, "hvd_us": hvd_time * 1e6, "mpi_us": mpi_time * 1e6,
                     "mpisgd_us": mpisgd_time * 1e6, "ratio": hvd_time / mpi_time,
                     "mpisgd_ratio": mpisgd_time / mpi_time})
    return rows


def grouped(iters: int, rounds: int, comm: MPI.Comm) -> dict:
    tensors = [torch.zeros(10240) for _ in range(100)]  # 100 x 40 KiB (zeros: sums repeated stay finite)
    flat = torch.zeros(100 * 10240)
    communicator = mpisgd.get_communicator()
    views, fusion_buffer = [t.numpy() for t in tensors], np.zeros(100 * 10240, dtype=np.float32)

    def horovod_method() -> None:
        offset = 0
        for view in views:
            fusion_buffer[offset:offset + view.size] = view
            offset += view.size
        comm.Allreduce(MPI.IN_PLACE, fusion_buffer, op=MPI.SUM)
        offset = 0
        for view in views:
            view[...] = fusion_buffer[offset:offset + view.size]
            offset += view.size

    grouped_time, fused_time, floor_time = paired(
        lambda: hvd.grouped_allreduce_(tensors, op=hvd.Sum, name="bench.grouped"),
        lambda: communicator.allreduce_(flat, "sum"), horovod_method, iters=iters, rounds=rounds, comm=comm)
    return {"grouped_ms": grouped_time * 1e3, "fused_ms": fused_time * 1e3, "ratio": grouped_time / fused_time,
            "copying_floor_ms": floor_time * 1e3, "ratio_to_floor": grouped_time / floor_time}


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10))


def training_job(batch: int, comm: MPI.Comm) -> tuple:
    """The training row's data, target, and its models with their optimizers: hvd's and mpisgd's."""
    data = torch.randn(batch, 256, generator=torch.Generator().manual_seed(comm.Get_rank()))
    target = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(7))
    models = {name: build() for name in ("hvd", "mpisgd")}
    optimizers = {
        "hvd": hvd.DistributedOptimizer(torch.optim.SGD(models["hvd"].parameters(), lr=0.01),
                                        named_parameters=models["hvd"].named_parameters()),
        "mpisgd": mpisgd.DistributedOptimizer(torch.optim.SGD(models["mpisgd"].parameters(), lr=0.01),
                                              models["mpisgd"].named_parameters())}
    return data, target, models, optimizers


def training(steps: int, rounds: int, batch: int, comm: MPI.Comm) -> dict:
    data, target, models, optimizers = training_job(batch, comm)
    models["ddp"] = build()
    hvd_optimizer, mpisgd_optimizer = optimizers["hvd"], optimizers["mpisgd"]
    init_gloo(mpisgd.get_communicator())
    ddp = torch.nn.parallel.DistributedDataParallel(models["ddp"])
    ddp_optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)

    def step(model, optimizer):
        def run():
            optimizer.zero_grad()
            F.cross_entropy(model(data), target).backward()
            optimizer.step()
        return run

    runs = {"hvd": step(models["hvd"], hvd_optimizer), "mpisgd": step(models["mpisgd"], mpisgd_optimizer),
            "ddp": step(ddp, ddp_optimizer)}
    for run in runs.values():
        run()
    times: dict = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(timed(run, steps, comm))
    del runs, run, ddp, ddp_optimizer  # before the group goes (gloo_setup.close_gloo says why)
    close_gloo()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {f"{name}_steps_per_s": 1 / t for name, t in medians.items()} | {
        "hvd_vs_mpisgd": medians["mpisgd"] / medians["hvd"], "hvd_vs_ddp": medians["ddp"] / medians["hvd"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,65536,1048576")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--grouped-iters", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    comm = MPI.COMM_WORLD
    results = {"ranks": comm.Get_size(), "latency": latency([int(s) for s in args.sizes.split(",")], args.iters,
                                                              args.rounds, comm),
               "grouped": grouped(args.grouped_iters, args.rounds, comm),
               "training": training(args.steps, args.rounds, args.batch, comm)}
    if comm.Get_rank() == 0:
        print(f"p={results['ranks']}")
        print(f"{'bytes':>9} {'hvd.allreduce_ us':>18} {'MPI_Allreduce us':>17} {'ratio':>6} "
              f"{'mpisgd.allreduce_ us':>21} {'ratio':>6}")
        for row in results["latency"]:
            print(f"{row['bytes']:>9} {row['hvd_us']:>18.1f} {row['mpi_us']:>17.1f} {row['ratio']:>6.2f} "
                  f"{row['mpisgd_us']:>21.1f} {row['mpisgd_ratio']:>6.2f}")
        g = results["grouped"]
        print(f"grouped_allreduce_ 100 x 40 KiB: {g['grouped_ms']:.2f} ms; one fused mpisgd all-reduce of the same "
              f"bytes: {g['fused_ms']:.2f} ms; ratio {g['ratio']:.2f}; Horovod's method in mpi4py (copy, "
              f"MPI_Allreduce, copy): {g['copying_floor_ms']:.2f} ms; ratio {g['ratio_to_floor']:.2f}")
        t = results["training"]
        print(f"training steps/s: hvd.DistributedOptimizer {t['hvd_steps_per_s']:.1f}, mpisgd.DistributedOptimizer "
              f"{t['mpisgd_steps_per_s']:.1f}, DDP-gloo {t['ddp_steps_per_s']:.1f}; hvd/mpisgd "
              f"{t['hvd_vs_mpisgd']:.2f}x, hvd/DDP {t['hvd_vs_ddp']:.2f}x")
        if args.json:
            with open(args.json, "w") as file:
                json.dump(results, file, indent=2)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
