"""The `mpisgd` command end to end, in subprocesses under mpiexec (each with a timeout)."""

import glob
import json
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import MPICH_CLIQUES_ONLY, mapped_by_some_process, mpi_library, mpisgd_command, run_mpi


def test_info_reports_ranks_and_node_local_ranks():
    result = run_mpi(4, [mpisgd_command(), "info"], timeout=120)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert re.search(r"^ranks: 4$", out, re.M)
    assert re.search(r"^MPI library: \S+", out, re.M) and "thread level: MPI_THREAD_" in out
    local = sorted(int(m) for m in re.findall(r"node-local rank (\d+)/4", out))
    assert local == [0, 1, 2, 3]  # one node here: node-local ranks are 0..3
    assert re.search(r"^CUDA-aware MPI: (yes|no) \(.+\)$", out, re.M)
    assert "array backend torch" in out


def test_info_gpu_mode_without_gpu_is_a_clear_error_on_every_rank():
    result = run_mpi(2, [mpisgd_command(), "info", "--gpu"], timeout=120)
    assert result.returncode == 2
    assert result.stdout.count("no CUDA device is visible") == 2


@pytest.mark.parametrize("nprocs, env, algorithms", [
    (2, None, ("native", "rhd", "ring", "shm", "auto")),
    (2, {"MPIR_CVAR_NOLOCAL": "1"}, ("native", "rhd", "ring", "auto")),
    (4, {"MPIR_CVAR_NUM_CLIQUES": "2"}, ("native", "rhd", "ring", "hier", "auto")),
], ids=["one node", "a node per rank", "two nodes of two"])
def test_bench_allreduce_json(tmp_path, nprocs, env, algorithms):
    """By default every algorithm is timed; shm only where all ranks share a node, hier only across
    nodes of more than one rank each (MPICH's MPIR_CVAR_NOLOCAL=1 makes every rank a node of its own,
    MPIR_CVAR_NUM_CLIQUES=2 two nodes)."""
    if env and mpi_library() != "mpich":
        pytest.skip(MPICH_CLIQUES_ONLY)
    out = tmp_path / "bench.json"
    result = run_mpi(nprocs, [mpisgd_command(), "bench", "allreduce", "--sizes", "4KiB,64KiB", "--iterations",
                              "5", "--json", str(out)], timeout=180, env=env)
    assert result.returncode == 0, result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["size_bytes"], r["algorithm"]) for r in rows} == {
        (s, a) for s in (4096, 65536) for a in algorithms}
    assert all(r["time_s"] > 0 and r["ranks"] == nprocs for r in rows)
    assert all(r["ratio_to_native"] == 1.0 for r in rows if r["algorithm"] == "native")
    assert "x native" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["bench", "allreduce", "--sizes", "4XB"], "cannot read size"),
    (["bench", "allreduce", "--algorithms", "tree"], "unknown algorithm"),
    (["train-nonexistent"], "invalid choice"),
])
def test_bad_flags_exit_2_on_every_rank(argv, message):
    result = run_mpi(2, [mpisgd_command(), *argv], timeout=120)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count(message) == 2, result.stdout


def test_uncaught_exception_on_one_rank_aborts_the_whole_job(tmp_path):
    # A subcommand that fails on rank 1 only while the others wait in a collective: without the
    # abort, ranks 0 and 2 would wait forever.
    script = tmp_path / "explode.py"
    # `mpisgd info` with its handler replaced: the parser looks the handler up when it is built.
    script.write_text(textwrap.dedent("""
        import sys
        from mpisgd import cli

        def explode(args):
            from mpi4py import MPI
            if MPI.COMM_WORLD.Get_rank() == 1:
                raise RuntimeError("rank one went wrong")
            MPI.COMM_WORLD.Barrier()
            return 0

        cli.run_info = explode
        sys.exit(cli.main(["info"]))
    """))
    before = set(glob.glob("/dev/shm/mpich_*"))
    result = run_mpi(3, [sys.executable, str(script)], timeout=60)
    assert result.returncode != 0
    assert "[rank 1]" in result.stdout and "rank one went wrong" in result.stdout
    # MPI_Abort would leave MPICH's node-wide file; a later job with the same id would hang on it
    # (files that a live process maps belong to other jobs running meanwhile, not to this one)
    assert not [path for path in set(glob.glob("/dev/shm/mpich_*")) - before if not mapped_by_some_process(path)]


def test_python_dash_m_is_the_command():
    result = subprocess.run([sys.executable, "-m", "mpisgd", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("mpisgd ")


def test_train_help_groups_the_options_by_strategy():
    result = subprocess.run([sys.executable, "-m", "mpisgd", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    titles = [line for line in result.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [t.split(" ")[0] for t in titles if " options" in t] == [
        "common", "sync", "downpour/dcasgd", "sandblaster", "sync-ps"], titles
    assert "--log-level" in result.stdout


@pytest.mark.parametrize("argv", [["info"], ["bench", "allreduce"], ["train"], ["make-data", "x.h5"],
                                  ["plot", "m.jsonl"]])
def test_every_subcommand_takes_log_level(argv):
    result = subprocess.run([sys.executable, "-m", "mpisgd", *argv, "--log-level", "loud"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "--log-level: invalid choice: 'loud'" in result.stderr, result.stderr


def test_plot_runs_without_mpi(tmp_path):
    """`mpisgd plot` is for login nodes and laptops: it must not initialize (or even import) MPI."""
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0, "wall_time": 0.1}\n{"step": 2, "loss": 0.5, "wall_time": 0.2}\n')
    probe = textwrap.dedent(f"""
        import sys
        from mpisgd.cli import main
        code = main(["plot", {str(metrics)!r}, "-o", {str(tmp_path / "m.png")!r}])
        print("mpi4py.MPI imported:", "mpi4py.MPI" in sys.modules)
        sys.exit(code)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mpi4py.MPI imported: False" in result.stdout
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
