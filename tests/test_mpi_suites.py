"""Run the in-MPI test suites (tests/mpi) under mpiexec at several process counts.

1, 2, 3 (not a power of two) and 4 ranks for everything; 5..8 ranks for the all-reduce
correctness tests (oversubscribed on small machines, which is fine for correctness); and the
all-reduce and synchronous-training tests across nodes, made on one machine by MPICH itself:
MPIR_CVAR_NUM_CLIQUES=k splits the ranks into k nodes, round robin (rank i on node i % k), or of
consecutive ranks with MPIR_CVAR_CLIQUES_BY_BLOCK=1; MPI then has no shared memory between them, as
between hosts. Open MPI has no such setting: under it those are skipped (they run in .ci/run's MPICH leg).
"""

import sys

import pytest
from helpers import MPICH_CLIQUES_ONLY, mpi_library, run_mpi

INNER = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--timeout=120"]


def _run_suite(nprocs: int, selection: list[str], timeout: float, env: dict | None = None) -> None:
    result = run_mpi(nprocs, [sys.executable, *INNER, *selection], timeout=timeout,
                     env={"MPISGD_INNER_MPI_RUN": "1", **(env or {})})
    assert result.returncode == 0, f"tests/mpi failed at {nprocs} ranks {env or ''}:\n{result.stdout[-20000:]}"


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_mpi_suite(nprocs):
    _run_suite(nprocs, ["tests/mpi"], timeout=600)


@pytest.mark.parametrize("nprocs", [5, 6, 7, 8])
def test_allreduce_correctness_many_ranks(nprocs):
    _run_suite(nprocs, ["tests/mpi/test_allreduce.py", "-k", "matches_mpi"], timeout=600)


BLOCK = {"MPIR_CVAR_CLIQUES_BY_BLOCK": "1"}  # nodes of consecutive ranks, as launchers place them


@pytest.mark.parametrize("nprocs, nodes", [
    (4, {"MPIR_CVAR_NUM_CLIQUES": "2", **BLOCK, "MPISGD_HIERARCHICAL": "1"}),  # {0,1} {2,3}; auto takes hier
    (4, {"MPIR_CVAR_NUM_CLIQUES": "2"}),  # round robin: {0,2} {1,3}
    (3, {"MPIR_CVAR_NUM_CLIQUES": "2"}),  # {0,2} {1}: unequal, hier refused, auto goes around it
    (6, {"MPIR_CVAR_NUM_CLIQUES": "3", **BLOCK}),  # blocks cross between 3 ranks (not a power of two)
    (8, {"MPIR_CVAR_NUM_CLIQUES": "2", **BLOCK}),  # 2 nodes of 4
], ids=["2x2-block-hier", "2x2-round-robin", "2+1", "3x2-block", "2x4-block"])
def test_across_nodes(nprocs, nodes):
    if mpi_library() != "mpich":
        pytest.skip(MPICH_CLIQUES_ONLY)
    selection = ["tests/mpi/test_allreduce.py"]
    if nprocs > 4:  # oversubscribed: the correctness tests and those about nodes
        selection += ["-k", "matches_mpi or hierarchical or little or differ or node"]
    if "MPISGD_HIERARCHICAL" in nodes:
        selection.append("tests/mpi/test_sync_equivalence.py")  # training with fused buckets through hier
    _run_suite(nprocs, selection, timeout=600, env=nodes)
