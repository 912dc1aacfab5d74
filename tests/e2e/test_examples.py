"""The examples a user copies from must run as documented (under mpiexec, with a timeout)."""

import sys

import pytest
from helpers import ROOT, run_mpi


@pytest.mark.parametrize("script, nprocs", [("allreduce_arrays.py", 3), ("train_custom_model.py", 2),
                                            ("horovod_mnist_style.py", 2)])
def test_example_runs_and_exits_cleanly(script, nprocs):
    # the Horovod script never calls hvd.shutdown(), as many do not: the exit handlers must stop the
    # coordinator and free the windows in the right order (a wrong one crashed with SIGSEGV at exit)
    result = run_mpi(nprocs, [sys.executable, str(ROOT / "examples" / script)], timeout=180)
    assert result.returncode == 0, result.stdout
    assert "Traceback" not in result.stdout and "Exception ignored" not in result.stdout, result.stdout
