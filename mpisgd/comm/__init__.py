"""Communication: the library-owned communicator, auto's policy, the all-reduce algorithms, and fusion."""

from mpisgd.comm.algorithms import ALGORITHMS, block_bounds
from mpisgd.comm.communicator import ALGORITHM_NAMES, OPS, AllreduceConfig, Communicator, get_communicator

__all__ = ["ALGORITHMS", "ALGORITHM_NAMES", "OPS", "AllreduceConfig", "Communicator",
           "block_bounds", "get_communicator"]
