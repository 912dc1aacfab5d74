"""The collective watchdog under mpiexec: a frozen rank is named and the job ends; a slow rank is not a dead one.

How faults are made: ``MPISGD_TEST_SYNC_FAULT`` (mpisgd/faults.py) acts in ``DistributedOptimizer.step``
before the step's gradient all-reduce: ``freeze`` SIGSTOPs the rank (nothing continues it: the job must
end by itself), ``slow`` sleeps at every step (a straggler that always arrives), ``raise`` raises. The bare
``mpisgd.allreduce_`` loop freezes one rank from its own code. "Within timeout + 10 s" is the timeout of
the wait for the job's end, counted from the line the frozen rank logs as it stops; no wall time is
measured. Frozen ranks are found by their marker (faults.pid_of_rank) and SIGKILLed afterwards, whatever
happened, so nothing is left stopped.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
from helpers import ROOT, launcher_environment, launcher_flags, mpiexec, mpisgd_command, run_mpi

from mpisgd.faults import (
    EVALUATION_FAULT_VARIABLE,
    MARKER_VARIABLE,
    MODEL_PARALLEL_FAULT_VARIABLE,
    SHARD_GATHER_FAULT_VARIABLE,
    SYNC_FAULT_VARIABLE,
    pid_of_rank,
)

COLLECTIVE_TIMEOUT_S = 5
START_TIMEOUT_S = 180  # until the fault strikes: start-up of three ranks (torch imports) on a loaded machine
EXIT_COLLECTIVE_TIMEOUT = 4  # mpisgd.cli.EXIT_COLLECTIVE_TIMEOUT, documented in docs/troubleshooting.rst


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("watchdog") / "train.h5"
    made = run_mpi(1, [mpisgd_command(), "make-data", str(path), "--samples", "480", "--features", "8",
                       "--classes", "3"], timeout=120)
    assert made.returncode == 0, made.stdout
    return path


def run_until_frozen(nprocs: int, args: list, *, frozen_rank: int, freeze_line: str, env: dict) -> tuple:
    """Launch the job, wait for ``freeze_line`` (the fault struck), then for the job's end within the collective
    timeout + 10 s. Returns (exit code, output). The frozen rank is SIGKILLed in the end in any case."""
    marker = uuid.uuid4().hex
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment(), MARKER_VARIABLE: marker, **env}
    proc = subprocess.Popen([mpiexec(), *launcher_flags(), "-n", str(nprocs), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    output: list = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            output.append(line)
            lines.put(line)
        lines.put(None)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while True:
            line = lines.get(timeout=START_TIMEOUT_S)
            assert line is not None, f"the job ended before the fault struck:\n{''.join(output)}"
            if freeze_line in line:
                break
        try:
            code = proc.wait(timeout=COLLECTIVE_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the live ranks did not end the job within the collective timeout + 10 s:\n"
                                 + "".join(output)) from None
        reader.join(timeout=30)
        return code, "".join(output)
    except queue.Empty:
        raise AssertionError(f"the fault never struck:\n{''.join(output)}") from None
    finally:
        try:
            os.kill(pid_of_rank(marker, frozen_rank, timeout=0.5), signal.SIGKILL)
        except (RuntimeError, ProcessLookupError):
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def error_lines(output: str, rank: int) -> list:
    return [line for line in output.splitlines() if f"[rank {rank}] mpisgd: error:" in line]


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_rank_frozen_in_sync_training_is_named_by_every_live_rank(data):
    code, out = run_until_frozen(
        3, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--epochs", "50",
            "--batch-size", "8", "--no-progress", "--collective-timeout", str(COLLECTIVE_TIMEOUT_S),
            "--stall-warning", "1"],
        frozen_rank=1, freeze_line="freezing (SIGSTOP) at step 6", env={SYNC_FAULT_VARIABLE: "1:6:freeze"})
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for live in (0, 2):
        errors = error_lines(out, live)
        assert errors, f"rank {live} did not report:\n{out}"
        assert "no progress for" in errors[0] and "rank 1 has not arrived" in errors[0], errors[0]
        assert "'allreduce_many_', step 6" in errors[0], errors[0]
        assert f"[rank {live}] warning: stall:" in out  # warned before giving up
    assert not error_lines(out, 1)


BARE_LOOP = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import mpisgd
    from mpisgd.comm.abort import abort_world
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    comm = mpisgd.Communicator(timeout=float(sys.argv[1]), stall_warning=0)
    x = np.ones(1024, dtype=np.float32)
    try:
        for i in range(1000000):
            if rank == 1 and i == 50:
                print(f"rank 1 freezing at iteration {i}", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            mpisgd.allreduce_(x, comm=comm)
            x[:] = 1.0
    except mpisgd.CollectiveTimeout as exc:
        print(f"rank {rank} raised CollectiveTimeout: {exc}", flush=True)
        try:  # a script that goes on: its unfinished collective (a persistent request) must not be restarted
            mpisgd.allreduce_(x, comm=comm)
        except mpisgd.UnfinishedCollective as again:
            print(f"rank {rank} then raised UnfinishedCollective: {again}", flush=True)
        abort_world(4)
""")


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_rank_frozen_in_a_bare_allreduce_loop_makes_every_live_rank_raise(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(BARE_LOOP)
    code, out = run_until_frozen(3, [sys.executable, str(script), str(COLLECTIVE_TIMEOUT_S)], frozen_rank=1,
                                 freeze_line="rank 1 freezing at iteration 50", env={})
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for live in (0, 2):
        # the launcher may join two ranks' lines: each report is cut at the next one
        raised = re.findall(rf"rank {live} raised CollectiveTimeout: (.*?)(?=rank \d+ raised|$)", out, re.MULTILINE)
        assert raised, f"rank {live} did not raise:\n{out}"
        assert "'allreduce" in raised[0] and "rank 1 has not arrived" in raised[0], raised[0]
    # the script's next call is refused, not a restart of the active request (the first rank to abort may end
    # the job before the other prints: one report is enough)
    refused = re.findall(r"rank [02] then raised UnfinishedCollective: (.*?)(?=rank \d+ |$)", out, re.MULTILINE)
    assert refused and "was left unfinished (CollectiveTimeout" in refused[0], out


@pytest.mark.timeout(300)
def test_a_rank_ten_times_slower_is_warned_about_but_never_declared_dead(data):
    # rank 2 sleeps 0.5 s before each step's all-reduce (the others compute a step in milliseconds): every
    # wait of the others lasts ~0.5 s, far past the 0.2 s stall warning and far short of the 5 s timeout
    run = run_mpi(3, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--epochs", "1",
                      "--batch-size", "40", "--no-progress", "--collective-timeout", str(COLLECTIVE_TIMEOUT_S),
                      "--stall-warning", "0.2"], timeout=240, env={SYNC_FAULT_VARIABLE: "2:0:slow:0.5"})
    assert run.returncode == 0, run.stdout
    assert "no progress for" not in run.stdout
    # (start-up may warn too: ranks load data at different speeds; the steps' all-reduces are what counts)
    stalls = [line for line in run.stdout.splitlines() if "warning: stall:" in line and "'allreduce_many_'" in line]
    assert stalls, run.stdout
    assert all("rank 2 has not arrived" in line for line in stalls), stalls


