"""Data movement between pipeline stages: activations forward, their gradients backward, failures to all.

Only activations cross stage boundaries (DistBelief's partitioned model). Every message is nonblocking
(``Isend``/``Irecv``) and every wait polls it with a deadline through :func:`mpisgd.comm.wait.wait_until`,
watching the failure channel at the same time: a rank that fails tells every other rank at once, so a
neighbour waiting for its activations stops within milliseconds instead of hanging. Receives of a step are
posted up front, so data lands while the stage computes.

The shape and dtype of what crosses a boundary are agreed once, on the first step at a micro-batch size
(the sender sends a small spec before the first tensor): afterwards every send is checked against the spec
and every receive against its size, and a difference is an error naming the stage and micro-batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, NamedTuple, Optional

import torch
from mpi4py import MPI

from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.comm.watchdog import world_ranks
from mpisgd.errors import CommError

logger = logging.getLogger(__name__)

NOTICE_CHARS = 4000  # failure texts stay small: a notice must never need the rendezvous protocol


class Tag(IntEnum):
    """Message tags; tensors of micro-batch i use ``tag + TAGS_PER_MICRO_BATCH * i``."""

    SPEC = 1
    ACTIVATION = 2
    GRADIENT = 3
    FAILURE = 4
    STATE = 5


TAGS_PER_MICRO_BATCH = 8


def tensor_tag(tag: Tag, micro_batch: int) -> int:
    return int(tag) + TAGS_PER_MICRO_BATCH * micro_batch


class PeerFailed(CommError):
    """Another rank announced a failure while this one waited; the step ends on every rank together."""


class StageMismatchError(CommError):
    """What crosses a stage boundary differs from what the stages agreed on the first step."""


class TensorSpec(NamedTuple):
    """Shape and dtype of one micro-batch's activations at a boundary, and whether a gradient comes back."""

    shape: tuple
    dtype: str
    requires_grad: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""), tensor.requires_grad)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.torch_dtype).element_size()

    def __str__(self) -> str:
        return f"shape {self.shape} {self.dtype}"


