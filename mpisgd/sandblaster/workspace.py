"""The Sandblaster coordinator rank's L-BFGS workspace: vectors that live on the shard ranks.

`ShardedWorkspace` implements `mpisgd.sandblaster.vector_program.Workspace`: a program of vector commands goes
to every shard and their partial scalars are combined in shard order; evaluating the objective is
one *pass* over the training set: the shards begin it (they serve its point to workers), the
`mpisgd.sandblaster.scheduler.PortionScheduler` gets every portion computed, and the shards end it
(they form the gradient from the portion gradients workers pushed to them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisgd.errors import CommError
from mpisgd.sandblaster.protocol import Ending, Portions, ShardCommand, Tag, receive_object, wait_for_message
from mpisgd.sandblaster.scheduler import PortionScheduler
from mpisgd.sandblaster.vector_program import combine_partials
from mpisgd.training.layout import ShardLayout


class ShardedWorkspace:
    """`mpisgd.sandblaster.vector_program.Workspace` whose vectors live on the shard ranks and whose objective is a pass.

    The objective is sum(portion loss sums) / N + the shards' regularizer terms; the gradient is
    formed on the shards (see `mpisgd.sandblaster.shard`). Loss sums are added with math.fsum, which is
    exact, so neither their order nor the worker that computed them changes the result.
    """

    def __init__(self, comm: MPI.Comm, *, shards: Sequence[int], layout: ShardLayout,
                 scheduler: PortionScheduler, num_samples: int, reply_timeout: float) -> None:
        self.comm = comm
        self.shards = tuple(shards)
        self.layout = layout
        self.scheduler = scheduler
        self.num_samples = num_samples
        self.reply_timeout = reply_timeout
        self.pass_id = 0
        self.counters: Counter = Counter()
        self.gradients_by_shard = [0] * len(self.shards)

    def _to_shards(self, command: tuple) -> None:
        for rank in self.shards:
            self.comm.send(command, dest=rank, tag=Tag.COMMAND)

    def _replies(self, kind: ShardCommand) -> list:
        replies = []
        for rank in self.shards:
            reply = receive_object(self.comm, source=rank, tag=Tag.REPLY, timeout=self.reply_timeout,
                                   what=f"'{kind.value}' reply")
            if reply[0] != kind:
                raise CommError(f"sandblaster: shard rank {rank} answered {reply[0]!r} to {kind.value!r}")
            replies.append(reply)
        return replies

    def run(self, program: Sequence[tuple]) -> list:
        """Run ``program`` on every shard; its scalars, the shards' partials combined in shard order."""
        self._to_shards((ShardCommand.RUN, list(program)))
        return combine_partials(program, [reply[1] for reply in self._replies(ShardCommand.RUN)])

    def evaluate(self, point: str, gradient: str, *, before: Sequence[tuple] = (),
                 then: Sequence[tuple] = ()) -> tuple:
        """One pass: the objective at vector ``point``, its gradient left in ``gradient`` on the shards.

        Portions a shard lacks at the end of the pass (a worker died between reporting a loss and
        delivering its gradient) are computed again, in the same pass, until every shard has them all.
        """
        self.pass_id += 1
        self._to_shards((ShardCommand.BEGIN, self.pass_id, point, list(before)))
        losses = self.scheduler.run_pass(self.pass_id, range(self.portions.count))
        while True:
            self._to_shards((ShardCommand.END, self.pass_id, gradient, list(then)))
            replies = self._replies(ShardCommand.END)
            missing = sorted({k for reply in replies for k in reply[2]})
            if not missing:
                break
            self.counters["missing_portions"] += len(missing)  # counted done, yet a shard lacks it: redo
            self.scheduler.run_pass(self.pass_id, missing)
        regularizer = 0.0
        for index, (_, _, _, (shard_regularizer, _, stats)) in enumerate(replies):
            regularizer += shard_regularizer
            self.gradients_by_shard[index] += stats["accepted"]
            self.counters["duplicate_gradients"] += stats["duplicates"]
            self.counters["stale_gradients"] += stats["stale"]
        self.counters["passes"] += 1
        objective = math.fsum(losses[k] for k in range(self.portions.count)) / self.num_samples + regularizer
        return objective, combine_partials(then, [reply[3][1] for reply in replies])

    @property
    def portions(self) -> Portions:
        """How a pass cuts the training set."""
        return self.scheduler.portions

    def gather_parameters(self) -> np.ndarray:
        """The whole parameter vector, once, for the final checkpoint."""
        return self.gather_vectors(["x"])["x"]

    def gather_vectors(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named vectors, whole (for a checkpoint: the parameters, or the whole L-BFGS state)."""
        self._to_shards((ShardCommand.FINAL, tuple(names)))
        whole = {name: np.empty(self.layout.num_params) for name in names}
        for shard, rank in enumerate(self.shards):
            piece = self.layout.shard_slice(shard)
            size = piece.stop - piece.start
            buffer = np.empty(size * len(names))
            if wait_for_message(self.comm, source=rank, tag=Tag.REPLY, timeout=self.reply_timeout) is None:
                raise CommError(f"shard rank {rank} did not send its slices of {', '.join(names)}")
            self.comm.Recv(buffer, source=rank, tag=Tag.REPLY)
            for index, name in enumerate(names):
                whole[name][piece] = buffer[index * size:(index + 1) * size]
        return whole

    def take_counters(self) -> dict[str, Any]:
        """Per-iteration counters of passes, portions and copies (and reset them)."""
        taken = self.scheduler.take_counters()
        for name in ("passes", "duplicate_gradients", "stale_gradients", "missing_portions"):
            taken[name] = self.counters[name]
        taken["accepted_gradients"] = list(self.gradients_by_shard)
        taken["portions_per_pass"] = self.portions.count
        self.counters = Counter()
        self.gradients_by_shard = [0] * len(self.shards)
        return taken

    def stop_shards(self, ending: Ending) -> None:
        """The run is over: every shard returns ``ending`` from its serving loop."""
        self._to_shards((ShardCommand.STOP, ending))