@pytest.mark.timeout(300)
def test_one_rank_raising_ends_the_job_with_its_message(data):
    run = run_mpi(3, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--epochs", "5",
                      "--batch-size", "8", "--no-progress", "--collective-timeout", "60"], timeout=240,
                  env={SYNC_FAULT_VARIABLE: "1:3:raise"})
    assert run.returncode == 1, run.stdout
    assert "RuntimeError: test fault at step 3" in run.stdout
    assert "[rank 1]" in run.stdout and "no progress for" not in run.stdout


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_rank_frozen_at_evaluation_is_named_by_every_live_rank(data):
    # rank 1 stops as its second evaluation starts (after epoch 1): the others wait in the evaluation's sum
    code, out = run_until_frozen(
        3, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--val", str(data),
            "--epochs", "50", "--batch-size", "40", "--no-progress", "--collective-timeout",
            str(COLLECTIVE_TIMEOUT_S), "--stall-warning", "1"],
        frozen_rank=1, freeze_line="freezing (SIGSTOP) at step 1", env={EVALUATION_FAULT_VARIABLE: "1:1:freeze"})
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for live in (0, 2):
        errors = error_lines(out, live)
        assert errors, f"rank {live} did not report:\n{out}"
        assert "rank 1 has not arrived" in errors[0] and "'evaluation (correct, seen)'" in errors[0], errors[0]
        assert f"[rank {live}] warning: stall:" in out
    assert not error_lines(out, 1)


