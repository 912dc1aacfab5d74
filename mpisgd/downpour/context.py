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

    @property
    def num_workers(self) -> int:
        return len(self.roles.workers)

    @property
    def is_coordinator(self) -> bool:
        """Server 0 (world rank ``roles.servers[0]``) runs the job."""
        return self.comm.rank == self.roles.servers[0]
