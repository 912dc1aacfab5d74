"""Model parallelism (DistBelief) throughput: mpisgd ModelParallel vs the unsplit model and torch's pipelining.

Usage:  mpiexec -n 2 python benchmarks/model_parallel.py [--models even,wide] [--batch 512] [--micro-batches 8]
            [--schedule 1f1b] [--steps 5] [--warmup 1] [--no-torch-pipelining] [--no-tensor-parallel]

One torch thread per rank. Models: ``even`` (8 equal 1024-wide Linear+ReLU, splits evenly) and ``wide``
(784-2560x4-10). Printed, with the anchor of each in the same run:
  (a) seconds per minibatch for K = every stage count that divides the ranks (the rest are replicas) and
      the speedup over the unsplit model in one process (rank 0 alone, the others sleeping);
  (b) torch.distributed.pipelining (gloo) with the same split, M and schedule on the same ranks (K = ranks):
      samples/s ratio mpisgd / torch;
  (c) the measured bubble (time waiting / step time, mean over ranks) vs (K-1)/(M+K-1), bytes sent per step
      per stage, and parameter+optimizer bytes per rank vs the unsplit model's;
  (d) tensor_parallel = ranks (K = 1, M = 1) vs unsplit, with the bytes one rank receives per step from the
      other splits, measured, and computed for Megatron-style pairs (the next Linear split by input features).
A step = forward, backward, gradient mean over replicas, SGD (momentum 0.9) step.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gloo_setup import init_gloo  # noqa: E402

from mpisgd.comm import get_communicator  # noqa: E402
from mpisgd.comm.wait import Backoff, wait_until  # noqa: E402
from mpisgd.modelparallel import ModelParallel  # noqa: E402

MODELS = {"even": (1024, [1024] * 7, 1024), "wide": (784, [2560] * 4, 10)}


def build(name: str) -> nn.Sequential:
    """``even``: 8 Linear(1024, 1024) + ReLU; ``wide``: 784 -> 2560 x 4 -> 10 (ReLU between)."""
    torch.manual_seed(0)
    features, hidden, classes = MODELS[name]
    layers: list = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    if name == "even":
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def data(name: str, batch: int):
    features, _, classes = MODELS[name]
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, features, generator=generator), torch.randint(0, classes, (batch,), generator=generator)


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)


def state_bytes(module: nn.Module, optimizer) -> int:
    """Parameters plus optimizer state (momentum buffers), in bytes."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    if optimizer is not None:
        for values in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in values.values() if torch.is_tensor(v))
    return total


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def polite_barrier(world) -> None:
    """A barrier the waiting ranks sleep in (a spinning MPI_Barrier would take the measured rank's core)."""
    request = world.Ibarrier()
    wait_until(request.Test, timeout=3600, what="the other ranks", backoff=Backoff(first=1e-3, longest=2e-2))


def unsplit(name: str, batch: int, steps: int, warmup: int, world):
    """Seconds per step of the unsplit model in one process (rank 0), and its parameter+optimizer bytes."""
    result = None
    if world.Get_rank() == 0:
        model, (x, y) = build(name), data(name, batch)
        optimizer = sgd(model.parameters())

        def step():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        result = (timed(step, steps, warmup), state_bytes(model, optimizer))
    polite_barrier(world)
    return world.bcast(result, root=0)


