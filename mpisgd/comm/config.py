"""``AllreduceConfig``: the settings of the all-reduce (auto's overrides, window, checks, waiting).

Defaults come from the ``MPISGD_*`` variables (read through :mod:`mpisgd.environment`), else from the
measured choices in :mod:`mpisgd.comm.policy`, whose table says what ``auto`` runs when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mpisgd import environment
from mpisgd.errors import ConfigError

NON_POWER_OF_TWO_CHOICES = ("ring", "rhd")
YIELD_CHOICES = ("auto", "0", "1")


def _from_env(name: str, default: Any = None) -> Any:
    """A dataclass default read from the declared variable ``name`` when the config is built."""
    return field(default_factory=lambda: environment.read(name, default))


@dataclass(frozen=True)
class AllreduceConfig:
    """How ``algorithm="auto"`` chooses, and whether calls are checked for mismatches.

    ``auto`` follows the ordered table of :mod:`mpisgd.comm.policy` (measured on a 2-core machine with
    the MPICH wheel, see BENCHMARKS.md); its thresholds are overridden here:

    * ``native_below_bytes``: messages below it go to the MPI library's own Allreduce (each Python-level
      step costs microseconds). None: the table's (512 KiB where shm serves single vectors or across
      nodes with several ranks on a node, 2 MiB up to two ranks, 4 MiB beyond).
    * ``shared_memory``: allow the shared-memory window on one node (``shm``: fused host buckets from
      256 KiB, packed straight into the window) and across equal nodes (``hier``).
    * ``shm_below_bytes``: single vectors up to this go through the window on one node. None: 4 MiB for
      process counts above 2 that are not powers of two (MPICH's own folds and idles ranks there; shm
      took 0.66-0.91x of its time at p = 3, 5, 6), none otherwise (at p = 2, 4 and 8 it lost to MPICH's
      own Rabenseifner by 1.1-1.45x from 512 KiB to 4 MiB).
    * ``shm_area_bytes``: the window's slot per rank (two per rank, and two result areas); fused host
      buckets are cut to it.
    * ``hierarchical`` (off by default, as in Horovod): ``hier`` across nodes with the same number (> 1)
      of ranks each, fused buckets included: each node's ranks sum through the window and only the
      node's sum crosses the network, split over its ranks. On nodes emulated on one machine, where the
      "network" is as fast as memory, it lost to rhd/ring.
    * ``non_power_of_two``: the large-message algorithm for other process counts (``ring`` by default:
      the fold of ``rhd`` idles ranks).
    * ``check_collectives``: verify that every rank called a collective alike.
    * ``yield_when_waiting``: rhd/ring/shm wait by yielding the CPU instead of spinning (auto: when this
      node runs more ranks than it has cores).
    * ``segment_bytes``: rhd and ring receive what they reduce in pieces of this size, each reduced
      while still in cache; 0 = whole; None: 256 KiB on one node, where it saved ~10%, and 0 across
      nodes, where on MPICH's network path it cost ~10%.

    Environment overrides: MPISGD_AUTO_NATIVE_BELOW, MPISGD_SHM=0|1, MPISGD_AUTO_SHM_BELOW,
    MPISGD_SHM_AREA_BYTES, MPISGD_HIERARCHICAL=0|1, MPISGD_AUTO_NON_POWER_OF_TWO,
    MPISGD_CHECK_COLLECTIVES=0|1, MPISGD_YIELD_WHEN_WAITING=auto|0|1, MPISGD_SEGMENT_BYTES.
    """

    native_below_bytes: Optional[int] = _from_env("MPISGD_AUTO_NATIVE_BELOW")
    shared_memory: bool = _from_env("MPISGD_SHM", True)
    shm_below_bytes: Optional[int] = _from_env("MPISGD_AUTO_SHM_BELOW")
    shm_area_bytes: int = _from_env("MPISGD_SHM_AREA_BYTES", 4 << 20)
    hierarchical: bool = _from_env("MPISGD_HIERARCHICAL", False)
    non_power_of_two: str = _from_env("MPISGD_AUTO_NON_POWER_OF_TWO", "ring")
    check_collectives: bool = _from_env("MPISGD_CHECK_COLLECTIVES", True)
    yield_when_waiting: str = _from_env("MPISGD_YIELD_WHEN_WAITING", "auto")
    segment_bytes: Optional[int] = _from_env("MPISGD_SEGMENT_BYTES")

    def __post_init__(self) -> None:
        if self.native_below_bytes is not None and self.native_below_bytes < 0:
            raise ConfigError(f"native_below_bytes must be >= 0, got {self.native_below_bytes}")
        if self.shm_below_bytes is not None and self.shm_below_bytes < 0:
            raise ConfigError(f"shm_below_bytes must be >= 0, got {self.shm_below_bytes}")
        if self.shm_area_bytes < 4096:
            raise ConfigError(f"shm_area_bytes must be at least 4096, got {self.shm_area_bytes}")
        if self.segment_bytes is not None and self.segment_bytes < 0:
            raise ConfigError(f"segment_bytes must be >= 0 (0: no segments), got {self.segment_bytes}")
        if self.yield_when_waiting not in YIELD_CHOICES:
            raise ConfigError(f"yield_when_waiting must be auto, 0 or 1, got {self.yield_when_waiting!r}")
        if self.non_power_of_two not in NON_POWER_OF_TWO_CHOICES:
            raise ConfigError(f"non_power_of_two must be one of {NON_POWER_OF_TWO_CHOICES}, "
                              f"got {self.non_power_of_two!r}")