def as_bytes(tensor: torch.Tensor) -> Any:
    """A numpy uint8 view of a contiguous CPU tensor (any dtype, bfloat16 included) for MPI."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class FailureChannel:
    """Failure notices between all ranks of ``world`` (tag FAILURE): announce once, poll often."""

    def __init__(self, world: MPI.Comm) -> None:
        self.world = world
        self.world_ranks = world_ranks(world)  # how reports name the ranks of ``world``
        self.received: dict[int, str] = {}
        self._sends: list[MPI.Request] = []

    def announce(self, text: str) -> None:
        """Tell every other rank (nonblocking) that this rank failed with ``text``."""
        me = self.world.Get_rank()
        for rank in range(self.world.Get_size()):
            if rank != me:
                self._sends.append(self.world.isend(text[:NOTICE_CHARS], dest=rank, tag=Tag.FAILURE))

    def poll(self) -> Optional[tuple[int, str]]:
        """Take in every notice that has arrived; the first one seen (lowest rank) or None."""
        status = MPI.Status()
        while True:
            message = self.world.improbe(source=MPI.ANY_SOURCE, tag=Tag.FAILURE, status=status)
            if message is None:
                break
            self.received[status.Get_source()] = message.recv()
        if not self.received:
            return None
        first = min(self.received)
        return first, self.received[first]

    def collect(self, ranks: Sequence[int], waiter: Waiter) -> None:
        """Receive the notices of ``ranks`` (every one of which announced), then finish our own sends."""
        for rank in ranks:
            if rank not in self.received:
                waiter.until(lambda rank=rank: (self.poll(), rank in self.received)[1],
                             what=f"rank {rank}'s failure notice", peers=[self.world_ranks[rank]])
        waiter.requests(self._sends, what="failure notices to the other ranks", watch_failures=False)
        self._sends.clear()


class Waiter:
    """Every wait of a model-parallel step: a deadline, a polite backoff, and the failure channel watched.

    With a ``watchdog`` (the job's communicator's, :class:`~mpisgd.comm.watchdog.Watchdog`) waits follow
    the collective watchdog: after ``--stall-warning`` seconds the waiting rank logs what it waits for and
    from which rank, after ``timeout`` (None: ``--collective-timeout``; 0: no deadline) it raises
    :class:`~mpisgd.errors.CollectiveTimeout` naming that rank. Without one, ``timeout`` (None: none) ends a
    wait with :class:`~mpisgd.comm.wait.WaitTimeout`.
    """

    def __init__(self, failures: FailureChannel, *, timeout: Optional[float] = None, spin: bool = False,
                 watchdog: Any = None) -> None:
        self.failures, self.timeout, self.spin, self.watchdog = failures, timeout, spin, watchdog
        self.waited_s = 0.0  # seconds spent waiting: the bubble a benchmark reports

    def _backoff(self) -> Backoff:
        return Backoff(spin=True) if self.spin else Backoff(first=2e-5, longest=1e-3)

    def until(self, ready: Any, *, what: str, peers: Sequence[int] = (), watch_failures: bool = True,
              collective: Optional[str] = None) -> Any:
        """Poll ``ready()`` until it returns a value (see :func:`wait_until`); :class:`PeerFailed` as soon as
        another rank announces a failure (unless ``watch_failures`` is False). ``peers``: the world ranks
        the wait depends on (named when it stalls); ``collective``: the wait is a collective of every rank
        of the watchdog's communicator, entered under that name (its stalls name who has not arrived)."""
        def poll():
            result = ready()
            if result is not None and result is not False:
                return result
            if watch_failures:
                notice = self.failures.poll()
                if notice is not None:
                    raise PeerFailed(f"rank {notice[0]} failed: {notice[1]}")
            return None
        started = time.perf_counter()
        try:
            if self.watchdog is None:
                return wait_until(poll, timeout=self.timeout, what=what, backoff=self._backoff())
            if collective is not None:
                self.watchdog.enter(collective)
                with self.watchdog.timeout_of(self.timeout):
                    if self.watchdog.settings.enabled:
                        return self.watchdog.wait_for(poll)
                return wait_until(poll, what=what, backoff=self._backoff())
            return self.watchdog.wait_for_peers(poll, what=what, peers=peers, timeout=self.timeout,
                                                backoff=self._backoff())
        finally:
            self.waited_s += time.perf_counter() - started

    def requests(self, requests: Sequence[MPI.Request], *, what: str, peers: Sequence[int] = (),
                 watch_failures: bool = True) -> None:
        """Wait for every request in ``requests`` to complete."""
        if requests:
            self.until(lambda: MPI.Request.Testall(list(requests)), what=what, peers=peers,
                       watch_failures=watch_failures)