def downpour_with_server_1_frozen_at_the_shard_gather(data, *, servers: int) -> tuple:
    """A Downpour job of ``servers`` servers and 2 workers whose server 1 stops as it starts the end-of-job
    gather of the shards (its first: no checkpoint before it); (exit code, output)."""
    return run_until_frozen(
        servers + 2, [mpisgd_command(), "train", "--strategy", "downpour", "--servers", str(servers), "--data",
                      str(data), "--epochs", "1", "--batch-size", "16", "--hidden", "8", "--no-progress",
                      "--collective-timeout", str(COLLECTIVE_TIMEOUT_S), "--stall-warning", "1"],
        frozen_rank=1, freeze_line="freezing (SIGSTOP) at step 0", env={SHARD_GATHER_FAULT_VARIABLE: "1:0:freeze"})


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_server_frozen_at_the_end_of_a_downpour_job_is_named_by_server_0(data):
    """Servers 0 and 1, workers 2 and 3: server 1 stops as it starts the end-of-job gather of the shards
    (its first: no checkpoint before it), which server 0 waits in; the workers have no part in it."""
    code, out = downpour_with_server_1_frozen_at_the_shard_gather(data, servers=2)
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    errors = error_lines(out, 0)
    assert errors, f"server 0 did not report:\n{out}"
    assert "parameter servers: shard params" in errors[0] and "waiting for rank 1" in errors[0], errors[0]
    assert "[rank 0] warning: stall: parameter servers" in out
    assert not error_lines(out, 1)


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_with_three_servers_every_live_server_reports_the_frozen_one(data):
    """Servers 0, 1 and 2, workers 3 and 4: server 1 stops at the end-of-job gather of the shards. Servers 0
    and 2 each time out in a servers-only collective; the first to time out waits for the other (whose
    heartbeat moves) before its exit ends the job, so both report, and both name server 1's still heartbeat."""
    code, out = downpour_with_server_1_frozen_at_the_shard_gather(data, servers=3)
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for server in (0, 2):
        errors = error_lines(out, server)
        assert errors, f"server {server} did not report:\n{out}"
        assert "parameter servers" in errors[0] and "the heartbeat of rank 1 stood still" in errors[0], errors[0]
    assert not error_lines(out, 1)


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_stage_frozen_in_model_parallel_training_is_named_by_the_other_stages(data):
    # three stages, one replica: rank 1 (stage 1) stops before step 4's pipeline; stage 0 waits for its
    # gradients, stage 2 for its activations: point-to-point waits, which name the peer they wait for
    code, out = run_until_frozen(
        3, [mpisgd_command(), "train", "--strategy", "sync", "--data", str(data), "--epochs", "50",
            "--batch-size", "12", "--hidden", "16,16", "--stages", "3", "--micro-batches", "3", "--no-progress",
            "--collective-timeout", str(COLLECTIVE_TIMEOUT_S), "--stall-warning", "1"],
        frozen_rank=1, freeze_line="freezing (SIGSTOP) at step 4", env={MODEL_PARALLEL_FAULT_VARIABLE: "1:4:freeze"})
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for live, waits_for in ((0, "gradient from stage 1"), (2, "activations from stage 1")):
        errors = error_lines(out, live)
        assert errors, f"rank {live} did not report:\n{out}"
        assert "no progress for" in errors[0] and "waiting for rank 1" in errors[0], errors[0]
        assert waits_for in errors[0], errors[0]
        stalls = [line for line in out.splitlines() if f"[rank {live}] warning: stall:" in line]
        assert stalls and all("waiting for rank 1" in line for line in stalls), stalls
    assert not error_lines(out, 1)


