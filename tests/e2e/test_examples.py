"""The examples a user copies from must run as documented (under mpiexec, with a timeout)."""

import sys

import pytest
from helpers import ROOT, run_mpi


@pytest.mark.parametrize("script, nprocs", [("allreduce_arrays.py", 3), ("train_custom_model.py", 2)])
def test_example_runs(script, nprocs):
    result = run_mpi(nprocs, [sys.executable, str(ROOT / "examples" / script)], timeout=180)
    assert result.returncode == 0, result.stdout
