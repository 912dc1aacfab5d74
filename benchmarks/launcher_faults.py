"""What a launcher lets a job survive: the last of 3 ranks faults (raises, exits with 3, exits with 0
without MPI_Finalize, SIGSTOPs itself, SIGKILLs itself); the other two go on exchanging messages for
4 s, then rank 0 ends the job with MPI_Abort(COMM_WORLD, 0), as Downpour and Sandblaster do.

    python benchmarks/launcher_faults.py                                   # this environment's mpiexec
    python benchmarks/launcher_faults.py -- --runtime-options error-nonzero-status=false   # PRRTE flags
    python benchmarks/launcher_faults.py -- -disable-auto-cleanup          # hydra flags

One line per fault: mpiexec's exit status and how many of the 2 other ranks finished their exchanges
(2: survived). Table and reading: docs/cluster.rst, "Lost workers".
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FAULTS = ("raise", "exit3", "exit0", "stop", "kill")
BOUND_S = 40  # a job still running then counts as hung (the survivors need ~5 s)


def rank_program(fault: str) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    comm.Barrier()
    if rank == size - 1:
        time.sleep(0.5)
        if fault == "raise":
            raise RuntimeError("fault: raise")
        if fault in ("exit3", "exit0"):
            os._exit(int(fault[-1]))
        os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        time.sleep(BOUND_S)
        return
    start, exchanges = time.monotonic(), 0
    while time.monotonic() - start < 4:
        if rank == 0:
            comm.send(exchanges, dest=1)
            comm.recv(source=1)
        elif rank == 1:
            comm.recv(source=0)
            comm.send(exchanges, dest=0)
        exchanges += 1
        time.sleep(0.01)
    print(f"rank {rank} survived {exchanges} exchanges", flush=True)
    if rank == 1:
        comm.send("done", dest=0)
    elif rank == 0:
        comm.recv(source=1)
        comm.Abort(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-program", choices=FAULTS, help=argparse.SUPPRESS)
    parser.add_argument("flags", nargs="*", help="mpiexec flags (after --)")
    args = parser.parse_args()
    if args.rank_program:
        rank_program(args.rank_program)
        return
    bin_dir = Path(sys.executable).parent
    mpiexec = str(bin_dir / "mpiexec")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    library = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                             capture_output=True, text=True, check=True).stdout.splitlines()[0]
    print(f"{library.strip()}; mpiexec {' '.join(args.flags) or '(no flags)'}")
    oversubscribe = ["--oversubscribe"] if "Open MPI" in library else []
    for fault in FAULTS:
        command = [mpiexec, *oversubscribe, *args.flags, "-n", "3", sys.executable, __file__, "--rank-program", fault]
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=BOUND_S)
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = f"hung ({BOUND_S} s)"
        survivors = out.decode(errors="replace").count("survived")
        print(f"  {fault:6} {status:14} survivors {survivors}/2  {time.monotonic() - started:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
