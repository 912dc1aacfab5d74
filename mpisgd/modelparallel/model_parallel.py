"""``ModelParallel``: one model replica split across ranks, several replicas training together (DistBelief).

Dean et al. (2012), Figs. 1-2: a model is partitioned across machines; only activations crossing partition
boundaries travel, and data parallelism runs several such partitioned replicas side by side. Here the
partition is of a ``torch.nn.Sequential`` into K pipeline stages (contiguous layers, balanced once on rank 0
and broadcast), each Linear of a stage optionally split over T ranks by output features, and R = world/(K*T)
replicas. A step cuts each replica's batch into M micro-batches, runs a GPipe or 1F1B schedule, then
averages each stage's gradients over its R copies only; the user's own optimizer then steps on the local
sub-module, exactly as it would on the unsplit model.

Failures end the step on every rank together: a rank whose stage raises tells all others at once (they are
polling while they wait), every rank then agrees in one nonblocking all-gather on who failed, and all raise
the same :class:`~mpisgd.errors.JobFailedError` naming the rank, stage, micro-batch and the error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from enum import IntEnum
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpisgd import checkpoint as ckpt
from mpisgd.comm import Communicator, get_communicator
from mpisgd.comm.wait import WaitTimeout
from mpisgd.comm.watchdog import world_ranks
from mpisgd.errors import CollectiveTimeout, JobFailedError, SharedConfigError
from mpisgd.modelparallel import state as global_state
from mpisgd.modelparallel.grid import Coordinates, GridCommunicators, GridShape
from mpisgd.modelparallel.partition import Balance, resolve_balance
from mpisgd.modelparallel.schedules import make_schedule
from mpisgd.modelparallel.stage import LossFn, StageWorker
from mpisgd.modelparallel.tensor_parallel import SplitGroup, split_linears
from mpisgd.modelparallel.transport import (
    FailureChannel,
    PeerFailed,
    PipelineLink,
    Tag,
    Waiter,
)

logger = logging.getLogger(__name__)


class StepStatus(IntEnum):
    """What a rank reports in the all-gather that ends every step."""

    OK = 0
    FAILED = 1  # this rank's stage raised (it announced the failure)
    STOPPED = 2  # this rank stopped because another announced a failure


class ModelParallel:
    """Train a ``torch.nn.Sequential`` split into pipeline stages (and within layers) across ranks.

    Args:
        model: the unsplit model; every rank builds the same one (same seed). Each rank keeps only its
            stage's layers (replica 0's values are broadcast to the other replicas).
        stages: K, pipeline stages per replica (1 <= K <= number of layers).
        micro_batches: M >= K, micro-batches per step.
        schedule: ``"gpipe"`` or ``"1f1b"`` (see :mod:`mpisgd.modelparallel.schedules`).
        balance: ``"params"``, ``"time"`` (needs ``example_input``), ``"uniform"`` or layers per stage.
        tensor_parallel: T, ranks over which each Linear of a stage is split by output features.
        comm: the job's communicator (mpi4py or mpisgd); COMM_WORLD when None. World = R x K x T.
        example_input: a batch to time the layers on, for ``balance="time"`` (used on rank 0 only).
        timeout: seconds any wait of a step may make no progress before
            :class:`~mpisgd.errors.CollectiveTimeout` naming the rank waited for (a dead or stopped peer;
            failures that raise are reported within milliseconds). None: the communicator's collective
            timeout (``--collective-timeout``); 0: none. Waits warn after its stall warning as collectives do.
        name: how errors and logs name this rank (default: its rank and coordinates in ``comm``), e.g. its
            world rank where ``comm`` is one replica's.

    Raises:
        SharedConfigError: on every rank, for sizes that do not fit (the message names sizes that do).

    Call :meth:`free` (or use ``with``) to release the communicators; collective.
    """

    def __init__(self, model: nn.Module, *, stages: int = 1, micro_batches: int = 1, schedule: str = "gpipe",
                 balance: Balance = "params", tensor_parallel: int = 1, comm: Any = None,
                 example_input: Optional[torch.Tensor] = None, timeout: Optional[float] = None,
                 name: Optional[str] = None) -> None:
        self._name = name
        communicator: Communicator = get_communicator(comm)
        if not isinstance(model, nn.Sequential):
            raise SharedConfigError(f"ModelParallel splits a torch.nn.Sequential, got {type(model).__name__}")
        if micro_batches < stages:
            raise SharedConfigError(f"micro_batches ({micro_batches}) must be at least stages ({stages}): with "
                                    "fewer, stages idle most of the step; use micro_batches >= stages")
        if not 1 <= stages <= len(model):
            raise SharedConfigError(f"cannot cut {len(model)} layers into {stages} stages (each stage needs a "
                                    f"layer; stages can be 1..{len(model)})")
        self.schedule = make_schedule(schedule, stages, micro_batches)
        self.shape = GridShape(communicator.size, stages, tensor_parallel)
        self.micro_batches = micro_batches
        self.layer_counts = self._agree_on_balance(communicator, model, stages, balance, example_input)
        self._grid = GridCommunicators(communicator.mpi, self.shape)
        self.coordinates: Coordinates = self._grid.where
        self.rank = communicator.rank
        bounds = np.cumsum((0,) + self.layer_counts)
        self.layers = range(int(bounds[self.stage]), int(bounds[self.stage + 1]))
        assert self._grid.world is not None and self._grid.pipeline is not None and self._grid.splits is not None
        self._failures = FailureChannel(self._grid.world)
        self._waiter = Waiter(self._failures, timeout=timeout, spin=not communicator.oversubscribed,
                              watchdog=communicator.watchdog)
        self._communicator = communicator  # its watched small collectives serve the whole grid (same ranks)
        children = list(model.named_children())
        self.module = nn.Sequential(OrderedDict(children[i] for i in self.layers))
        self._split_group = SplitGroup(self._grid.splits, self._waiter, world_ranks(self._grid.splits)) \
            if self.splits > 1 else None
        split_linears(self.module, self._split_group)
        self._link = PipelineLink(self._grid.pipeline, self._waiter, self.where)
        self._worker = StageWorker(self.module, self._link)
        self._failed: Optional[str] = None
        self._checked_gradients = False
        self._broadcast_from_replica_zero()

    # ---- where this rank is ------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self.coordinates.stage

    @property
    def replica(self) -> int:
        return self.coordinates.replica

    @property
    def split(self) -> int:
        return self.coordinates.split

    @property
    def stages(self) -> int:
        return self.shape.stages

    @property
    def replicas(self) -> int:
        return self.shape.replicas

    @property
    def splits(self) -> int:
        return self.shape.splits

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def has_parameters(self) -> bool:
        """Whether the local stage has parameters (an optimizer over none would fail to build)."""
        return any(True for _ in self.module.parameters())

    @property
    def where(self) -> str:
        if self._name is not None:
            return self._name
        return f"rank {self.rank} (stage {self.stage} of {self.stages}, replica {self.replica}, split {self.split})"

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to neighbouring stages so far (activations and gradients)."""
        return self._link.bytes_sent

    @property
    def most_micro_batches_held(self) -> int:
        """The most micro-batches whose activations this stage has kept at once (GPipe: M; 1F1B: <= K - s)."""
        return self._worker.most_held

    @property
    def seconds_waited(self) -> float:
        """Seconds this rank spent waiting for other ranks so far (its share of the pipeline bubble)."""
        return self._waiter.waited_s

    @property
    def split_bytes_received(self) -> int:
        """Bytes this rank received from the other splits of its stage so far."""
        return 0 if self._split_group is None else self._split_group.bytes_received

    # ---- training ------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: Any, loss_fn: LossFn) -> float:
        """Forward and backward of the global batch ``x``, ``y``; returns its mean loss on every rank.

        Like ``loss.backward()``: gradients accumulate into the local sub-module's ``.grad`` (call the
        optimizer's ``zero_grad`` before) and are averaged over the replicas; then call its ``step()``.
        Replica a takes rows ``[a*B/R, (a+1)*B/R)``; ``loss_fn(output, target)`` must return the mean over
        its rows (as ``F.cross_entropy`` does), so micro-batch and replica means give the batch mean.
        Only the first stage reads ``x`` and only the last ``y`` (None elsewhere is fine); the others need
        only ``len(x)``.
        """
        rows = len(x)
        if rows % (self.replicas * self.micro_batches):
            raise SharedConfigError(
                f"a global batch of {rows} rows does not cut into {self.replicas} replicas x {self.micro_batches} "
                f"micro-batches: use a multiple of {self.replicas * self.micro_batches}")
        share = rows // self.replicas
        mine = slice(self.replica * share, (self.replica + 1) * share)
        return self.train_replica_step(x[mine], None if y is None else y[mine], loss_fn)

    def train_replica_step(self, x: torch.Tensor, y: Any, loss_fn: LossFn) -> float:
        """:meth:`train_step` on this replica's own rows (every rank of a replica passes the same batch);
        for data loaders that already give each replica its shard. Returns the mean over replicas."""
        self._check_usable()
        rows = len(x)
        if rows % self.micro_batches:
            raise SharedConfigError(f"a replica batch of {rows} rows does not cut into {self.micro_batches} "
                                    f"micro-batches: use a multiple of {self.micro_batches}")
        micro_rows = rows // self.micro_batches
        inputs = list(torch.split(x, micro_rows)) if self.is_first_stage else None
        targets = list(torch.split(y, micro_rows)) if self.is_last_stage else None
        loss = self._guarded((micro_rows, True), lambda: self._worker.run(
            self.schedule.actions(self.stage), inputs, targets, loss_fn), self.micro_batches)
        self._average_over_replicas()
        return loss

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The model's output for ``x`` (one forward in eval mode, no micro-batches) on last-stage ranks;
        None on the others. Collective over the replica."""
        self._check_usable()
        training = self.module.training
        self.module.eval()
        try:
            return self._guarded((len(x), False), lambda: self._worker.forward_only(x), 1, outputs=True)
        finally:
            self.module.train(training)

    # ---- checkpoints with the unsplit model's names ---------------------------------------------
    def state_dict(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Optional[dict[str, Any]]:
        """Gather replica 0's stages on rank 0: ``{"model": unsplit state_dict, "optimizer": by-name state}``
        on rank 0, None elsewhere. Collective."""
        world = self._world
        mine = None
        if self.replica == 0:
            mine = {"model": global_state.local_model_state(self.module),
                    "optimizer": global_state.local_optimizer_state(self.module, optimizer)}
        holders = range(self.stages * self.splits)  # replica 0's ranks
        if self.rank != 0:
            request = world.isend(mine, dest=0, tag=Tag.STATE) if self.replica == 0 else None
            if request is not None:
                self._waiter.requests([request], what="rank 0 taking this stage's state", watch_failures=False,
                                      peers=[self._failures.world_ranks[0]])
            return None
        parts: list[dict[str, Any]] = [mine] if mine is not None else []
        for rank in holders[1:]:
            message = self._waiter.until(lambda rank=rank: world.improbe(source=rank, tag=Tag.STATE),
                                         what=f"rank {rank}'s state", watch_failures=False,
                                         peers=[self._failures.world_ranks[rank]])
            parts.append(message.recv())
        return {"model": global_state.merge_model_states(p["model"] for p in parts),
                "optimizer": global_state.merge_optimizer_states(p["optimizer"] for p in parts)}

    def load_state_dict(self, model_state: dict[str, Any], optimizer: Optional[torch.optim.Optimizer] = None,
                        optimizer_state: Optional[dict[str, Any]] = None) -> None:
        """Load an unsplit ``model_state`` (and by-name ``optimizer_state``) on every rank; each takes its
        keys and rows. Collective: a problem on any rank raises on all."""
        error = None
        try:
            global_state.load_local_model_state(self.module, model_state)
            if optimizer is not None and optimizer_state is not None:
                global_state.load_local_optimizer_state(self.module, optimizer, optimizer_state)
        except (KeyError, RuntimeError, ValueError, IndexError) as exc:
            error = exc
        self._raise_together(error)

    def save_checkpoint(self, path: Union[str, Path], optimizer: Optional[torch.optim.Optimizer] = None,
                        extra: Optional[dict[str, Any]] = None) -> None:
        """Write an mpisgd checkpoint (HDF5, atomic) with the unsplit names from rank 0. Collective."""
        gathered = self.state_dict(optimizer)
        error = None
        if gathered is not None:
            try:
                ckpt.save_checkpoint(path, model_state=gathered["model"], optimizer_state=gathered["optimizer"],
                                     extra={"model_parallel": {"stages": self.stages, "tensor_parallel": self.splits,
                                                               "replicas": self.replicas}, **(extra or {})})
            except (OSError, TypeError) as exc:
                error = exc
        self._raise_together(error)

    def load_checkpoint(self, path: Union[str, Path], optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Load a checkpoint written by :meth:`save_checkpoint` (at any K and T, or of the unsplit model's
        ``state_dict()`` as model state) on every rank; returns its sections."""
        sections, error = None, None
        try:
            sections = ckpt.load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
        self._raise_together(error)
        assert sections is not None
        self.load_state_dict(sections["model_state"], optimizer, sections["optimizer_state"])
        return sections

    # ---- lifetime --------------------------------------------------------------------------------
    def free(self) -> None:
        """Release the communicators (collective); later use raises RuntimeError."""
        self._grid.free()
        self._failed = self._failed or "freed"

    def __enter__(self) -> ModelParallel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()

    def __repr__(self) -> str:
        return (f"ModelParallel({self.where}, layers {self.layers.start}..{self.layers.stop - 1}, "
                f"{self.schedule!r}, replicas={self.replicas}, tensor_parallel={self.splits})")

    # ---- internals -------------------------------------------------------------------------------
    @property
    def _world(self) -> MPI.Comm:
        if self._grid.world is None:
            raise RuntimeError("ModelParallel used after free()")
        return self._grid.world

    def _check_usable(self) -> None:
        if self._failed == "freed":
            raise RuntimeError("ModelParallel used after free()")
        if self._failed is not None:
            raise JobFailedError(f"an earlier model-parallel step failed ({self._failed}); messages of that step "
                                 "may still be in flight, so build a new ModelParallel (after free())")

    @staticmethod
    def _agree_on_balance(comm: Communicator, model: nn.Sequential, stages: int, balance: Balance,
                          example_input: Optional[torch.Tensor]) -> tuple[int, ...]:
        """Rank 0 cuts the model, everyone uses its cut (or raises its error)."""
        verdict: Any = None
        if comm.rank == 0:
            try:
                verdict = resolve_balance(model, stages, balance, example_input)
            except SharedConfigError as exc:
                verdict = str(exc)
        verdict = comm.bcast_object(verdict, root=0, name="model-parallel balance (rank 0's cut)")
        if isinstance(verdict, str):
            raise SharedConfigError(verdict)
        return tuple(verdict)

    def _broadcast_from_replica_zero(self) -> None:
        stage = self._grid.stage
        assert stage is not None
        tensors = [t.data for t in self.module.state_dict(keep_vars=True).values()]
        if self.replicas > 1 and tensors:
            stage.broadcast_many_(tensors, root=0)

    def _guarded(self, key: Any, work: Any, micro_batches: int, *, outputs: bool = False) -> Any:
        """Run one step's ``work`` and end it on every rank together (see the module docstring)."""
        status, text, result = StepStatus.OK, None, None
        self._link.begin(micro_batches, key)
        try:
            result = work()
            self._link.finish()
        except PeerFailed:
            status = StepStatus.STOPPED
        except CollectiveTimeout as exc:  # a peer is stopped or dead: it would never join the end of the step
            self._failed = str(exc)
            self._failures.announce(self._describe(exc))  # ranks waiting on something else stop at once
            raise
        except Exception as exc:  # noqa: BLE001 - every error of a stage must reach every rank
            status, text = StepStatus.FAILED, self._describe(exc)
            self._failures.announce(text)
            logger.debug("%s", text, exc_info=True)
        loss = result if not outputs and result is not None else None
        summary = self._end_step(status, loss, text)
        return result if outputs else summary

    def _describe(self, exc: BaseException) -> str:
        action = self._worker.current
        what = (f"micro-batch {action.micro_batch} {action.kind.name.lower()}" if action is not None
                else "after its micro-batches")
        return f"{self.where}, {what}: {type(exc).__name__}: {exc}"

    def _end_step(self, status: StepStatus, loss: Optional[float], text: Optional[str]) -> float:
        """One all-gather of (status, loss) over all ranks; the same result or error everywhere."""
        world = self._world
        mine = np.array([float(status), 0.0 if loss is None else 1.0, 0.0 if loss is None else loss])
        everyone = np.empty((world.Get_size(), 3))
        request = world.Iallgather(mine, everyone)
        try:
            self._waiter.until(lambda: (self._failures.poll(), request.Test())[1],
                               what="the end of the step on every rank", watch_failures=False,
                               collective="end of the model-parallel step")
        except (WaitTimeout, CollectiveTimeout) as exc:  # a rank died or stopped: only this rank knows; the CLI aborts the job
            self._failed = str(exc)
            raise
        failed = [rank for rank in range(len(everyone)) if everyone[rank, 0] == StepStatus.FAILED]
        if failed:
            self._failures.collect([r for r in failed if r != self.rank], self._waiter)
            first = failed[0]
            self._failed = text if first == self.rank else self._failures.received[first]
            pending_sends = self._link.abandon()
            if pending_sends:  # freeing their communicator or buffers could crash MPI
                self._grid.keep_pipeline(pending_sends)
            self._worker.abandon()
            raise JobFailedError(f"model-parallel step failed on {self._failed}")
        with_loss = everyone[everyone[:, 1] == 1.0, 2]
        return float(with_loss.mean()) if len(with_loss) else float("nan")

    def _raise_together(self, error: Optional[BaseException]) -> None:
        message = None if error is None else f"{self.where}: {type(error).__name__}: {error}"
        reports = [m for m in self._communicator.allgather_objects(message, name="model-parallel error reports")
                   if m is not None]
        if reports:
            raise JobFailedError(reports[0]) from error

    def _average_over_replicas(self) -> None:
        """Each stage's gradients (and floating buffers: batch norm statistics) averaged over its replicas."""
        stage = self._grid.stage
        if self.replicas == 1 or stage is None:
            return
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        arrays = [p.grad for p in parameters]
        arrays += [b for b in self.module.buffers() if b.is_floating_point()]
        if arrays:
            stage.allreduce_many_(arrays, "mean", check=not self._checked_gradients)
            self._checked_gradients = True

