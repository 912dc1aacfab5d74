"""A Sandblaster worker: computes the loss and gradient of whichever portion the coordinator hands it.

For each assignment (pass, portion, rows) it pulls the pass's point from every shard (once per
pass), computes the *sum* of the per-sample losses over the portion's rows and its gradient with
torch in float64, posts the sends of each shard's slice of the gradient and reports the loss to
the coordinator at once; the sends complete while it waits for its next assignment (it completes
them before posting the next ones). Waiting for them before reporting cost ~2.6 ms per portion on a
2-core machine (a rendezvous with a shard that polls with sleeps) for ~2 ms of compute. Should the
worker die between reporting and delivering, the shard reports the portion missing at the end of
the pass and the coordinator re-issues it.

A portion's result must not depend on which worker computed it (backup copies race, and the run
must be reproducible), so workers use one torch thread; rows a worker read once stay cached (up
to ``cache_bytes``), since every pass reads the same portions.

Test-only fault injection: ``MPISGD_SANDBLASTER_TEST_EXIT=<rank>:<n>`` makes the worker of world rank
``<rank>`` leave the job with ``os._exit(3)`` (a process exit, not a signal) after computing its
``n``-th portion, before reporting it, i.e. in the middle of a pass. Nothing else reads it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpisgd.data import ShardedHDF5
from mpisgd.sandblaster.protocol import (
    ASSIGN,
    EXIT,
    GRADIENT,
    PARAMETERS,
    PULL,
    RESULT,
    Backoff,
    wait_for_message,
)
from mpisgd.training.layout import ShardLayout

TEST_EXIT_VARIABLE = "MPISGD_SANDBLASTER_TEST_EXIT"


def wait_all(requests: list) -> None:
    """Waitall that sleeps between tests instead of spinning (see sandblaster_protocol)."""
    backoff = Backoff()
    while not MPI.Request.Testall(requests):
        backoff.idle()


class PortionWorker:
    """Compute portions until the coordinator says stop.

    Args:
        comm: the run's communicator.
        coordinator: coordinator rank.
        shards: shard ranks, in shard order.
        layout: which slice of the flat parameter vector each shard holds.
        model: the model, float64, parameters in the flat vector's order.
        data: the training set (any rows can be read).
        cache_bytes: how much portion data to keep in memory.
    """

    def __init__(self, comm: MPI.Comm, *, coordinator: int, shards: tuple, layout: ShardLayout,
                 model: torch.nn.Module, data: ShardedHDF5, cache_bytes: int = 1 << 30):
        self.comm = comm
        self.coordinator = coordinator
        self.shards = shards
        self.layout = layout
        self.model = model
        self.parameters = [p for p in model.parameters()]
        self.data = data
        self.flat = np.empty(layout.num_params)
        self.loaded_pass: int | None = None
        self.cache: dict = {}
        self.cache_left = cache_bytes
        self.computed = 0
        self.exit_after = _test_exit_after(comm.Get_rank())

    def serve(self) -> tuple:
        """Work until a ("stop", ...) assignment; returns the coordinator's final message."""
        torch.set_num_threads(1)
        sending: list = []  # the previous portion's gradient sends (and their buffers)
        while True:
            wait_for_message(self.comm, source=self.coordinator, tag=ASSIGN)
            assignment = self.comm.recv(source=self.coordinator, tag=ASSIGN)
            if assignment[0] == "stop":
                wait_all([request for request, _ in sending])
                self.comm.send(None, dest=self.coordinator, tag=EXIT)
                wait_for_message(self.comm, source=self.coordinator, tag=ASSIGN)
                return self.comm.recv(source=self.coordinator, tag=ASSIGN)[1:]
            pass_id, portion, start, end = assignment
            if not self._load_parameters(pass_id):
                self.comm.Send(np.array([pass_id, portion, np.nan, 0.0]), dest=self.coordinator, tag=RESULT)
                continue
            loss, gradient = self._loss_and_gradient(portion, start, end)
            self.computed += 1
            if self.exit_after is not None and self.computed >= self.exit_after:
                print(f"[rank {self.comm.Get_rank()}] {TEST_EXIT_VARIABLE}: leaving the job in the middle of "
                      f"pass {pass_id}", file=sys.stderr, flush=True)
                os._exit(3)
            wait_all([request for request, _ in sending])
            sending = []
            for shard, rank in enumerate(self.shards):
                part = gradient[self.layout.shard_slice(shard)]
                buffer = np.concatenate([[float(pass_id), float(portion)], part])
                sending.append((self.comm.Isend(buffer, dest=rank, tag=GRADIENT), buffer))
            self.comm.Send(np.array([pass_id, portion, loss, 1.0]), dest=self.coordinator, tag=RESULT)

    def _load_parameters(self, pass_id: int) -> bool:
        """Pull the pass's point from every shard; False when a shard says the pass is over."""
        if pass_id == self.loaded_pass:
            return True
        request = np.array([pass_id], dtype=np.int64)
        wait_all([self.comm.Isend(request, dest=rank, tag=PULL) for rank in self.shards])
        current = True
        for shard, rank in enumerate(self.shards):
            piece = self.layout.shard_slice(shard)
            buffer = np.empty(2 + piece.stop - piece.start)
            wait_for_message(self.comm, source=rank, tag=PARAMETERS)
            self.comm.Recv(buffer, source=rank, tag=PARAMETERS)
            if buffer[1] == 0.0 or int(buffer[0]) != pass_id:  # [pass, 0]: that pass is over
                current = False
            else:
                self.flat[piece] = buffer[2:]
        if current:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(self.flat), self.parameters)
            self.loaded_pass = pass_id
        return current

    def _rows(self, portion: int, start: int, end: int) -> tuple:
        cached = self.cache.get(portion)
        if cached is not None:
            return cached
        x, y = self.data.read_rows(np.arange(start, end))
        rows = (x.to(torch.float64), y)
        size = rows[0].numel() * 8 + rows[1].numel() * 8
        if size <= self.cache_left:
            self.cache[portion] = rows
            self.cache_left -= size
        return rows

    def _loss_and_gradient(self, portion: int, start: int, end: int) -> tuple:
        x, y = self._rows(portion, start, end)
        loss = F.cross_entropy(self.model(x), y, reduction="sum")
        gradients = torch.autograd.grad(loss, self.parameters)
        flat = torch.cat([g.reshape(-1) for g in gradients]).numpy()
        return float(loss.detach()), flat


def _test_exit_after(rank: int) -> int | None:
    value = os.environ.get(TEST_EXIT_VARIABLE)
    if not value:
        return None
    target, _, count = value.partition(":")
    return int(count) if int(target) == rank else None
