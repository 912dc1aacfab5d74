"""What every role of a Downpour job shares once the job is set up: config, communicators, windows,
board, model and data. Built by :mod:`mpisgd.downpour.job`; read by the worker, the coordinator and the
other servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from mpi4py import MPI

from mpisgd.comm import Communicator
from mpisgd.downpour.board import JobBoard
from mpisgd.downpour.client import ParameterClient
from mpisgd.downpour.windows import ParameterServerWindows
from mpisgd.training.config import TrainConfig
from mpisgd.training.layout import Roles, ShardLayout


@dataclass
class JobContext:
    """One rank's view of the job.

    ``role_comm`` holds the servers (or the workers) only: servers gather their shards with collectives
    on it, which never involve a worker. ``resumed`` is what ``--resume`` loaded (empty otherwise).
    """

    cfg: TrainConfig
    comm: Communicator
    roles: Roles
    layout: ShardLayout
    windows: ParameterServerWindows
    client: ParameterClient
    board: JobBoard
    role_comm: MPI.Comm
    model: torch.nn.Module
    device: str
    data: Any
    buffers: list
    rule_name: str
    num_batches: int  # per worker and epoch
    resumed: dict = field(default_factory=dict)
    extension: Any = None  # what a system built on these windows adds (mpisgd.syncps: its own windows)
    signal_fault: Any = None  # the test hook MPISGD_TEST_SIGNAL_AT (mpisgd.faults.SignalAtStep), if set

    @property
    def step_budget(self) -> int:
        """Training steps of the whole job: --epochs passes over the data, shared by the workers (each
        claims its steps one by one, so a straggler holds nobody back)."""
        return self.cfg.epochs * self.num_workers * self.num_batches

    def _saved_replica_steps(self) -> list[int]:
        """The resumed checkpoint's step of each replica: its worker rows list every partition of a split
        replica, which step together (the least of them: the first partition may be a step ahead)."""
        every = max(1, int(self.resumed.get("partitions_per_replica", 1)))
        steps = [int(s) for s in self.resumed.get("worker_steps") or []]
        return [min(steps[i:i + every]) for i in range(0, len(steps), every)]

    def resumed_replica_steps(self, replicas: int) -> list[int]:
        """Each replica's step to resume at (0 on a fresh start): the saved ones where the checkpoint had as
        many replicas, otherwise the same amount of data behind each of them."""
        saved = self._saved_replica_steps()
        return saved if len(saved) == replicas else [sum(saved) // replicas] * replicas

    def resumed_position(self, step: int) -> tuple[int, int]:
        """(epoch, batch) of a replica resumed at ``step``, counted in the saved job's batches per epoch:
        unsplit Downpour counts a short last batch, a split replica skips one that M does not divide."""
        per_epoch = max(1, int(self.resumed.get("batches_per_epoch", self.num_batches)))
        epoch, batch = divmod(step, per_epoch)
        return (epoch + 1, 0) if batch >= self.num_batches else (epoch, batch)

    @property
    def resumed_claims(self) -> int:
        """Steps the resumed job's replicas had claimed from its budget: the claims go on from there."""
        return sum(self._saved_replica_steps())

    @property
    def num_workers(self) -> int:
        return len(self.roles.workers)

    @property
    def is_coordinator(self) -> bool:
        """Server 0 (world rank ``roles.servers[0]``) runs the job."""
        return self.comm.rank == self.roles.servers[0]
