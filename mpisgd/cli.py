"""The `mpisgd` command: argparse -> validated config -> run, on every MPI rank.

Each subcommand has an optional ``configure(args)`` (pure: no MPI, no files that differ per rank,
so it fails identically everywhere) and a ``handler(config)``.

Every subcommand takes ``--log-level``; the library's log lines then go to stderr prefixed with the
rank (`mpisgd.log.setup_logging`). Only this module prints.

Failure policy, so that no job hangs: an error that every rank raised together (bad flags, a
configure error, a collectively checked input) makes every rank print it and exit 2; any other exception on any rank
prints that rank's message and traceback and aborts the whole job (MPI_Abort), because a rank that
merely exits leaves the others waiting in their next collective forever. ``mpisgd train`` stopped by
SIGTERM, SIGUSR1 or SIGINT exits 75 (`mpisgd.training.preemption.EXIT_PREEMPTED`) once its checkpoint is
written.
"""

from __future__ import annotations

import argparse
import faulthandler
import socket
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Optional

from mpisgd import __version__
from mpisgd.errors import CollectiveTimeout, ConfigError, MpisgdError
from mpisgd.log import LEVELS, setup_logging

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
#: a collective made no progress for --collective-timeout seconds: every live rank printed which ranks were
#: missing, and the job was aborted (the missing ranks may never exit by themselves)
EXIT_COLLECTIVE_TIMEOUT = CollectiveTimeout.exit_code


def _print_rank0(comm, text: str) -> None:
    if comm.rank == 0:
        print(text, flush=True)


# ---- mpisgd info -----------------------------------------------------------------------------

def run_info(args: argparse.Namespace) -> int:
    """Print MPI library, thread level, ranks, node-local layout, CUDA-awareness and backends."""
    from mpi4py import MPI

    from mpisgd import devices as backend
    from mpisgd.comm import get_communicator

    comm = get_communicator()
    grid: list[str] = []
    if args.stages > 1 or args.tensor_parallel > 1:  # the same on every rank: a bad layout exits 2 on all
        from mpisgd.modelparallel.grid import describe_grid
        grid = describe_grid(comm.size, args.stages, args.tensor_parallel, args.servers)
    try:
        device = backend.select_device(comm.local_rank, comm.local_size, want_gpu=args.gpu,
                                       share_gpus=args.share_gpus)
        error = None
    except ConfigError as exc:
        device, error = "-", exc
    comm.raise_together(error)
    rows = comm.allgather_objects((comm.rank, socket.gethostname(), comm.local_rank, comm.local_size, device),
                                  name="mpisgd info (each rank's row)")  # watched: a stopped rank is named
    if comm.rank != 0:  # only rank 0 prints
        return 0
    levels = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
              MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED", MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE"}
    aware = backend.cuda_awareness()
    version = MPI.Get_version()
    lines = [
        f"mpisgd {__version__}",
        f"MPI library: {MPI.Get_library_version().strip().splitlines()[0].strip()}",
        f"MPI standard: {version[0]}.{version[1]}; mpi4py {__import__('mpi4py').__version__}",
        f"thread level: {levels.get(MPI.Query_thread(), MPI.Query_thread())}",
        f"ranks: {comm.size}",
        f"nodes: {comm.num_nodes}",
    ]
    for rank, host, local_rank, local_size, dev in rows:
        lines.append(f"rank {rank}: host {host} node-local rank {local_rank}/{local_size} device {dev}")
    lines.append(f"CUDA-aware MPI: {'yes' if aware.cuda_aware else 'no'} ({aware.how})")
    for name, version_text in backend.available_backends().items():
        lines.append(f"array backend {name}: {version_text}")
    cfg = comm.config
    shm = f"shm below {comm.shm_below_bytes} bytes, " if comm.shm_below_bytes else ""
    shm += "fused host buckets from 256 KiB through shm, " if comm.shm_for_fusion else ""
    shm += ("hier (each node's sum through its window, then across nodes) from there and for fused host "
            "buckets, " if comm.hierarchical else "")
    pieces = f"in pieces of {comm.segment_bytes} bytes" if comm.segment_bytes else "whole"
    lines.append(f"allreduce auto: native below {comm.native_below_bytes} bytes, {shm}rhd for power-of-two "
                 f"ranks, {cfg.non_power_of_two} otherwise; rhd/ring reduce host data {pieces}; collective "
                 f"checks {'on' if cfg.check_collectives else 'off'}")
    lines += grid
    print("\n".join(lines), flush=True)
    return 0


