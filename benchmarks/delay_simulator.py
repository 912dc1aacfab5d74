"""ASGD vs DC-ASGD (constant and adaptive lambda) at exact delays: each gradient applied tau updates late.

Usage: python benchmarks/delay_simulator.py [--seeds 5] [--taus 0,4,8,16] [--updates 1500] [--json out.json]

In-process and deterministic (mpisgd.downpour.delay_simulator: the servers' SGD rule, the workers' delay
compensation, no MPI): on the built-in data set, the same model and learning rate as `mpisgd train
--strategy dcasgd`. The anchor is tau = 0 (sequential SGD) of the same seed, printed in the same table;
the columns are final validation accuracy (mean and spread over seeds) and updates to the target accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch

from mpisgd.data import ShardedHDF5, default_dataset
from mpisgd.downpour.delay_simulator import METHODS, endless, simulate
from mpisgd.models import build_model

logger = logging.getLogger("delay_simulator")


def run_one(seed: int, tau: int, method: str, args: argparse.Namespace) -> dict:
    files = default_dataset()
    train = ShardedHDF5(str(files.train_path), 0, 1, batch_size=args.batch_size, seed=seed)
    val = ShardedHDF5(str(files.val_path), 0, 1, batch_size=512, shuffle=False)
    model = build_model(args.model, files.input_shape, files.num_classes, tuple(args.hidden), seed=seed)
    _, evaluations = simulate(model, endless(train), updates=args.updates, tau=tau, method=method, lr=args.lr,
                              weight_decay=args.weight_decay,
                              dc_lambda=args.dc_lambda_adaptive if method == "dcasgd-adaptive" else args.dc_lambda,
                              evaluate=list(val.iter_evaluation()), eval_every=args.eval_every)
    reached = next((e.updates for e in evaluations if e.accuracy >= args.target), None)
    return {"seed": seed, "tau": tau, "method": method, "final_accuracy": evaluations[-1].accuracy,
            "updates_to_target": reached}


def summarize(rows: list, target: float) -> list:
    table = []
    for tau in sorted({r["tau"] for r in rows}):
        for method in METHODS:
            group = [r for r in rows if r["tau"] == tau and r["method"] == method]
            if not group:
                continue
            accuracies = [r["final_accuracy"] for r in group]
            reached = [r["updates_to_target"] for r in group if r["updates_to_target"] is not None]
            table.append({"tau": tau, "method": method, "seeds": len(group),
                          "accuracy_mean": statistics.mean(accuracies),
                          "accuracy_sd": statistics.stdev(accuracies) if len(group) > 1 else 0.0,
                          "reached_target": f"{len(reached)}/{len(group)}",
                          "updates_to_target_mean": statistics.mean(reached) if reached else None})
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--taus", default="0,4,8,16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")], default=[256, 128])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dc-lambda", type=float, default=0.04, help="lambda of dcasgd-constant (Zheng et al.: 0.04)")
    parser.add_argument("--dc-lambda-adaptive", type=float, default=2.0,
                        help="lambda0 of dcasgd-adaptive (Zheng et al.: 2)")
    parser.add_argument("--json", help="write the rows and the summary here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    for tau in (int(t) for t in args.taus.split(",")):
        for method in args.methods.split(","):
            for seed in range(args.seeds):
                rows.append(run_one(seed, tau, method, args))
    table = summarize(rows, args.target)
    logger.info("delay simulator: %s, lr %g, batch %d, lambda %g (constant) / %g (adaptive), %d updates, "
                "target %.2f (%.0f s)", args.model, args.lr, args.batch_size, args.dc_lambda,
                args.dc_lambda_adaptive, args.updates, args.target,
                time.perf_counter() - start)
    logger.info("| tau | method | final val accuracy (mean ± sd, %d seeds) | reached %.2f | updates to it (mean) |",
                args.seeds, args.target)
    logger.info("|---|---|---|---|---|")
    for row in table:
        updates = "-" if row["updates_to_target_mean"] is None else f"{row['updates_to_target_mean']:.0f}"
        logger.info("| %d | %s | %.4f ± %.4f | %s | %s |", row["tau"], row["method"], row["accuracy_mean"],
                    row["accuracy_sd"], row["reached_target"], updates)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "rows": rows, "summary": table}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
