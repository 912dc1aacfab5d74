"""Sandblaster L-BFGS vs scipy's L-BFGS-B (one process) and vs the sync strategy on the same objective,
and the cost of a straggler with and without backup tasks.

Usage:  python benchmarks/sandblaster_bench.py [--samples 8192 --features 512 --classes 10]
                                               [--portion-size 256] [--json out.json]

One convex problem for everything: L2-regularized softmax regression (mean cross-entropy +
(wd/2)||W||^2, bias not penalized) on a generated set, from the same starting point (the linear
model's seeded initialization). The anchors, in the same run:

* scipy.optimize.minimize(method="L-BFGS-B") in this process (numpy float64 objective); its result
  with tight tolerances defines f*. "To f*" = first iteration with f <= f* (1 + 1e-6).
* `mpisgd train --strategy sync` (SGD + momentum 0.9, the same decay on weights only via
  --no-decay-bias-bn) on 2 ranks x batch 64; the objective of each epoch's checkpoint is computed
  here. --sync-lr 0.1 was the best of 0.02, 0.05, 0.1, 0.2, 0.3, 0.5 after 5 epochs on the default
  problem (0.5 diverges).

Straggler: one of the two workers is stopped 3 ms out of every 4 ms (SIGSTOP/SIGCONT from this
process, i.e. 4x slower), with backup tasks on and off, at two portion sizes (many small portions:
dynamic hand-out absorbs the straggler; few large ones: the pass waits for its last portion); time
per objective evaluation (a pass) is taken from the metrics, after start-up.

Job wall times include interpreter/torch start-up, which on a loaded 2-core machine is most of a
small run; "train s" is the coordinator's clock from its first evaluation. Other jobs on a shared
machine make times noisy: scipy runs --repeats times and the straggler matrix --repeats rounds
(interleaved), and the fastest of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
from scipy.optimize import minimize

from mpisgd.faults import MARKER_VARIABLE, duty_cycle, pid_of_rank

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RELATIVE_GAP = 1e-6


def objective_and_gradient(x, y, classes, weight_decay):
    features = x.shape[1]
    onehot = np.eye(classes)[y]

    def fun(theta):
        w, b = theta[:classes * features].reshape(classes, features), theta[classes * features:]
        logits = x @ w.T + b
        logits -= logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        p = np.exp(logits - log_z)
        f = float(np.mean(log_z[:, 0] - (onehot * logits).sum(axis=1)) + 0.5 * weight_decay * np.sum(w * w))
        residual = (p - onehot) / len(y)
        return f, np.concatenate([(residual.T @ x + weight_decay * w).ravel(), residual.sum(axis=0)])
    return fun


def run_job(nprocs, args, *, env=None, on_start=None, metrics=None, timeout=900):
    """mpiexec -n nprocs args; ``on_start(marker)`` runs in a thread once ``metrics`` has a line."""
    marker = f"bench-{time.monotonic_ns()}"
    command = [str(BIN / "mpiexec"), "-n", str(nprocs), *map(str, args)]
    stop = threading.Event()
    thread = None
    if on_start is not None:
        def wait_then_act():
            while not stop.is_set():
                if metrics.exists() and metrics.stat().st_size > 0:
                    on_start(marker, stop)
                    return
                time.sleep(0.02)
        thread = threading.Thread(target=wait_then_act, daemon=True)
        thread.start()
    start = time.perf_counter()
    environment = {**os.environ, MARKER_VARIABLE: marker, **(env or {})}
    done = subprocess.run(command, check=False, env=environment,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          cwd=ROOT)
    elapsed = time.perf_counter() - start
    stop.set()
    if thread:
        thread.join()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}")
    return elapsed, " ".join(command)


def straggle(rank, stopped_s=0.003, running_s=0.001):
    def act(marker, stop):
        duty_cycle(pid_of_rank(marker, rank), stop, stopped_s=stopped_s, running_s=running_s)
    return act


def scipy_lbfgs(fun, x0, history):
    """scipy's L-BFGS-B with tight tolerances; returns (result, [(seconds, evaluations, f) per iteration])."""
    trace, evaluations = [], [0]

    def counted(theta):
        evaluations[0] += 1
        return fun(theta)

    def callback(intermediate_result):
        trace.append((time.perf_counter() - start, evaluations[0], intermediate_result.fun))

    start = time.perf_counter()
    result = minimize(counted, x0, jac=True, method="L-BFGS-B", callback=callback,
                      options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 5000, "maxcor": history})
    return result, trace


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--portion-size", type=int, default=256)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--sync-epochs", type=int, default=20)
    parser.add_argument("--sync-lr", type=float, default=0.1)
    parser.add_argument("--straggler-iterations", type=int, default=15)
    parser.add_argument("--straggler-portion-sizes", default="256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from mpisgd.checkpoint import load_checkpoint
    from mpisgd.data import make_classification_h5
    from mpisgd.models import build_model

    folder = Path(tempfile.mkdtemp(prefix="sandblaster-bench-"))
    train, val = folder / "train.h5", folder / "val.h5"
    make_classification_h5(train, args.samples, args.features, args.classes, seed=11, sample_seed=1)
    make_classification_h5(val, 2048, args.features, args.classes, seed=11, sample_seed=2)
    with h5py.File(train) as file:
        x, y = file["x"][()].astype(np.float64), file["y"][()]
    fun = objective_and_gradient(x, y, args.classes, args.weight_decay)
    model = build_model("linear", (args.features,), args.classes, seed=0)  # mpisgd's starting point
    x0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()

    # -- scipy anchor ---------------------------------------------------------------------------------
    reference, trace = min((scipy_lbfgs(fun, x0, args.history) for _ in range(max(1, args.repeats))),
                           key=lambda run: run[1][-1][0])
    f_star = reference.fun
    target = f_star * (1 + RELATIVE_GAP)
    scipy_hit = next(i for i, (_, _, f) in enumerate(trace, start=1) if f <= target)
    seconds, scipy_evaluations, _ = trace[scipy_hit - 1]
    rows = [{"method": "scipy L-BFGS-B (1 process)", "iterations": scipy_hit,
             "evaluations": scipy_evaluations, "train_s": seconds, "job_s": None,
             "final_gap": (trace[-1][2] - f_star) / f_star}]

    common = ["--model", "linear", "--data", train, "--val", val, "--weight-decay", args.weight_decay,
              "--no-progress", "--seed", "0"]
    sandblaster = [BIN / "mpisgd", "train", "--strategy", "sandblaster", *common, "--history", args.history]
    commands = []

    # -- sandblaster to f* ------------------------------------------------------------------------------
    for nprocs, servers in ((4, 1), (5, 2)):
        metrics = folder / f"sb-{nprocs}-{servers}.jsonl"
        job_s, command = run_job(nprocs, [*sandblaster, "--servers", servers, "--metrics", metrics,
                                          "--portion-size", args.portion_size,
                                          "--max-iterations", 500, "--gradient-tolerance", 1e-9])
        commands.append(command)
        records = [r for r in read_jsonl(metrics) if "train_objective" in r]
        hit = next((r for r in records if r["train_objective"] <= target), None)
        rows.append({"method": f"sandblaster P={nprocs} S={servers} ({nprocs - servers - 1} workers)",
                     "iterations": hit and hit["step"], "evaluations": hit and hit["function_evaluations"],
                     "train_s": hit and hit["wall_time"], "job_s": job_s,
                     "final_gap": (records[-1]["train_objective"] - f_star) / f_star})

    # -- sync SGD on the same objective -------------------------------------------------------------------
    sync_dir = folder / "sync"
    metrics = folder / "sync.jsonl"
    job_s, command = run_job(2, [BIN / "mpisgd", "train", "--strategy", "sync", *common, "--no-decay-bias-bn",
                                 "--epochs", args.sync_epochs, "--batch-size", 64, "--lr", args.sync_lr,
                                 "--momentum", 0.9,
                                 "--metrics", metrics, "--log-every", 1, "--checkpoint-dir", sync_dir])
    commands.append(command)
    wall = {r["step"]: r["wall_time"] for r in read_jsonl(metrics) if "loss" in r}
    sync_curve = []
    for path in sorted(sync_dir.glob("checkpoint-*.h5")):
        state = load_checkpoint(path)
        w, b = (state["model_state"][k].double().numpy() for k in ("1.weight", "1.bias"))
        f = fun(np.concatenate([w.ravel(), b]))[0]
        sync_curve.append({"epoch": len(sync_curve) + 1, "step": state["extra"]["step"],
                           "wall_s": wall.get(state["extra"]["step"]), "gap": (f - f_star) / f_star})
    best = min(sync_curve, key=lambda point: point["gap"])
    rows.append({"method": f"sync SGD 2x64, lr {args.sync_lr}, {args.sync_epochs} epochs", "iterations": None,
                 "evaluations": None, "train_s": None, "job_s": job_s, "final_gap": sync_curve[-1]["gap"],
                 "best_gap": best["gap"], "best_gap_epoch": best["epoch"], "curve": sync_curve})

    # -- straggler x backup tasks ---------------------------------------------------------------------------
    sizes = [int(size) for size in args.straggler_portion_sizes.split(",")]
    matrix = [(n, slow, on) for n in sizes for slow in (False, True) for on in (True, False)]
    measured: dict = {}
    for round_ in range(max(1, args.repeats)):
        for portion_size, slow, backups in matrix:
            metrics = folder / f"straggle-{portion_size}-{slow}-{backups}-{round_}.jsonl"
            job_s, command = run_job(
                4, [*sandblaster, "--servers", 1, "--metrics", metrics, "--gradient-tolerance", 1e-12,
                    "--max-iterations", args.straggler_iterations, "--portion-size", portion_size,
                    "--backup-tasks" if backups else "--no-backup-tasks"],
                on_start=straggle(3) if slow else None, metrics=metrics)
            if round_ == 0:
                commands.append(command + (" (+ rank 3 stopped 3 ms of every 4 ms)" if slow else ""))
            records = [r for r in read_jsonl(metrics) if "train_objective" in r]
            first, last = records[1], records[-1]  # from the end of iteration 1: the straggler is running
            passes = last["function_evaluations"] - first["function_evaluations"]
            seconds = last["wall_time"] - first["wall_time"]
            row = {"portion_size": portion_size, "straggler": "4x" if slow else "none",
                   "backup_tasks": backups, "s_per_iteration": seconds / (last["step"] - first["step"]),
                   "s_per_pass": seconds / passes,
                   "backup_portions": sum(r["backup_portions"] for r in records[2:]),
                   "portions_fast_worker": sum(r["portions_per_worker"]["2"] for r in records[2:]),
                   "portions_slow_worker": sum(r["portions_per_worker"]["3"] for r in records[2:]),
                   "final_objective": last["train_objective"], "job_s": job_s}
            key = (portion_size, slow, backups)
            measured.setdefault(key, []).append(row)
    straggler_rows = []
    for key in matrix:
        fastest = dict(min(measured[key], key=lambda row: row["s_per_pass"]))
        fastest["all_s_per_pass"] = [row["s_per_pass"] for row in measured[key]]
        straggler_rows.append(fastest)

    # -- report -------------------------------------------------------------------------------------------
    print(f"problem: softmax regression, {args.samples} samples x {args.features} features x {args.classes} "
          f"classes, weight decay {args.weight_decay}, portion {args.portion_size} rows "
          f"({-(-args.samples // args.portion_size)} per pass), history {args.history}; f* = {f_star:.12g}")
    print(f"\nto f* (1 + {RELATIVE_GAP:g})        iterations  evaluations   train s     job s"
          "   final rel. gap")
    for row in rows:
        cells = [row["iterations"], row["evaluations"], row["train_s"], row["job_s"]]
        text = "".join(f"{'-' if c is None else (f'{c:.2f}' if isinstance(c, float) else c):>12}"
                       for c in cells)
        print(f"{row['method']:<44}{text}   {row['final_gap']:.2e}")
    print(f"sync: best relative gap {best['gap']:.2e} (epoch {best['epoch']}); per epoch: "
          + ", ".join(f"{p['gap']:.1e}" for p in sync_curve))
    print("\nportion  straggler  backups  s/iteration   s/pass  vs none+on  backups issued"
          "  portions fast/slow")
    for row in straggler_rows:
        baseline = next(r["s_per_pass"] for r in straggler_rows if r["portion_size"] == row["portion_size"]
                        and r["straggler"] == "none" and r["backup_tasks"])
        backups = "on" if row["backup_tasks"] else "off"
        print(f"{row['portion_size']:>7}  {row['straggler']:<10} {backups:<7}{row['s_per_iteration']:>12.4f}"
              f"{row['s_per_pass']:>9.4f}{row['s_per_pass'] / baseline:>11.2f}x{row['backup_portions']:>16}"
              f"{row['portions_fast_worker']:>12}/{row['portions_slow_worker']}")
    for size in sizes:
        finals = {row["final_objective"] for key, runs in measured.items() if key[0] == size for row in runs}
        same = "identical" if len(finals) == 1 else f"NOT identical: {sorted(finals)}"
        print(f"portion {size}: the final objective of its {4 * max(1, args.repeats)} runs is {same}")
    print("\ncommands:\n  " + "\n  ".join(commands))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "f_star": f_star, "to_optimum": rows,
                                               "straggler": straggler_rows, "commands": commands}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
