"""Synchronous training throughput: mpisgd DistributedOptimizer vs torch DistributedDataParallel (gloo).

Usage:  mpiexec -n 4 python benchmarks/sync_vs_ddp.py [--hidden 1024,1024] [--batch 32] [--json out.json]

Same model (an MLP without batch norm), same in-memory data, same SGD, same ranks; the two run in
alternating rounds of steps so machine noise hits both alike. Reported: samples/s over all ranks
(median of the rounds) and the ratio mpisgd / DDP. A step = forward, backward, gradient averaging,
optimizer step. DDP overlaps its bucketed all-reduce with the backward pass; mpisgd reduces fused
buckets after the backward pass ("mpisgd sync"), or with overlap=True reduces 1 MiB buckets on a
communication thread while backward runs ("mpisgd overlap").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from gloo_setup import close_gloo, init_gloo

from mpisgd import DistributedOptimizer, broadcast_parameters, get_communicator


def build(hidden, features, classes, seed=0):
    torch.manual_seed(seed)
    layers, width = [], features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="1024,1024")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--overlap-bucket-bytes", type=int, default=1 << 20)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = get_communicator()
    init_gloo(comm)
    hidden = [int(h) for h in args.hidden.split(",")]
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.batch, args.features, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)

    ours = build(hidden, args.features, args.classes)
    broadcast_parameters(ours, comm=comm)
    ours_opt = DistributedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9),
                                    ours.named_parameters(), comm=comm)
    overlapped = build(hidden, args.features, args.classes)
    broadcast_parameters(overlapped, comm=comm)
    overlapped_opt = DistributedOptimizer(torch.optim.SGD(overlapped.parameters(), lr=0.01, momentum=0.9),
                                          overlapped.named_parameters(), comm=comm, overlap=True,
                                          bucket_bytes=args.overlap_bucket_bytes)
    ddp = torch.nn.parallel.DistributedDataParallel(build(hidden, args.features, args.classes))
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

    def step(model, optimizer):
        def run():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return run

    steps = {"mpisgd sync": step(ours, ours_opt), "mpisgd overlap": step(overlapped, overlapped_opt),
             "DDP gloo": step(ddp, ddp_opt)}
    rates = {name: [] for name in steps}
    for fn in steps.values():
        for _ in range(3):
            fn()
    for _ in range(args.rounds):
        for name, fn in steps.items():
            comm.mpi.Barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            comm.mpi.Barrier()
            rates[name].append(args.steps * args.batch * comm.size / (time.perf_counter() - start))
    params = sum(p.numel() for p in ours.parameters())
    result = {name: statistics.median(r) for name, r in rates.items()}
    result["ratio"] = result["mpisgd sync"] / result["DDP gloo"]
    result["overlap_ratio"] = result["mpisgd overlap"] / result["DDP gloo"]
    if comm.rank == 0:
        print(f"ranks {comm.size}{' (oversubscribed)' if comm.oversubscribed else ''}, MLP {args.features}-{args.hidden}-{args.classes} "
              f"({params / 1e6:.2f} M parameters, {params * 4 / 2**20:.1f} MiB of gradients), per-rank batch {args.batch}")
        for name in rates:
            print(f"{name:>12}: {result[name]:10.1f} samples/s   (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})")
        print(f"mpisgd / DDP = {result['ratio']:.2f}; mpisgd with overlap ({args.overlap_bucket_bytes >> 20} MiB "
              f"buckets) / DDP = {result['overlap_ratio']:.2f}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"command": " ".join(sys.argv), "ranks": comm.size, "params": params, **result}, out)
    del steps, fn, ddp, ddp_opt  # before the group goes (gloo_setup.close_gloo says why)
    close_gloo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
