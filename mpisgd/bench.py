"""`mpisgd bench allreduce`: OSU-style side-by-side timing of the all-reduce algorithms.

For each message size, every algorithm runs in the same interleaved rounds, the order rotating from
round to round (so machine noise hits all of them alike): warm-up calls, then timed calls each preceded
by a barrier. A call's time is the slowest rank's; the reported time is the median over calls. Bus bandwidth follows nccl-tests:
bytes / time · 2(p−1)/p, the rate each link must sustain.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Sequence
from functools import partial
from typing import Optional

import numpy as np
from mpi4py import MPI

from mpisgd.comm.communicator import ALGORITHM_NAMES, AllreduceConfig, Communicator
from mpisgd.errors import ConfigError

DEFAULT_SIZES = "4KiB,16KiB,64KiB,256KiB,1MiB,2MiB,4MiB,16MiB,64MiB"
_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "K": 1 << 10, "M": 1 << 20,
          "G": 1 << 30, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3}


def parse_size(text: str) -> int:
    """'4KiB' -> 4096; '64MiB', '1M', '4096' also work."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 4KiB, 2MiB, 65536")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_sizes(text: str) -> list[int]:
    """A comma list ('4KiB,1MiB') or a doubling range ('4KiB:64MiB')."""
    if ":" in text:
        lo, hi = (parse_size(part) for part in text.split(":", 1))
        if lo <= 0 or hi < lo:
            raise ConfigError(f"size range {text!r} must go from a positive size up")
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 2
        return sizes
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) <= 0:
        raise ConfigError(f"--sizes {text!r} must list positive sizes")
    return sizes


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def iterations_for(nbytes: int, budget_bytes: int = 256 << 20) -> int:
    """Many calls for small messages, fewer for large ones (bounded run time)."""
    return int(min(200, max(5, budget_bytes // max(nbytes, 1))))


def time_calls(comm: Communicator, fn, iterations: int) -> list[float]:
    """Per-call times (slowest rank), each call after a barrier."""
    local = np.empty(iterations)
    for i in range(iterations):
        comm.mpi.Barrier()
        start = time.perf_counter()
        fn()
        local[i] = time.perf_counter() - start
    comm.mpi.Allreduce(MPI.IN_PLACE, local, op=MPI.MAX)
    return local.tolist()


def bench_allreduce(comm: Communicator, sizes: Sequence[int], algorithms: Sequence[str], *,
                    dtype: str = "float32", warmup: int = 3, iterations: Optional[int] = None) -> list[dict]:
    """Rows of {size_bytes, algorithm, time_s, busbw_gbs, ratio_to_native, chosen} per size/algorithm."""
    for name in algorithms:
        if name not in ALGORITHM_NAMES:
            raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHM_NAMES)}")
    # Time the algorithms themselves; the mismatch check is timed separately below.
    unchecked = Communicator(comm.mpi, config=AllreduceConfig(
        native_below_bytes=comm.config.native_below_bytes,
        non_power_of_two=comm.config.non_power_of_two, check_collectives=False))
    checked = Communicator(comm.mpi, config=AllreduceConfig(check_collectives=True))
    itemsize = np.dtype(dtype).itemsize
    rows = []
    for nbytes in sizes:
        data = np.zeros(max(nbytes // itemsize, 1), dtype=dtype)  # stays finite however often summed
        iters = iterations or iterations_for(nbytes)
        times: dict[str, list[float]] = {name: [] for name in algorithms}
        for _ in range(warmup):
            for name in algorithms:
                unchecked.allreduce_(data, algorithm=name)
        # interleave in rounds of a few calls, rotating who goes first, so noise and the after-effects
        # of the previous algorithm (ranks out of step on an oversubscribed node) are shared fairly
        rounds = max(len(algorithms), iters // 5)
        for round_number in range(rounds):
            shift = round_number % len(algorithms)
            for name in [*algorithms[shift:], *algorithms[:shift]]:
                times[name] += time_calls(unchecked, partial(unchecked.allreduce_, data, algorithm=name),
                                          max(1, iters // rounds))
        # what a default (checked) call costs: the check rides in the payload's message where it can
        checked_time = statistics.median(time_calls(checked, partial(checked.allreduce_, data), max(20, iters // 2)))
        native = statistics.median(times["native"]) if "native" in times else None
        p = comm.size
        for name in algorithms:
            t = statistics.median(times[name])
            rows.append({
                "size_bytes": nbytes, "algorithm": name,
                "chosen": unchecked.choose_algorithm(nbytes) if name == "auto" else name,
                "time_s": t, "busbw_gbs": (nbytes / t) * 2 * (p - 1) / p / 1e9 if p > 1 else 0.0,
                "ratio_to_native": t / native if native else None,
                "checked_auto_s": checked_time, "ranks": p, "dtype": dtype, "calls": len(times[name]),
            })
    # collective (shared windows): only on success, so that a rank unwinding from an error does not wait
    # in it for the others, but reaches the abort of the ``mpisgd`` command
    unchecked.free()
    checked.free()
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per size and algorithm: time, bus bandwidth, ratio to native."""
    lines = [f"{'size':>8} {'algorithm':>10} {'time [us]':>11} {'busbw [GB/s]':>13} {'x native':>9}  note"]
    for row in rows:
        ratio = f"{row['ratio_to_native']:.2f}" if row["ratio_to_native"] is not None else "-"
        note = f"auto chose {row['chosen']}" if row["algorithm"] == "auto" else ""
        lines.append(f"{format_size(row['size_bytes']):>8} {row['algorithm']:>10} {row['time_s'] * 1e6:>11.1f} "
                     f"{row['busbw_gbs']:>13.2f} {ratio:>9}  {note}")
    if rows:
        lines.append(f"(ranks: {rows[0]['ranks']}, dtype {rows[0]['dtype']}; time = median over calls of the "
                     "slowest rank; rows are unchecked)")
        for row in rows:
            if row["algorithm"] == "native":
                lines.append(f"{format_size(row['size_bytes']):>8} default (auto, mismatch check on): "
                             f"{row['checked_auto_s'] * 1e6:.1f} us = {row['checked_auto_s'] / row['time_s']:.2f}x native")
    return "\n".join(lines)


def write_json(path: str, rows: list[dict], meta: dict) -> None:
    with open(path, "w") as out:
        json.dump({"meta": meta, "rows": rows}, out, indent=1)
