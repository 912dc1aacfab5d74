"""Datasets read per rank: HDF5 files sharded with hyperslab reads, generated datasets, and the default
dataset that works offline. No MPI here: ranks are plain ints."""

from mpisgd.data.hdf5 import (
    MAX_INFERRED_CLASSES,
    MAX_VALUES_PER_SAMPLE,
    ShardedHDF5,
    compatibility_problems,
    read_arrays,
)
from mpisgd.data.sharding import (
    REMAINDERS,
    contiguous_block,
    epoch_permutation,
    samples_per_rank,
    shard_indices,
)
from mpisgd.data.synthetic import (
    DatasetFiles,
    default_data_dir,
    default_dataset,
    make_classification_arrays,
    make_classification_h5,
)

__all__ = [
    "MAX_INFERRED_CLASSES",
    "MAX_VALUES_PER_SAMPLE",
    "REMAINDERS",
    "DatasetFiles",
    "ShardedHDF5",
    "contiguous_block",
    "default_data_dir",
    "compatibility_problems",
    "default_dataset",
    "epoch_permutation",
    "make_classification_arrays",
    "make_classification_h5",
    "read_arrays",
    "samples_per_rank",
    "shard_indices",
]
