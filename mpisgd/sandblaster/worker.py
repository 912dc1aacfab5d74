"""A Sandblaster worker rank: computes the loss and gradient of whichever portion the coordinator rank
hands it.

For each assignment (pass, portion, rows) it pulls the pass's point from every shard (once per
pass), computes the *sum* of the per-sample losses over the portion's rows and its gradient with
torch in float64, posts the sends of each shard's slice of the gradient and reports the loss to
the coordinator rank at once; the sends complete while it waits for its next assignment (it
completes them before posting the next ones). Waiting for them before reporting cost ~2.6 ms per
portion on a 2-core machine (a rendezvous with a shard that polls with sleeps) for ~2 ms of compute.
Should the worker die between reporting and delivering, the shard reports the portion missing at the
end of the pass and the coordinator rank re-issues it.

A portion's result must not depend on which worker computed it (backup copies race, and the run
must be reproducible), so workers use one torch thread; rows a worker read once stay cached (up
to ``cache_bytes``), since every pass reads the same portions.

Test-only faults (`mpisgd.faults.sandblaster_fault`, ``MPISGD_SANDBLASTER_FAULT=<rank>:<n>:<action>``):
after computing its ``n``-th portion, before reporting it (i.e. in the middle of a pass), the worker
of world rank ``<rank>`` leaves the job with ``os._exit(3)`` (``exit``), stops itself with SIGSTOP
(``freeze``), or, from then on, holds every portion it computed until that portion's pass is over
(``straggle``: a straggler whose every portion a backup copy wins, whatever the machine's load).
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpisgd import log
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.data import ShardedHDF5
from mpisgd.faults import SANDBLASTER_FAULT_VARIABLE, PortionFault, SignalAtStep
from mpisgd.sandblaster.protocol import (
    Assignment,
    Ending,
    SignalForwarder,
    Tag,
    WorkerCommand,
    polite_backoff,
    wait_for_message,
)
from mpisgd.training.layout import ShardLayout

logger = logging.getLogger(__name__)


def wait_all(requests: list) -> None:
    """Waitall that sleeps between tests instead of spinning (see `mpisgd.sandblaster.protocol`)."""
    wait_until(lambda: MPI.Request.Testall(requests), what="sends to complete", backoff=polite_backoff())


class PortionWorker:
    """Compute portions until the coordinator rank says stop.

    Args:
        comm: the run's communicator.
        coordinator: the coordinator's rank.
        shards: shard ranks, in shard order.
        layout: which slice of the flat parameter vector each shard holds.
        model: the model, float64, parameters in the flat vector's order.
        data: the training set (any rows can be read).
        cache_bytes: how much portion data to keep in memory.
        fault: test-only (n, action) from `mpisgd.faults.sandblaster_fault`; None in real runs.
    """

    def __init__(self, comm: MPI.Comm, *, coordinator: int, shards: Sequence[int], layout: ShardLayout,
                 model: torch.nn.Module, data: ShardedHDF5, cache_bytes: int = 1 << 30,
                 fault: Optional[tuple[int, PortionFault]] = None, signal_fault: Optional[SignalAtStep] = None) -> None:
        self.comm = comm
        self.coordinator = coordinator
        self.shards = tuple(shards)
        self.layout = layout
        self.model = model
        self.parameters = list(model.parameters())
        self.data = data
        self.flat = np.empty(layout.num_params)
        self.loaded_pass: Optional[int] = None
        self.cache: dict = {}
        self.cache_left = cache_bytes
        self.computed = 0
        self.fault = fault
        self.signal_fault = signal_fault  # MPISGD_TEST_SIGNAL_AT: this rank signals itself after its n-th portion
        self.inbox: deque = deque()  # messages from the coordinator read early (while holding a portion)
        self.forward_signal = SignalForwarder(comm, coordinator)

    def serve(self) -> Ending:
        """Work until the coordinator's stop; returns how the run ended."""
        torch.set_num_threads(1)
        sending: list = []  # the previous portion's gradient sends (and their buffers)
        while True:
            self.forward_signal()
            message = self._next_message()
            if message[0] == WorkerCommand.STOP:
                wait_all([request for request, _ in sending])
                self.comm.send(None, dest=self.coordinator, tag=Tag.EXIT)
                return Ending(*self._next_message()[1])
            assignment = Assignment(*message)
            if not self._load_parameters(assignment.pass_id):
                report = [assignment.pass_id, assignment.portion, np.nan, 0.0]
                self.comm.Send(np.array(report), dest=self.coordinator, tag=Tag.RESULT)
                continue
            loss, gradient = self._loss_and_gradient(assignment)
            self.computed += 1
            if self.signal_fault is not None:
                self.signal_fault.strike(self.computed)
            if self.fault is not None and self.computed >= self.fault[0]:
                self._strike(self.fault[1], assignment)
            wait_all([request for request, _ in sending])
            sending = []
            for shard, rank in enumerate(self.shards):
                part = gradient[self.layout.shard_slice(shard)]
                buffer = np.concatenate([[float(assignment.pass_id), float(assignment.portion)], part])
                sending.append((self.comm.Isend(buffer, dest=rank, tag=Tag.GRADIENT), buffer))
            report = [assignment.pass_id, assignment.portion, loss, 1.0]
            self.comm.Send(np.array(report), dest=self.coordinator, tag=Tag.RESULT)

    def _next_message(self) -> Any:
        """The next message from the coordinator: an Assignment's fields, or a WorkerCommand tuple."""
        if self.inbox:
            return self.inbox.popleft()
        wait_for_message(self.comm, source=self.coordinator, tag=Tag.ASSIGN)
        return self.comm.recv(source=self.coordinator, tag=Tag.ASSIGN)

    def _load_parameters(self, pass_id: int) -> bool:
        """Pull the pass's point from every shard; False when a shard says the pass is over."""
        if pass_id == self.loaded_pass:
            return True
        request = np.array([pass_id], dtype=np.int64)
        wait_all([self.comm.Isend(request, dest=rank, tag=Tag.PULL) for rank in self.shards])
        current = True
        for shard, rank in enumerate(self.shards):
            piece = self.layout.shard_slice(shard)
            buffer = np.empty(2 + piece.stop - piece.start)
            wait_for_message(self.comm, source=rank, tag=Tag.PARAMETERS)
            self.comm.Recv(buffer, source=rank, tag=Tag.PARAMETERS)
            if buffer[1] == 0.0 or int(buffer[0]) != pass_id:  # [pass, 0]: that pass is over
                current = False
            else:
                self.flat[piece] = buffer[2:]
        if current:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(self.flat), self.parameters)
            self.loaded_pass = pass_id
        return current

    def _rows(self, assignment: Assignment) -> tuple:
        cached = self.cache.get(assignment.portion)
        if cached is not None:
            return cached
        x, y = self.data.read_rows(np.arange(assignment.start, assignment.end))
        rows = (x.to(torch.float64), y)
        size = rows[0].numel() * 8 + rows[1].numel() * 8
        if size <= self.cache_left:
            self.cache[assignment.portion] = rows
            self.cache_left -= size
        return rows

    def _loss_and_gradient(self, assignment: Assignment) -> tuple[float, np.ndarray]:
        x, y = self._rows(assignment)
        loss = F.cross_entropy(self.model(x), y, reduction="sum")
        gradients = torch.autograd.grad(loss, self.parameters)
        flat = torch.cat([g.reshape(-1) for g in gradients]).numpy()
        return float(loss.detach()), flat

    # ---- test-only faults ----------------------------------------------------------------------
    def _strike(self, fault: PortionFault, assignment: Assignment) -> None:
        rank = self.comm.Get_rank()
        if fault is PortionFault.EXIT:
            logger.warning("worker rank %d, %s: leaving the job in the middle of pass %d",
                           rank, SANDBLASTER_FAULT_VARIABLE, assignment.pass_id)
            log.flush()
            os._exit(3)
        if fault is PortionFault.FREEZE:
            logger.warning("worker rank %d, %s: freezing (SIGSTOP) in the middle of pass %d",
                           rank, SANDBLASTER_FAULT_VARIABLE, assignment.pass_id)
            log.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
        if fault is PortionFault.STRAGGLE:
            wait_until(lambda: self._pass_is_over(assignment.pass_id), what=f"the end of pass {assignment.pass_id}",
                       backoff=Backoff())

    def _pass_is_over(self, pass_id: int) -> bool:
        """True once the coordinator sent anything but an assignment of ``pass_id`` (read into the inbox)
        or shard 0 no longer serves the point of ``pass_id`` (a later pass has begun)."""
        while self.comm.Iprobe(source=self.coordinator, tag=Tag.ASSIGN):
            self.inbox.append(self.comm.recv(source=self.coordinator, tag=Tag.ASSIGN))
        if any(isinstance(message[0], WorkerCommand) or message[0] != pass_id for message in self.inbox):
            return True
        shard_rank = self.shards[0]
        self.comm.Send(np.array([pass_id], dtype=np.int64), dest=shard_rank, tag=Tag.PULL)
        answer = np.empty(2 + self.layout.shard_size(0))
        wait_for_message(self.comm, source=shard_rank, tag=Tag.PARAMETERS)
        self.comm.Recv(answer, source=shard_rank, tag=Tag.PARAMETERS)
        return bool(answer[1] == 0.0)