def model_parallel(name: str, batch: int, steps: int, warmup: int, *, stages: int, micro_batches: int,
                   schedule: str, splits: int = 1):
    comm = get_communicator()
    x, y = data(name, batch)
    mp = ModelParallel(build(name), stages=stages, micro_batches=micro_batches, schedule=schedule,
                       tensor_parallel=splits)
    optimizer = sgd(mp.module.parameters()) if mp.has_parameters else None

    def step():
        if optimizer is not None:
            optimizer.zero_grad()
        mp.train_step(x, y, F.cross_entropy)
        if optimizer is not None:
            optimizer.step()
    for _ in range(warmup):
        step()
    waited, sent, gathered = mp.seconds_waited, mp.bytes_sent, mp.split_bytes_received
    seconds = timed(step, steps, 0)
    per_rank = comm.mpi.allgather({
        "stage": mp.stage, "wait": (mp.seconds_waited - waited) / steps, "sent": (mp.bytes_sent - sent) / steps,
        "split_received": (mp.split_bytes_received - gathered) / steps, "state": state_bytes(mp.module, optimizer),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    seconds = comm.mpi.allreduce(seconds, op=MPI.MAX)
    layer_counts = mp.layer_counts
    mp.free()
    return seconds, per_rank, layer_counts


def torch_pipelining(name: str, batch: int, steps: int, warmup: int, *, layer_counts, micro_batches: int,
                     schedule: str) -> float:
    """Seconds per step of torch.distributed.pipelining with the same split (one stage per rank)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    comm = get_communicator()
    rank, stages = comm.rank, comm.size
    if not dist.is_initialized():
        init_gloo(comm)
    children = list(build(name).children())
    start = sum(layer_counts[:rank])
    stage_module = nn.Sequential(*children[start:start + layer_counts[rank]])
    x, y = data(name, batch)
    stage = PipelineStage(stage_module, rank, stages, torch.device("cpu"))
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    runner = kind(stage, n_microbatches=micro_batches, loss_fn=F.cross_entropy)
    optimizer = sgd(stage_module.parameters())

    def step():
        optimizer.zero_grad()
        if rank == 0:
            runner.step(x)
        elif rank == stages - 1:
            runner.step(target=y, losses=[])
        else:
            runner.step()
        optimizer.step()
    seconds = timed(step, steps, warmup)
    return comm.mpi.allreduce(seconds, op=MPI.MAX)


def megatron_bytes(name: str, batch: int, splits: int) -> float:
    """Bytes one split receives per step with Linear pairs split column- then row-wise (Megatron-LM): per pair
    n -> h -> m an all-reduce of B*m forward and of B*n backward (a Linear left over: gathered as here)."""
    features, hidden, classes = MODELS[name]
    widths = [features, *hidden, classes]
    share, reduce_share, total = (splits - 1) / splits, 2 * (splits - 1) / splits, 0.0
    index = 0
    while index + 2 < len(widths):
        total += batch * (widths[index + 2] * reduce_share + widths[index] * reduce_share)
        index += 2
    if index + 1 < len(widths):  # an unpaired last Linear: all-gather forward, all-reduce of its input backward
        total += batch * (widths[index + 1] * share + widths[index] * reduce_share)
    return total * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="even,wide")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-torch-pipelining", action="store_true")
    parser.add_argument("--no-tensor-parallel", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = get_communicator()
    world, ranks = comm.mpi, comm.size
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    M, B = args.micro_batches, args.batch
    say(f"# model parallel, {ranks} ranks, 1 torch thread each, batch {B}, M={M}, {args.schedule}, "
        f"{args.steps} timed steps (median) after {args.warmup}")
    for name in args.models.split(","):
        base_s, base_bytes = unsplit(name, B, args.steps, args.warmup, world)
        say(f"\n## {name} {MODELS[name]}: unsplit, one process: {base_s * 1e3:.1f} ms/step, {B / base_s:.0f} samples/s,"
            f" parameters+optimizer {base_bytes / 2**20:.1f} MiB")
        say("K  R  ms/step  samples/s  speedup  bubble(meas/theory)  MiB sent/step/stage  param+opt MiB/rank "
            "(x unsplit, bound 1/K+10%)  max RSS MiB")
        counts_at_ranks = None
        for stages in [k for k in range(1, ranks + 1) if ranks % k == 0]:
            if M < stages:
                continue
            seconds, per_rank, counts = model_parallel(name, B, args.steps, args.warmup, stages=stages,
                                                       micro_batches=M, schedule=args.schedule)
            if stages == ranks:
                counts_at_ranks, mp_seconds = counts, seconds
            bubble = statistics.mean(r["wait"] for r in per_rank) / seconds
            theory = (stages - 1) / (M + stages - 1)
            sent = [max(r["sent"] for r in per_rank if r["stage"] == s) / 2**20 for s in range(stages)]
            worst_state = max(r["state"] for r in per_rank)
            say(f"{stages}  {ranks // stages}  {seconds * 1e3:7.1f}  {B / seconds:9.0f}  {base_s / seconds:6.2f}x  "
                f"{bubble:5.2f}/{theory:4.2f}           {'/'.join(f'{s:.1f}' for s in sent):>19}  "
                f"{worst_state / 2**20:8.1f} ({worst_state / base_bytes:.2f}, {1 / stages + 0.1:.2f})"
                f"{' ' * 20}{max(r['rss_mib'] for r in per_rank):.0f}   layers/stage {list(counts)}")
        if not args.no_torch_pipelining and ranks > 1 and counts_at_ranks is not None:
            torch_s = torch_pipelining(name, B, args.steps, args.warmup, layer_counts=counts_at_ranks,
                                       micro_batches=M, schedule=args.schedule)
            say(f"anchor torch.distributed.pipelining (gloo), K={ranks}, same split/M/schedule: {torch_s * 1e3:.1f} "
                f"ms/step, {B / torch_s:.0f} samples/s; mpisgd/torch samples/s ratio {torch_s / mp_seconds:.2f}x")
        if not args.no_tensor_parallel and ranks > 1:
            seconds, per_rank, _ = model_parallel(name, B, args.steps, args.warmup, stages=1, micro_batches=1,
                                                  schedule="gpipe", splits=ranks)
            received = max(r["split_received"] for r in per_rank)
            say(f"tensor_parallel={ranks} (K=1, M=1): {seconds * 1e3:.1f} ms/step, {base_s / seconds:.2f}x unsplit; "
                f"param+opt {max(r['state'] for r in per_rank) / base_bytes:.2f}x unsplit per rank; received per "
                f"rank per step: {received / 2**20:.1f} MiB (all-gather per Linear, measured) vs "
                f"{megatron_bytes(name, B, ranks) / 2**20:.1f} MiB (Megatron pairs, computed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
