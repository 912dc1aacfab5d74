"""Learning per second: every strategy on the same data, with the same number of replicas, to the same
target accuracy; as is, and with emulated accelerators (and one worker 4x slower).

Usage:
    python benchmarks/learning_per_second.py [--seeds 5] [--workers 3] [--strategies sync,sync-ps-b1,...]
        [--quick] [--emulated 0.02] [--slow-factor 4] [--dc-claim 8,16] [--json out.json] [--plot out.png]

Each run is `mpiexec -n R mpisgd train` on the built-in data (8192 training, 2048 validation samples,
the default mlp), seeded, with --target-accuracy: R = the workers (times the stages of the model-parallel
rows, whose replicas are split over 2 ranks each), plus the server ranks of the parameter server strategies
(1) and Sandblaster's coordinator. The model-parallel rows run in part (a) only: the emulated sleep pads a
whole model's forward pass, not a pipeline stage's. Columns, per strategy, mean and spread (sd) over
seeds: time to the target (the metrics' wall time at the first evaluation that reached it; every
strategy evaluates once per epoch of data, Sandblaster only at its end), updates to it (the metrics'
step: all-reduce steps, pushes for downpour/dcasgd/SSP, updates for sync-ps, L-BFGS iterations),
final accuracy, and records/s (training records whose gradient was applied, per second of the
metrics' wall time; sync-ps counts only the applied ones, not the discarded late ones).

Parts:
  (a) as is: ranks time-share this machine's cores (on a 2-core machine every run above 2 ranks is
      oversubscribed, which is what such a run measures).
  (b) emulated accelerators: MPISGD_EMULATED_STEP_SECONDS pads every worker's training step with a sleep
      (mpisgd/emulation.py: the CPU idles while an emulated device computes, so workers overlap), then
      the same with the last rank --slow-factor times slower (MPISGD_EMULATED_SLOW_RANKS); the ratio of
      records/s slowed / unslowed is printed per strategy (the anchor is the same strategy unslowed).
  --dc-claim W,...: ASGD vs DC-ASGD (constant, adaptive) with emulated accelerators and W workers, with the
      staleness histogram of the pushes (the delay the paper's correction targets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRAIN_SAMPLES = 8192  # the built-in set


@dataclass(frozen=True)
class Strategy:
    name: str
    flags: tuple
    servers: int = 1  # 0: every rank a worker
    coordinator: bool = False
    stages: int = 1  # model parallelism: each replica (a "worker" here) spread over this many ranks

    def ranks(self, workers: int) -> int:
        return workers * self.stages + self.servers + int(self.coordinator)

    @property
    def kind(self) -> str:
        return self.flags[1]


STRATEGIES = {s.name: s for s in (
    Strategy("sync", ("--strategy", "sync"), servers=0),
    Strategy("sync-lars", ("--strategy", "sync", "--optimizer", "lars"), servers=0),
    Strategy("downpour-adagrad", ("--strategy", "downpour")),
    Strategy("asgd", ("--strategy", "downpour", "--server-rule", "sgd")),
    Strategy("dcasgd-constant", ("--strategy", "dcasgd")),
    Strategy("dcasgd-adaptive", ("--strategy", "dcasgd", "--dc-variant", "adaptive", "--dc-lambda", "2")),
    Strategy("ssp-1", ("--strategy", "downpour", "--max-staleness", "1")),
    Strategy("ssp-4", ("--strategy", "downpour", "--max-staleness", "4")),
    Strategy("sync-ps-b1", ("--strategy", "sync-ps", "--backup-workers", "1")),
    Strategy("sandblaster", ("--strategy", "sandblaster"), coordinator=True),
    Strategy("sync-mp2", ("--strategy", "sync", "--stages", "2", "--micro-batches", "2"), servers=0, stages=2),
    Strategy("downpour-mp2", ("--strategy", "downpour", "--stages", "2", "--micro-batches", "2"), stages=2),
)}
NOT_EMULATED = ("sync-mp2", "downpour-mp2")  # the sleep pads whole-model forward passes, not a pipeline's stages
DC_CLAIM = ("asgd", "dcasgd-constant", "dcasgd-adaptive")


@dataclass
class Run:
    strategy: str
    part: str
    seed: int
    workers: int
    returncode: int
    job_s: float
    time_to_target: Optional[float] = None
    updates_to_target: Optional[int] = None
    final_accuracy: Optional[float] = None
    records_per_s: Optional[float] = None
    staleness_hist: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # (wall time, val accuracy)


def read_metrics(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def applied_records(strategy: Strategy, records: list, args: argparse.Namespace, workers: int) -> Optional[float]:
    last = next((r for r in reversed(records) if "worker_steps" in r or "gradients_applied" in r), None)
    if strategy.kind == "sync":
        steps = max((r["step"] for r in records), default=0)
        return steps * workers * args.batch_size
    if strategy.kind == "sync-ps":
        return None if last is None else last["gradients_applied"] * args.batch_size
    if strategy.kind == "sandblaster":
        evaluations = max((r.get("function_evaluations") or 0 for r in records), default=0)
        return evaluations * TRAIN_SAMPLES
    # split replicas list each partition's steps (they step together)
    return None if last is None else sum(last["worker_steps"]) * args.batch_size / strategy.stages


def run_one(strategy: Strategy, part: str, seed: int, workers: int, args: argparse.Namespace,
            env: dict, folder: Path) -> Run:
    metrics = folder / f"{strategy.name}-{part}-{workers}-{seed}.jsonl"
    flags = [*strategy.flags, "--seed", str(seed), "--metrics", str(metrics), "--no-progress",
             "--batch-size", str(args.batch_size)]
    if strategy.servers:
        flags += ["--servers", str(strategy.servers)]
    if strategy.kind == "sandblaster":
        flags += ["--max-iterations", str(args.sandblaster_iterations)]
    else:
        flags += ["--epochs", str(args.epochs), "--target-accuracy", str(args.target)]
    command = [str(BIN / "mpiexec"), "-n", str(strategy.ranks(workers)), str(BIN / "mpisgd"), "train", *flags]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=args.run_timeout, cwd=ROOT)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = 124
    run = Run(strategy.name, part, seed, workers, code, time.perf_counter() - start)
    records = read_metrics(metrics)
    evaluations = [r for r in records if r.get("val_accuracy") is not None and r.get("wall_time") is not None]
    run.curve = [(r["wall_time"], r["val_accuracy"]) for r in evaluations]
    reached = next((r for r in evaluations if r["val_accuracy"] >= args.target), None)
    if reached is not None:
        run.time_to_target, run.updates_to_target = reached["wall_time"], int(reached["step"])
    if evaluations:
        run.final_accuracy = evaluations[-1]["val_accuracy"]
    wall = max((r.get("wall_time") or 0.0 for r in records), default=0.0)
    applied = applied_records(strategy, records, args, workers)
    if applied is not None and wall > 0:
        run.records_per_s = applied / wall
    hist = next((r["staleness_hist"] for r in reversed(records) if "staleness_hist" in r), None)
    run.staleness_hist = hist or []
    return run


def mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def mean_staleness(hist: list) -> Optional[float]:
    total = sum(hist)
    return sum(i * n for i, n in enumerate(hist)) / total if total else None


def table(runs: list, part: str, label: str) -> list:
    lines = [f"### {label}", "",
             "| strategy | ranks | reached | time to target s | updates to target | final accuracy | records/s |"
             " mean staleness |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r.strategy for r in runs if r.part == part):
        group = [r for r in runs if r.part == part and r.strategy == name]
        reached = sum(r.time_to_target is not None for r in group)
        ranks = STRATEGIES[name].ranks(group[0].workers)
        lines.append(f"| {name} | {ranks} | {reached}/{len(group)} | {mean_sd([r.time_to_target for r in group])} | "
                     f"{mean_sd([r.updates_to_target for r in group])} | "
                     f"{mean_sd([r.final_accuracy for r in group])} | {mean_sd([r.records_per_s for r in group])} | "
                     f"{mean_sd([mean_staleness(r.staleness_hist) for r in group])} |")
    return lines + [""]


def slowdown_lines(runs: list) -> list:
    lines = ["### (b) records/s with one worker slowed, over the same strategy unslowed", "",
             "| strategy | unslowed records/s | slowed records/s | ratio |", "|---|---|---|---|"]
    for name in dict.fromkeys(r.strategy for r in runs if r.part == "emulated-slow"):
        fast = [r.records_per_s for r in runs if r.strategy == name and r.part == "emulated" and r.records_per_s]
        slow = [r.records_per_s for r in runs if r.strategy == name and r.part == "emulated-slow" and r.records_per_s]
        if fast and slow:
            lines.append(f"| {name} | {statistics.mean(fast):.4g} | {statistics.mean(slow):.4g} | "
                         f"{statistics.mean(slow) / statistics.mean(fast):.2f} |")
    return lines + [""]


def histogram_lines(runs: list) -> list:
    lines = ["### DC-ASGD's claim: staleness histograms (pushes per staleness 0, 1, 2, ...; summed over seeds)", ""]
    for workers in sorted({r.workers for r in runs if r.part == "dc-claim"}):
        for name in DC_CLAIM:
            hists = [r.staleness_hist for r in runs if r.part == "dc-claim" and r.workers == workers
                     and r.strategy == name and r.staleness_hist]
            if hists:
                total = [sum(h[i] for h in hists) for i in range(len(hists[0]))]
                while total and total[-1] == 0:
                    total.pop()
                lines.append(f"- {workers} workers, {name}: {total}")
    return lines + [""]


def plot(runs: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in ("as-is", "emulated", "emulated-slow") if any(r.part == p for r in runs)]
    figure, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for axis, part in zip(axes[0], parts):
        for name in dict.fromkeys(r.strategy for r in runs if r.part == part):
            for i, run in enumerate(r for r in runs if r.part == part and r.strategy == name):
                if run.curve:
                    xs, ys = zip(*run.curve)
                    axis.plot(xs, ys, marker=".", color=f"C{list(STRATEGIES).index(name)}",
                              label=name if i == 0 else None, alpha=0.8)
        axis.set(title=part + (" (emulated)" if part != "as-is" else ""), xlabel="wall time [s]",
                 ylabel="validation accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--parts", default="as-is,emulated,emulated-slow")
    parser.add_argument("--slow-strategies", default="sync,ssp-1,ssp-4,sync-ps-b1,downpour-adagrad",
                        help="strategies run with one slowed worker (part emulated-slow)")
    parser.add_argument("--emulated", type=float, default=0.02, help="emulated compute seconds per step")
    parser.add_argument("--slow-factor", type=float, default=4.0)
    parser.add_argument("--dc-claim", default="", help="worker counts for the DC-ASGD comparison, e.g. 8,16")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sandblaster-iterations", type=int, default=40)
    parser.add_argument("--run-timeout", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, 20 L-BFGS iterations")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.sandblaster_iterations = min(args.seeds, 2), 3, 20
    emulated = {"MPISGD_EMULATED_STEP_SECONDS": str(args.emulated)}
    runs: list = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plan = []
        for part in filter(None, args.parts.split(",")):
            names = args.strategies.split(",") if part != "emulated-slow" else [
                n for n in args.slow_strategies.split(",") if n in args.strategies.split(",")]
            for name in names:
                if part != "as-is" and name in NOT_EMULATED:
                    continue
                strategy = STRATEGIES[name]
                env = {} if part == "as-is" else dict(emulated)
                if part == "emulated-slow":
                    env["MPISGD_EMULATED_SLOW_RANKS"] = f"{strategy.ranks(args.workers) - 1}:{args.slow_factor:g}"
                plan.append((strategy, part, args.workers, env))
        for workers in (int(w) for w in args.dc_claim.split(",") if w):
            plan += [(STRATEGIES[name], "dc-claim", workers, dict(emulated)) for name in DC_CLAIM]
        for seed in range(args.seeds):  # seeds outermost: a drifting machine load hits every strategy alike
            for strategy, part, workers, env in plan:
                run = run_one(strategy, part, seed, workers, args, env, folder)
                runs.append(run)
                print(f"{run.strategy:17s} {part:13s} W={workers:2d} seed {seed}: rc {run.returncode}, "
                      f"{run.job_s:5.1f} s job, target at {run.time_to_target}, final {run.final_accuracy}, "
                      f"records/s {run.records_per_s}", flush=True)
    lines = [f"learning per second: {args.workers} workers, batch {args.batch_size}, target {args.target}, "
             f"{args.seeds} seed(s), emulated step {args.emulated} s, slow factor {args.slow_factor:g}, "
             f"{os.cpu_count()} cores ({time.perf_counter() - started:.0f} s)", ""]
    lines += table(runs, "as-is", "(a) as is (ranks time-share the cores)")
    lines += table(runs, "emulated", f"(b) EMULATED accelerators ({args.emulated} s per step)")
    lines += table(runs, "emulated-slow", f"(b) EMULATED, last rank {args.slow_factor:g}x slower")
    lines += slowdown_lines(runs)
    for workers in sorted({r.workers for r in runs if r.part == "dc-claim"}):
        lines += table([r for r in runs if r.workers == workers], "dc-claim",
                       f"DC-ASGD's claim, EMULATED, {workers} workers")
    lines += histogram_lines(runs)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": [r.__dict__ for r in runs]}, indent=1))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