# ---- mpisgd bench allreduce -----------------------------------------------------------------

def configure_bench_allreduce(args: argparse.Namespace) -> argparse.Namespace:
    from mpisgd import bench
    from mpisgd.comm.communicator import ALGORITHM_NAMES

    args.sizes = bench.parse_sizes(args.sizes)
    args.algorithms = [a.strip() for a in (args.algorithms or "").split(",") if a.strip()]
    for name in args.algorithms:
        if name not in ALGORITHM_NAMES:
            raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHM_NAMES)}")
    return args


def run_bench_allreduce(args: argparse.Namespace) -> int:
    from mpisgd import bench
    from mpisgd.comm import get_communicator

    comm = get_communicator()
    window = {"shm": comm.single_node, "hier": comm.equal_nodes_of_several}
    algorithms = args.algorithms or [a for a in ("native", "rhd", "ring", "shm", "hier", "auto")
                                     if window.get(a, True)]  # shm serves one node, hier several alike
    rows = bench.bench_allreduce(comm, args.sizes, algorithms, dtype=args.dtype, warmup=args.warmup,
                                 iterations=args.iterations)
    _print_rank0(comm, bench.format_table(rows))
    if args.json and comm.rank == 0:
        bench.write_json(args.json, rows, {"command": " ".join(sys.argv), "ranks": comm.size})
    return 0


# ---- mpisgd train / make-data / plot --------------------------------------------------------

def configure_train(args: argparse.Namespace) -> Any:
    from mpisgd.training.config import train_config_from
    return train_config_from(args)


def run_train(cfg: Any) -> int:
    from mpisgd.comm import get_communicator
    from mpisgd.training import preemption
    from mpisgd.training.registry import run_strategy

    comm = get_communicator()
    result = run_strategy(cfg, comm)
    _print_rank0(comm, result.finished_line())
    return preemption.EXIT_PREEMPTED if result.stopped == preemption.PREEMPTED else 0


