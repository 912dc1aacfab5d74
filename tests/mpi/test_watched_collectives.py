"""The watched small collectives (mpisgd.comm.objects) against mpi4py's own blocking ones, at any size.

The reference is always mpi4py on COMM_WORLD (``allreduce``, ``bcast``, ``allgather``), never mpisgd; each
helper runs on a watched Communicator, on one with the watchdog off (``timeout=0``: blocking waits) and on
a bare mpi4py communicator.
"""

import numpy as np
import pytest
from mpi4py import MPI

import mpisgd
from mpisgd.comm import objects

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()
MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

_watched = mpisgd.Communicator(timeout=60, stall_warning=0)
_blocking = mpisgd.Communicator(timeout=0)
_bare = WORLD.Dup()
COMMS = {"watched": _watched, "timeout=0": _blocking, "bare mpi4py": _bare}


@pytest.fixture(params=list(COMMS))
def comm(request):
    return COMMS[request.param]


@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("values", [lambda r: r + 1, lambda r: [r, -3 * r, 7], lambda r: [True, r % 2 == 0],
                                    lambda r: [0.5 * r, -1.25], lambda r: np.arange(5) * (r - 1)],
                         ids=["int", "ints", "bools", "floats", "array"])
def test_allreduce_numbers_matches_mpi_allreduce(comm, op, values):
    mine = np.atleast_1d(np.asarray(values(RANK)))
    expected = np.array([WORLD.allreduce(v.item(), op=MPI_OPS[op]) for v in mine])
    result = objects.allreduce_numbers(comm, values(RANK), op, name="test numbers")
    assert result.shape == mine.shape
    assert result.dtype == (np.int64 if mine.dtype.kind in "biu" else np.float64)
    np.testing.assert_array_equal(result, expected)


def test_allreduce_numbers_leaves_its_input_alone(comm):
    mine = np.array([RANK, 1])
    objects.allreduce_numbers(comm, mine, "sum", name="test numbers")
    np.testing.assert_array_equal(mine, [RANK, 1])


def test_allreduce_numbers_refuses_an_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'prod'"):
        objects.allreduce_numbers(_watched, 1, "prod", name="test numbers")


OBJECTS = [None, 0, "a/path.h5", ("train.h5", None), {"lr": 0.1, "layers": [1, 2, 3]},
           b"x" * 300_000, list(range(10_000))]


@pytest.mark.parametrize("root", sorted({0, P - 1}))
@pytest.mark.parametrize("index", range(len(OBJECTS)))
def test_bcast_object_matches_mpi_bcast(comm, root, index):
    mine = (OBJECTS[index], RANK) if RANK == root else None
    expected = WORLD.bcast(mine, root=root)
    assert objects.bcast_object(comm, mine, root, name="test broadcast") == expected
    assert expected[1] == root


def test_bcast_object_carries_numpy_arrays(comm):
    mine = np.arange(12.0).reshape(3, 4) * (RANK + 1)
    got = objects.bcast_object(comm, mine if RANK == 0 else None, 0, name="test broadcast")
    np.testing.assert_array_equal(got, WORLD.bcast(mine if RANK == 0 else None, root=0))


@pytest.mark.parametrize("make", [lambda r: r, lambda r: None if r % 2 else {"rank": r},
                                  lambda r: "y" * (1000 * r), lambda r: [b"z" * (70_000 * (r % 2))]],
                         ids=["int", "none-or-dict", "growing-text", "empty-and-large"])
def test_allgather_objects_matches_mpi_allgather(comm, make):
    assert objects.allgather_objects(comm, make(RANK), name="test gather") == WORLD.allgather(make(RANK))


def test_barrier_completes_on_every_comm(comm):
    objects.barrier(comm, name="test barrier")
    assert WORLD.allreduce(1) == P


def test_each_watched_collective_is_named_and_counted_alike_on_every_rank():
    dog = _watched.watchdog
    before = dog.sequence
    _watched.allreduce_numbers(RANK, name="count: numbers")
    assert dog.name == "count: numbers" and dog.sequence == before + 1
    _watched.bcast_object("x", name="count: object")
    assert dog.name == "count: object" and dog.sequence == before + 3  # the length, then the bytes
    _watched.allgather_objects(RANK, name="count: gather")
    assert dog.name == "count: gather" and dog.sequence == before + 5
    _watched.barrier(name="count: barrier")
    assert dog.name == "count: barrier" and dog.sequence == before + 6
    assert len(set(WORLD.allgather(dog.sequence))) == 1


def test_the_watched_start_up_finds_the_layout_mpi_reports():
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=RANK)
    try:
        local_size = node.Get_size()
        nodes = WORLD.allreduce(1 if node.Get_rank() == 0 else 0)
        most, fewest = WORLD.allreduce(local_size, op=MPI.MAX), WORLD.allreduce(local_size, op=MPI.MIN)
    finally:
        node.Free()
    for communicator in (_watched, _blocking):
        assert (communicator.rank, communicator.size) == (RANK, P)
        assert communicator.local_size == local_size and communicator.num_nodes == nodes
        assert communicator.most_ranks_per_node == most and communicator.uniform_nodes == (most == fewest)