HOROVOD_LOOP = textwrap.dedent("""
    import os, signal
    import torch
    import mpisgd.horovod.torch as hvd
    from mpisgd.comm.abort import abort_world

    hvd.init()
    x = torch.ones(1024)
    try:
        for i in range(1000000):
            if hvd.rank() == 1 and i == 50:
                print("rank 1 freezing at iteration 50", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            hvd.allreduce_(x, name="x")
            x.fill_(1.0)
    except hvd.HorovodInternalError as exc:
        print(f"rank {hvd.rank()} raised HorovodInternalError: {exc}", flush=True)
        abort_world(4)
""")


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_rank_frozen_under_the_horovod_api_fails_every_live_ranks_operation_naming_it(tmp_path):
    script = tmp_path / "hvd_loop.py"
    script.write_text(HOROVOD_LOOP)
    code, out = run_until_frozen(3, [sys.executable, str(script)], frozen_rank=1,
                                 freeze_line="rank 1 freezing at iteration 50",
                                 env={"MPISGD_COLLECTIVE_TIMEOUT": str(COLLECTIVE_TIMEOUT_S)})
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for live in (0, 2):
        raised = re.findall(rf"rank {live} raised HorovodInternalError: (.*?)(?=rank \d+ raised|$)", out, re.MULTILINE)
        assert raised, f"rank {live} did not raise:\n{out}"
        assert "CollectiveTimeout" in raised[0] and "rank 1" in raised[0], raised[0]


BLOCKING_CREATION = textwrap.dedent("""
    import os, signal, sys, time
    import mpisgd
    from mpisgd.downpour.windows import ParameterServerWindows
    from mpisgd.training.layout import Roles, ShardLayout

    comm = mpisgd.Communicator(timeout=float(sys.argv[1]), stall_warning=0)
    case = sys.argv[2]
    if comm.rank == 1:
        if case == "slow":
            print("rank 1 sleeping 2 s before the blocking call", flush=True)
            time.sleep(2)
        else:
            print("rank 1 freezing before the blocking call", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    if case == "windows":  # a library creation without a watchdog of its own (Dup, Win.Allocate)
        windows = ParameterServerWindows(comm.mpi, Roles(servers=(0,), workers=(1, 2)), ShardLayout(8, 1))
        windows.free()
    else:  # MPI has no nonblocking split
        with comm.watchdog.blocking("test: split"):
            comm.mpi.Split(0, comm.rank).Free()
    print(f"rank {comm.rank} done", flush=True)
    comm.free()
""")


@pytest.mark.timeout(START_TIMEOUT_S + 120)
@pytest.mark.parametrize("case", ["split", "windows"])
def test_rank_frozen_before_a_blocking_creation_ends_the_job_with_every_live_ranks_report(tmp_path, case):
    """MPI has no nonblocking split, duplicate or window creation: a timer thread keeps their deadline."""
    script = tmp_path / "blocking.py"
    script.write_text(BLOCKING_CREATION)
    code, out = run_until_frozen(3, [sys.executable, str(script), str(COLLECTIVE_TIMEOUT_S), case], frozen_rank=1,
                                 freeze_line="rank 1 freezing before the blocking call",
                                 env={"MPISGD_COLLECTIVE_TIMEOUT": str(COLLECTIVE_TIMEOUT_S)})  # the process's
    assert code == EXIT_COLLECTIVE_TIMEOUT, out
    for live in (0, 2):
        reports = [line for line in out.splitlines() if f"on rank {live}, inside a blocking MPI call" in line]
        assert reports, f"rank {live} did not report:\n{out}"
        if case == "split":  # the communicator's arrival board says who is missing
            assert "'test: split'" in reports[0] and "rank 1 has not arrived" in reports[0], reports[0]
        else:
            assert "'parameter server: duplicate the communicator'" in reports[0], reports[0]
    assert "done" not in out


@pytest.mark.timeout(300)
def test_a_slow_rank_before_a_blocking_creation_is_waited_for(tmp_path):
    script = tmp_path / "blocking.py"
    script.write_text(BLOCKING_CREATION)
    run = run_mpi(3, [sys.executable, str(script), str(COLLECTIVE_TIMEOUT_S), "slow"], timeout=240)
    assert run.returncode == 0, run.stdout
    assert all(f"rank {r} done" in run.stdout for r in range(3)), run.stdout
    assert "inside a blocking MPI call" not in run.stdout
