"""The Horovod-style example script trains under mpiexec at any size, and every rank agrees on the result."""

import runpy
from pathlib import Path

from mpi4py import MPI

import mpisgd.horovod.torch as hvd

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "horovod_mnist_style.py"


def test_horovod_style_example_learns():
    main = runpy.run_path(str(EXAMPLE))["main"]
    try:
        accuracy = main(["--epochs", "2", "--lr", "0.05", "--train-samples", "1024"])
    finally:
        hvd.shutdown()
    everyone = MPI.COMM_WORLD.allgather(accuracy)
    assert len(set(everyone)) == 1, everyone  # the metric was averaged over ranks
    assert accuracy > 0.3  # ten classes: chance is 0.1
