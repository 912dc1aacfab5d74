"""The rank grid of model parallelism: world = replicas x stages x splits (DistBelief, Dean et al. 2012).

Rank ``r`` holds split ``t`` of stage ``s`` of replica ``a`` with ``r = (a * K + s) * T + t``: the T splits of a
stage are neighbours (they talk most: an all-gather per Linear), then the K stages of a replica. Each rank
gets three library-owned communicators, split from a duplicate of the job's:

| communicator | ranks in it | carries |
|--------------|-------------|---------|
| ``pipeline`` | the K stages of one replica, same split | activations forward, their gradients backward |
| ``stage``    | the R replicas' copies of one stage and split | the gradient mean (data parallelism) |
| ``splits``   | the T splits of one stage of one replica | the all-gather of a split Linear's outputs |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from mpi4py import MPI

from mpisgd.comm import Communicator
from mpisgd.comm.blocking import blocking_collective
from mpisgd.errors import SharedConfigError

SUGGESTIONS = 4
_kept: list = []  # communicators with sends that never completed, left to MPI_Finalize


class Coordinates(NamedTuple):
    """Where a rank sits: replica a of R, stage s of K, split t of T."""

    replica: int
    stage: int
    split: int

    def __str__(self) -> str:
        return f"replica {self.replica}, stage {self.stage}, split {self.split}"


@dataclass(frozen=True)
class GridShape:
    """R replicas x K stages x T splits; validated against the world size on construction."""

    world_size: int
    stages: int
    splits: int = 1

    def __post_init__(self) -> None:
        if self.stages < 1 or self.splits < 1:
            raise SharedConfigError(f"stages and tensor_parallel must be >= 1, got {self.stages} and {self.splits}")
        per_replica = self.stages * self.splits
        if self.world_size % per_replica:
            works = ", ".join(str(per_replica * n) for n in range(1, SUGGESTIONS + 1))
            stage_counts = [k for k in range(1, self.world_size + 1) if self.world_size % (k * self.splits) == 0]
            alternatives = (f"; or at {self.world_size} ranks: stages in {stage_counts} with tensor_parallel="
                            f"{self.splits}") if stage_counts else ""
            raise SharedConfigError(
                f"{self.world_size} ranks do not factor as replicas x stages ({self.stages}) x tensor_parallel "
                f"({self.splits}): use a multiple of {per_replica} ranks ({works}, ...){alternatives}")

    @property
    def replicas(self) -> int:
        return self.world_size // (self.stages * self.splits)

    def coordinates(self, rank: int) -> Coordinates:
        replica, rest = divmod(rank, self.stages * self.splits)
        stage, split = divmod(rest, self.splits)
        return Coordinates(replica, stage, split)

    def rank_of(self, where: Coordinates) -> int:
        return (where.replica * self.stages + where.stage) * self.splits + where.split


class GridCommunicators:
    """This rank's pipeline, stage and split communicators, all split from one duplicate of ``world``.

    Args:
        world: the job's communicator (not used for messages: it is duplicated first).
        shape: the grid.

    Call :meth:`free` to release them (collective over ``world``).
    """

    def __init__(self, world: MPI.Comm, shape: GridShape) -> None:
        self.shape = shape
        with blocking_collective("model parallelism: split the ranks into the grid"):
            self.world: Optional[MPI.Comm] = world.Dup()
            self.where = shape.coordinates(self.world.Get_rank())
            a, s, t = self.where
            K, T = shape.stages, shape.splits
            self.pipeline: Optional[MPI.Comm] = self.world.Split(color=a * T + t, key=s)
            self.splits: Optional[MPI.Comm] = self.world.Split(color=a * K + s, key=t)
            stage_mpi = self.world.Split(color=s * T + t, key=a)
        # the gradient mean goes through mpisgd's all-reduce (fused buckets, algorithm choice)
        self.stage: Optional[Communicator] = Communicator(stage_mpi)
        stage_mpi.Free()

    def keep_pipeline(self, pending: list) -> None:
        """Never free the pipeline communicator: a failed step left ``pending`` sends on it, which cannot be
        cancelled safely; they and their buffers stay alive until MPI_Finalize."""
        _kept.append((self.pipeline, pending))
        self.pipeline = None

    def free(self) -> None:
        """Release every communicator; later use fails."""
        if MPI.Is_finalized():
            return
        if self.stage is not None:
            self.stage.free()
        for comm in (self.pipeline, self.splits, self.world):
            if comm is not None:
                comm.Free()
        self.stage = self.pipeline = self.splits = self.world = None


def describe_grid(world_size: int, stages: int, splits: int = 1, servers: int = 0) -> list[str]:
    """The communicators of the grid as text, naming the world ranks in each (``mpisgd info --stages K``).

    ``servers``: parameter-server ranks ahead of the grid (Downpour: world = S + R x K x T).
    Raises :class:`~mpisgd.errors.SharedConfigError` when the ranks do not factor.
    """
    if servers < 0 or servers >= world_size:
        raise SharedConfigError(f"--servers {servers} leaves no worker rank of {world_size}")
    try:
        shape = GridShape(world_size - servers, stages, splits)
    except SharedConfigError as exc:
        if not servers:
            raise
        raise SharedConfigError(f"{world_size} ranks leave {world_size - servers} after {servers} server(s): "
                                f"{exc}") from None
    R, K, T = shape.replicas, shape.stages, shape.splits

    def ranks(cells: list[Coordinates]) -> str:
        return " ".join(str(servers + shape.rank_of(c)) for c in cells)

    lines = [f"model-parallel grid: {world_size} ranks = " + (f"{servers} server(s) + " if servers else "")
             + f"{R} replica(s) x {K} stage(s) x {T} split(s); world rank = "
             + (f"{servers} + " if servers else "") + "(replica*K + stage)*T + split"]
    if servers:
        lines.append(f"  servers (parameter-server shards): world ranks {' '.join(map(str, range(servers)))}")
    for a in range(R):
        for t in range(T):
            lines.append(f"  pipeline communicator of replica {a}, split {t} (its stages in order): world ranks "
                         + ranks([Coordinates(a, s, t) for s in range(K)]))
    for s in range(K):
        for t in range(T):
            lines.append(f"  stage communicator of stage {s}, split {t} (across replicas): world ranks "
                         + ranks([Coordinates(a, s, t) for a in range(R)]))
    if T > 1:
        for a in range(R):
            for s in range(K):
                lines.append(f"  split communicator of replica {a}, stage {s}: world ranks "
                             + ranks([Coordinates(a, s, t) for t in range(T)]))
    return lines
