"""Parameter-server layout shared by Downpour/DC-ASGD and Sandblaster: which ranks are servers,
workers (and a coordinator), and which slice of the flat parameter vector each server shard holds.

The flat vector is split into S contiguous shards balanced by size (the first n % S shards get one
element more), so a worker talks to every shard and no shard is a hot spot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mpisgd.comm.algorithms import block_bounds
from mpisgd.errors import ConfigError

SERVER, WORKER, COORDINATOR = "server", "worker", "coordinator"


@dataclass(frozen=True)
class ShardLayout:
    """Contiguous, size-balanced shards of a flat vector of ``num_params`` elements."""

    num_params: int
    num_shards: int

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ConfigError(f"need at least one shard, got {self.num_shards}")
        if self.num_params < 0:
            raise ConfigError(f"num_params must be >= 0, got {self.num_params}")

    @property
    def bounds(self) -> list[int]:
        return block_bounds(self.num_params, self.num_shards)

    def shard_slice(self, shard: int) -> slice:
        """The elements of the flat vector that ``shard`` holds."""
        bounds = self.bounds
        return slice(bounds[shard], bounds[shard + 1])

    def shard_size(self, shard: int) -> int:
        s = self.shard_slice(shard)
        return s.stop - s.start

    def shard_of(self, index: int) -> int:
        """The shard holding element ``index``."""
        if not 0 <= index < self.num_params:
            raise IndexError(f"index {index} outside 0..{self.num_params - 1}")
        bounds = self.bounds
        return next(s for s in range(self.num_shards) if bounds[s] <= index < bounds[s + 1])


@dataclass(frozen=True)
class Roles:
    """World ranks by role: servers first (ranks 0..S-1), then the coordinator if any, then workers."""

    servers: tuple
    workers: tuple
    coordinator: Optional[int] = None

    @classmethod
    def assign(cls, world_size: int, num_servers: int, *, with_coordinator: bool = False) -> Roles:
        """Split ``world_size`` ranks; a clear ConfigError when there are too few for the roles."""
        extra = 1 if with_coordinator else 0
        if num_servers < 1:
            raise ConfigError(f"--servers must be >= 1, got {num_servers}")
        needed = num_servers + extra + 1
        if world_size < needed:
            roles = f"{num_servers} server(s){' + 1 coordinator' if extra else ''} + at least 1 worker"
            raise ConfigError(f"{world_size} rank(s) cannot hold {roles}: launch at least {needed} ranks "
                              f"(mpiexec -n {needed}) or lower --servers")
        servers = tuple(range(num_servers))
        coordinator = num_servers if with_coordinator else None
        workers = tuple(range(num_servers + extra, world_size))
        return cls(servers, workers, coordinator)

    def role_of(self, rank: int) -> str:
        if rank in self.servers:
            return SERVER
        if rank == self.coordinator:
            return COORDINATOR
        return WORKER

    def worker_index(self, rank: int) -> int:
        """Position of a worker among the workers (its data shard)."""
        return self.workers.index(rank)