def configure_make_data(args: argparse.Namespace) -> argparse.Namespace:
    if args.image_shape:
        try:
            args.image_shape = tuple(int(v) for v in args.image_shape.split(","))
        except ValueError:
            raise ConfigError(f"--image-shape must be like 1,8,8, got {args.image_shape!r}") from None
        features = 1
        for dim in args.image_shape:
            features *= dim
        args.features = features
    for name in ("samples", "features", "classes"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be positive")
    return args


def run_make_data(args: argparse.Namespace) -> int:
    """Written by one process only, so launching it under mpiexec is harmless."""
    from mpi4py import MPI

    from mpisgd.data import make_classification_h5

    if MPI.COMM_WORLD.Get_rank() == 0:
        make_classification_h5(args.output, n_samples=args.samples, n_features=args.features,
                               n_classes=args.classes, seed=args.seed, image_shape=args.image_shape,
                               sample_seed=args.sample_seed)
        print(f"wrote {args.samples} samples of {args.features} features, {args.classes} classes to {args.output}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from mpisgd.metrics import plot_metrics

    for path in args.metrics:
        import os
        if not os.path.exists(path):
            raise ConfigError(f"metrics file {path} does not exist")
    print(f"wrote {plot_metrics(args.metrics, args.output)}")
    return 0


# ---- parser ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that says 'mpisgd: error: ...' and exits 2, identically on every rank (and only once
    every rank has said it: :func:`_leave_together`)."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        from mpisgd.preflight import launched_tasks

        if launched_tasks() > 1 and sys.argv[1:2] != ["plot"]:  # a plot never starts MPI
            _leave_together(EXIT_BAD_INPUT)
        sys.exit(EXIT_BAD_INPUT)


#: how long ranks that failed alike wait for each other to have said why (:func:`_leave_together`)
LEAVE_TOGETHER_S = 30.0


def _leave_together(code: int) -> None:
    """Ranks that fail alike (bad input, the same on every rank) exit only once every rank has printed its
    error: Open MPI's launcher ends the job as soon as one rank exits non-zero, which cut a slower rank's
    message off (seen in CI: 2 of 3 ranks said why). A barrier, waited on for at most LEAVE_TOGETHER_S;
    a rank that never comes (it did not fail alike) ends the job instead, with ``code``."""
    from mpi4py import MPI

    from mpisgd.comm.abort import abort_world
    from mpisgd.comm.wait import wait_until

    request = MPI.COMM_WORLD.Ibarrier()
    wait_until(request.Test, timeout=LEAVE_TOGETHER_S, what="the other ranks' errors",
               on_timeout=lambda: abort_world(code))


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _common_options() -> _Parser:
    """The options of every subcommand."""
    common = _Parser(add_help=False)
    common.add_argument("--log-level", choices=LEVELS, default="info",
                        help="least severe library messages shown, on stderr with the rank (default info)")
    common.add_argument("--collective-timeout", type=seconds, default=None, metavar="SECONDS",
                        help="a collective without progress for this long ends the job on every live rank, "
                             "naming the missing ranks (default: MPISGD_COLLECTIVE_TIMEOUT, else 600; 0: off)")
    common.add_argument("--stall-warning", type=seconds, default=None, metavar="SECONDS",
                        help="a collective waiting this long logs which ranks have not arrived (default: "
                             "MPISGD_STALL_WARNING, else 60; 0: never)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpisgd", description="Distributed SGD over MPI. Launch with "
                     "`mpiexec -n P mpisgd ...` or `srun mpisgd ...`.")
    parser.add_argument("--version", action="version", version=f"mpisgd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = [_common_options()]

    info = sub.add_parser("info", parents=common,
                          help="MPI library, ranks, node-local ranks, GPU mapping, CUDA-awareness")
    info.add_argument("--gpu", action="store_true", help="show the rank -> GPU mapping used in GPU mode")
    info.add_argument("--share-gpus", action="store_true", help="allow more ranks per node than GPUs")
    info.add_argument("--stages", type=positive_int, default=1,
                      help="show the model-parallel grid of this many stages: the world ranks of every "
                           "pipeline, stage and split communicator")
    info.add_argument("--tensor-parallel", type=positive_int, default=1, help="splits per stage of that grid")
    info.add_argument("--servers", type=int, default=0,
                      help="parameter-server ranks ahead of the grid (downpour/dcasgd)")
    info.set_defaults(handler=run_info)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    allreduce = bench_sub.add_parser("allreduce", parents=common, help="time rhd, ring, shm, native and auto side by side")
    allreduce.add_argument("--sizes", default="4KiB,16KiB,64KiB,256KiB,1MiB,2MiB,4MiB,16MiB,64MiB",
                           help="comma list (4KiB,1MiB) or doubling range (4KiB:64MiB) of message sizes")
    allreduce.add_argument("--algorithms", default=None,
                           help="comma list (default: native,rhd,ring,shm,auto; shm only on one node)")
    allreduce.add_argument("--dtype", default="float32", choices=["float32", "float64", "int32", "int64"])
    allreduce.add_argument("--warmup", type=positive_int, default=3)
    allreduce.add_argument("--iterations", type=positive_int, default=None,
                           help="timed calls per size and algorithm (default: scaled by size)")
    allreduce.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    allreduce.set_defaults(configure=configure_bench_allreduce, handler=run_bench_allreduce)

    from mpisgd.training.config import add_train_arguments

    train = sub.add_parser("train", parents=common,
                           help="train a model (mpiexec -n P mpisgd train --strategy sync ...)")
    add_train_arguments(train)
    train.set_defaults(configure=configure_train, handler=run_train)

    make_data = sub.add_parser("make-data", parents=common, help="write a generated classification set to HDF5")
    make_data.add_argument("output", help="HDF5 file to write (datasets x and y)")
    make_data.add_argument("--samples", type=int, default=10000)
    make_data.add_argument("--features", type=int, default=64)
    make_data.add_argument("--classes", type=int, default=10)
    make_data.add_argument("--image-shape", help="write x as images C,H,W (overrides --features)")
    make_data.add_argument("--seed", type=int, default=0, help="seed of the class structure")
    make_data.add_argument("--sample-seed", type=int, default=None,
                           help="seed of the samples (use the same --seed and another --sample-seed for a "
                                "validation file of the same problem)")
    make_data.set_defaults(configure=configure_make_data, handler=run_make_data)

    plot = sub.add_parser("plot", parents=common, help="plot loss and accuracy vs step and wall time from metrics files")
    plot.add_argument("metrics", nargs="+", help="JSONL metrics files (several runs on one figure)")
    plot.add_argument("-o", "--output", default="curves.png")
    plot.set_defaults(handler=run_plot)
    return parser


_MPI_FREE_HANDLERS = {run_plot}  # subcommands that never touch MPI (a plot runs on a login node, without mpiexec)
_mpi_needed = True


def _world_position() -> tuple[int, int]:
    """(rank, size) in MPI_COMM_WORLD, initializing MPI; (0, 1) for a subcommand that needs no MPI."""
    if not _mpi_needed:
        return 0, 1
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    return world.Get_rank(), world.Get_size()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate (pure, identical on every rank), then run the subcommand."""
    global _mpi_needed
    args = build_parser().parse_args(argv)
    _mpi_needed = args.handler not in _MPI_FREE_HANDLERS
    if _mpi_needed:  # for the communicators the handler creates (mpisgd.comm imports mpi4py's MPI)
        from mpisgd.comm.watchdog import set_defaults
        set_defaults(timeout=getattr(args, "collective_timeout", None), stall_warning=getattr(args, "stall_warning", None))
    if args.handler is run_train:  # a preemption signal during start-up is a stop at the first step
        from mpisgd.training.preemption import install_signal_handlers
        install_signal_handlers()
    rank, size = _world_position()
    setup_logging(args.log_level, rank=rank, size=size)
    faulthandler.enable()  # a crash inside a C library (libhdf5 on a hostile file) still names where it was
    if _mpi_needed:  # before any collective: N one-rank jobs where the launcher started N tasks, say so
        from mpisgd.preflight import check_launch
        try:
            check_launch(size)
        except ConfigError as exc:
            return _fail(f"mpisgd: error: {exc}", EXIT_BAD_INPUT, every_rank=True)
    try:
        configure = getattr(args, "configure", None)
        config = configure(args) if configure else args
    except ConfigError as exc:
        return _fail(f"mpisgd: error: {exc}", EXIT_BAD_INPUT, every_rank=True)
    try:
        code = args.handler(config)
    except ConfigError as exc:
        return _fail(f"mpisgd: error: {exc}", EXIT_BAD_INPUT, every_rank=exc.every_rank)
    except CollectiveTimeout as exc:  # printed by every live rank, then the job is ended: the missing never exit
        return _fail(f"mpisgd: error: {exc}", EXIT_COLLECTIVE_TIMEOUT, every_rank=False)
    except MpisgdError as exc:
        every_rank = exc.every_rank
        detail = f"mpisgd: error: {exc}" if every_rank else traceback.format_exc()
        return _fail(detail, EXIT_FAILURE, every_rank=every_rank)
    except Exception:
        return _fail("".join(traceback.format_exc()), EXIT_FAILURE, every_rank=False)
    sys.stdout.flush()
    return code or 0


def _fail(message: str, code: int, *, every_rank: bool) -> int:
    from mpisgd import log

    rank, size = _world_position()
    prefix = f"[rank {rank}] " if size > 1 else ""
    log.flush()
    print(prefix + message.rstrip(), file=sys.stderr, flush=True)
    if size > 1 and not every_rank:
        from mpisgd.comm.abort import abort_world
        abort_world(code)
    elif size > 1 and code == EXIT_BAD_INPUT:  # bad input fails alike on every rank: say so on every rank
        _leave_together(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