class PipelineLink:
    """One rank's two boundaries in its replica's pipeline: receives from stage s-1, sends to stage s+1.

    Args:
        comm: the pipeline communicator (rank = stage).
        waiter: deadlines and failure watching.
        where: text naming this rank in errors ("stage 1 (rank 3)").
    """

    def __init__(self, comm: MPI.Comm, waiter: Waiter, where: str) -> None:
        self.comm, self.waiter, self.where = comm, waiter, where
        self.stage, self.stages = comm.Get_rank(), comm.Get_size()
        self.world_ranks = world_ranks(comm)  # of the stages, as reports name them
        self.inbound: Optional[TensorSpec] = None  # from stage s-1
        self.outbound: Optional[TensorSpec] = None  # to stage s+1
        self._specs: dict[Any, tuple[Optional[TensorSpec], Optional[TensorSpec]]] = {}
        self._key: Any = None
        self._micro_batches = 0
        self._activation_receives: dict[int, tuple[MPI.Request, torch.Tensor]] = {}
        self._gradient_receives: dict[int, tuple[MPI.Request, torch.Tensor]] = {}
        self._sends: list[tuple[MPI.Request, Any]] = []
        self.bytes_sent = 0

    def peer(self, stage: int) -> list[int]:
        """Stage ``stage``'s world rank, as a list of the peers a wait depends on."""
        return [self.world_ranks[stage]]

    @property
    def neighbours(self) -> list[int]:
        return [self.world_ranks[s] for s in (self.stage - 1, self.stage + 1) if 0 <= s < self.stages]

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    # ---- step boundaries ------------------------------------------------------------------
    def begin(self, micro_batches: int, key: Any) -> None:
        """Start a step of ``micro_batches``; ``key`` (micro-batch rows, training or not) selects the specs
        agreed for it, or a fresh agreement on its first use."""
        self._key, self._micro_batches = key, micro_batches
        self.inbound, self.outbound = self._specs.get(key, (None, None))
        if self.inbound is not None:
            self._post_activation_receives()
        if self.outbound is not None:
            self._post_gradient_receives()

    def finish(self) -> None:
        """Wait for this step's sends (their buffers are then free) and remember the specs."""
        self.waiter.requests([request for request, _ in self._sends], what=f"{self.where}'s sends to its neighbours",
                             peers=self.neighbours)
        self._sends.clear()
        self._specs[self._key] = (self.inbound, self.outbound)

    def abandon(self) -> list:
        """After a failed step: cancel the receives still pending (and complete them, as MPI requires).

        Returns the sends still pending (with their buffers): a send cannot be cancelled safely, so they and
        their communicator must be kept alive until MPI_Finalize.
        """
        pending = [r for r, _ in self._activation_receives.values()] + [r for r, _ in self._gradient_receives.values()]
        for request in pending:
            request.Cancel()
        self.waiter.requests(pending, what=f"{self.where}'s cancelled receives", peers=self.neighbours,
                             watch_failures=False)
        self._activation_receives.clear()
        self._gradient_receives.clear()
        pending_sends = [] if MPI.Request.Testall([r for r, _ in self._sends]) else list(self._sends)
        self._sends.clear()
        return pending_sends

    # ---- forward --------------------------------------------------------------------------
    def send_activation(self, micro_batch: int, output: torch.Tensor) -> None:
        """Send micro-batch ``micro_batch``'s output to the next stage (nonblocking)."""
        if not isinstance(output, torch.Tensor):
            raise StageMismatchError(f"{self.where} produced a {type(output).__name__} for micro-batch "
                                     f"{micro_batch}; only single tensors can cross a stage boundary")
        spec = TensorSpec.of(output)
        if self.outbound is None:
            self.outbound = spec
            self._sends.append((self.comm.isend(spec, dest=self.stage + 1, tag=Tag.SPEC), None))
            self._post_gradient_receives()
        elif spec != self.outbound:
            raise StageMismatchError(
                f"{self.where}, micro-batch {micro_batch}: its output activations have "
                f"{_differences(spec, self.outbound)} (the stages agreed on {self.outbound} on the first step)")
        self._send(output.detach(), self.stage + 1, tensor_tag(Tag.ACTIVATION, micro_batch))

    def receive_activation(self, micro_batch: int) -> torch.Tensor:
        """The previous stage's output for ``micro_batch`` (waits for it), on the CPU; ``inbound.requires_grad``
        says whether a gradient goes back."""
        if self.inbound is None:
            self.inbound = self.waiter.until(self._take_spec, what=f"the activation spec from stage {self.stage - 1}",
                                             peers=self.peer(self.stage - 1))
            self._post_activation_receives()
        assert self.inbound is not None
        # popped only once complete: MPI writes into the buffer until then
        request, buffer = self._activation_receives[micro_batch]
        self._wait_received(request, self.inbound, f"micro-batch {micro_batch}'s activations from stage "
                                                   f"{self.stage - 1}", self.stage - 1)
        del self._activation_receives[micro_batch]
        return buffer

    # ---- backward -------------------------------------------------------------------------
    def receive_gradient(self, micro_batch: int) -> torch.Tensor:
        """The gradient of this stage's output for ``micro_batch`` from the next stage (waits for it)."""
        assert self.outbound is not None
        request, buffer = self._gradient_receives[micro_batch]
        self._wait_received(request, self.outbound, f"micro-batch {micro_batch}'s gradient from stage "
                                                    f"{self.stage + 1}", self.stage + 1)
        del self._gradient_receives[micro_batch]
        return buffer

    def send_gradient(self, micro_batch: int, gradient: Optional[torch.Tensor]) -> None:
        """Send the gradient of this stage's input for ``micro_batch`` back to the previous stage."""
        assert self.inbound is not None
        if gradient is None:  # the input did not influence the output: its gradient is zero
            gradient = torch.zeros(self.inbound.shape, dtype=self.inbound.torch_dtype)
        spec = TensorSpec.of(gradient)
        if spec.shape != self.inbound.shape or spec.dtype != self.inbound.dtype:
            raise StageMismatchError(f"{self.where}, micro-batch {micro_batch}: the gradient of its input has "
                                     f"{_differences(spec, self.inbound)}")
        self._send(gradient.detach(), self.stage - 1, tensor_tag(Tag.GRADIENT, micro_batch))

    # ---- helpers --------------------------------------------------------------------------
    def _send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        payload = tensor.contiguous().cpu()
        data = as_bytes(payload)
        self._sends.append((self.comm.Isend(data, dest=dest, tag=tag), payload))
        self.bytes_sent += data.nbytes

    def _take_spec(self) -> Optional[TensorSpec]:
        message = self.comm.improbe(source=self.stage - 1, tag=Tag.SPEC)
        return None if message is None else message.recv()

    def _post(self, spec: TensorSpec, source: int, tag: Tag) -> dict[int, tuple[MPI.Request, torch.Tensor]]:
        posted = {}
        for micro_batch in range(self._micro_batches):
            buffer = torch.empty(spec.shape, dtype=spec.torch_dtype)
            request = self.comm.Irecv(as_bytes(buffer), source=source, tag=tensor_tag(tag, micro_batch))
            posted[micro_batch] = (request, buffer)
        return posted

    def _post_activation_receives(self) -> None:
        if not self.first and self.inbound is not None:
            self._activation_receives = self._post(self.inbound, self.stage - 1, Tag.ACTIVATION)

    def _post_gradient_receives(self) -> None:
        if not self.last and self.outbound is not None and self.outbound.requires_grad:
            self._gradient_receives = self._post(self.outbound, self.stage + 1, Tag.GRADIENT)

    def _wait_received(self, request: MPI.Request, spec: TensorSpec, what: str, source: int) -> None:
        status = MPI.Status()
        try:
            self.waiter.until(lambda: request.Test(status), what=what, peers=self.peer(source))
        except MPI.Exception as exc:  # a longer message than agreed: MPI_ERR_TRUNCATE
            raise StageMismatchError(f"{self.where} received {what} larger than the agreed {spec}: {exc}") from None
        count = status.Get_count(MPI.BYTE)
        if count != spec.nbytes:
            raise StageMismatchError(f"{self.where} received {what} of {count} bytes; the agreed {spec} has "
                                     f"{spec.nbytes}")


def _differences(got: TensorSpec, agreed: TensorSpec) -> str:
    parts = []
    if got.shape != agreed.shape:
        parts.append(f"shape {got.shape} instead of {agreed.shape}")
    if got.dtype != agreed.dtype:
        parts.append(f"dtype {got.dtype} instead of {agreed.dtype}")
    if got.requires_grad != agreed.requires_grad:
        parts.append(f"requires_grad={got.requires_grad} instead of {agreed.requires_grad}")
    return ", ".join(parts)
