"""A Sandblaster parameter-server shard rank: its slice of every optimizer vector, the vector commands
that run on it, and the per-pass sum of portion gradients.

The shard never sees a whole vector. The coordinator rank sends it programs of vector commands
(`mpisgd.sandblaster.vector_program.run_program`) and gets partial scalars back; between a BEGIN and an END
command (one evaluation of the objective, a *pass*) workers pull the pass's point from it and push
the gradient of each portion of the training set they computed.

Exactly once: a portion's gradient is accepted the first time it arrives in its pass; copies from
backup tasks, and anything from an earlier pass, are counted and dropped. Accepted gradients are
added in portion-id order (out-of-order ones wait in ``held`` until their turn), so the sum, and
with it the whole optimization, is bitwise the same whichever worker finished first. At END the
shard checks that every portion was added exactly once, and only then forms
``gradient = sum / N + weight_decay * mask * point`` (the mask is 1 on weights, 0 on biases).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from mpi4py import MPI

from mpisgd.errors import CommError
from mpisgd.faults import SignalAtStep
from mpisgd.sandblaster.protocol import Clock, Ending, ShardCommand, SignalForwarder, Tag, polite_backoff
from mpisgd.sandblaster.vector_program import run_program


@dataclass
class PassState:
    """One evaluation pass as this shard sees it."""

    pass_id: int
    point: np.ndarray  # a copy of the point: pending sends and the regularizer read it
    outgoing: np.ndarray  # [pass, 1, point...], sent to every worker that pulls this pass
    num_portions: int
    total: np.ndarray
    received: np.ndarray  # bool per portion: a copy was accepted
    contributions: np.ndarray  # int per portion: times its gradient went into ``total``
    held: dict = field(default_factory=dict)
    next_portion: int = 0
    duplicates: int = 0
    open: bool = True  # still accepting gradients (until its sum is formed)
    reported: bool = False  # counts already sent: an END repeated for a re-run reports zero

    @property
    def complete(self) -> bool:
        return self.next_portion == self.num_portions


class VectorShard:
    """Serve one shard until the coordinator says stop.

    Args:
        comm: the run's communicator.
        coordinator: rank of the coordinator (the rank that sends commands).
        initial: this shard's slice of the starting parameters (float64).
        decay_mask: 1.0 where the slice holds weights (penalized), 0.0 for biases.
        weight_decay: lambda of the (lambda/2)||W||^2 term.
        num_samples: N, the gradient sum is divided by it.
        num_portions: portions per pass.
        worker_timeout: how long END waits for a portion the coordinator counted as done before
            reporting it missing (it is then re-issued), so the shard never waits forever.
        clock: the time source of that wait; injectable for tests.
        resumed: this shard's slices of the vectors of a saved L-BFGS state (x, g, the history pairs),
            when resuming a preempted run (:mod:`mpisgd.sandblaster.state`).
        signal_fault: test-only (``MPISGD_TEST_SIGNAL_AT``): signal this rank at its n-th pass.
    """

    def __init__(self, comm: MPI.Comm, *, coordinator: int, initial: np.ndarray, decay_mask: np.ndarray,
                 weight_decay: float, num_samples: int, num_portions: int, worker_timeout: float,
                 clock: Clock = time.monotonic, resumed: Optional[dict] = None,
                 signal_fault: Optional[SignalAtStep] = None) -> None:
        self.comm = comm
        self.clock = clock
        self.coordinator = coordinator
        self.vectors = {"x": np.array(initial, dtype=np.float64)}
        self.vectors.update({name: np.array(values, dtype=np.float64) for name, values in (resumed or {}).items()})
        self.forward_signal = SignalForwarder(comm, coordinator)
        self.signal_fault = signal_fault  # MPISGD_TEST_SIGNAL_AT: this rank signals itself at its n-th pass
        self.passes = 0
        self.decay = weight_decay * np.asarray(decay_mask, dtype=np.float64)
        self.weight_decay = weight_decay
        self.num_samples = num_samples
        self.num_portions = num_portions
        self.worker_timeout = worker_timeout
        self.size = len(initial)
        self.current: PassState | None = None
        self.end_request: Optional[tuple] = None
        self.deferred_pulls: list = []
        self.sends: list = []  # (request, buffer) until complete
        self.stale = 0  # gradients of passes already over (slow copies)

    def serve(self) -> Ending:
        """Run commands until STOP; returns how the run ended (the STOP command's payload)."""
        backoff = polite_backoff()
        status = MPI.Status()
        while True:
            if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                self._try_end()
                self._reap_sends()
                self.forward_signal()
                backoff.idle()
                continue
            backoff.busy()
            tag, source = status.Get_tag(), status.Get_source()
            if tag == Tag.GRADIENT:
                buffer = np.empty(2 + self.size)
                self.comm.Recv(buffer, source=source, tag=Tag.GRADIENT)
                self._accept_gradient(buffer)
            elif tag == Tag.PULL:
                request = np.empty(1, dtype=np.int64)
                self.comm.Recv(request, source=source, tag=Tag.PULL)
                self._answer_pull(source, int(request[0]))
            elif tag == Tag.COMMAND:
                command = self.comm.recv(source=source, tag=Tag.COMMAND)
                if command[0] == ShardCommand.STOP:
                    self._finish_sends()
                    return Ending(*command[1])
                self._command(command)
            else:
                raise CommError(f"sandblaster shard: unexpected message tag {tag} from rank {source}")
            self._try_end()

    # ---- commands ------------------------------------------------------------------------------
    def _command(self, command: tuple) -> None:
        try:
            kind = ShardCommand(command[0])
        except ValueError:
            raise CommError(f"sandblaster shard: unknown command {command[0]!r}") from None
        if kind is ShardCommand.RUN:
            reply = (ShardCommand.RUN, run_program(self.vectors, command[1]))
            self.comm.send(reply, dest=self.coordinator, tag=Tag.REPLY)
        elif kind is ShardCommand.BEGIN:
            _, pass_id, point, before = command
            run_program(self.vectors, before)
            self._begin(pass_id, self.vectors[point])
        elif kind is ShardCommand.END:
            _, pass_id, gradient, then = command
            if self.current is None or self.current.pass_id != pass_id:
                raise CommError(f"sandblaster shard: 'end' of pass {pass_id} but pass "
                                f"{None if self.current is None else self.current.pass_id} is running")
            self.end_request = (gradient, then, self.clock() + self.worker_timeout)
        elif kind is ShardCommand.FINAL:
            names = command[1] if len(command) > 1 else ("x",)
            self.comm.Send(np.concatenate([self.vectors[name] for name in names]), dest=self.coordinator,
                           tag=Tag.REPLY)
        else:  # STOP is handled by the serving loop
            raise CommError(f"sandblaster shard: command {kind.value!r} out of place")

    def _begin(self, pass_id: int, point: np.ndarray) -> None:
        self.passes += 1
        if self.signal_fault is not None:
            self.signal_fault.strike(self.passes)
        point = point.copy()
        outgoing = np.concatenate([[float(pass_id), 1.0], point])
        k = self.num_portions
        self.current = PassState(pass_id, point, outgoing, k, np.zeros(self.size), np.zeros(k, dtype=bool),
                                 np.zeros(k, dtype=np.int64))
        waiting, self.deferred_pulls = self.deferred_pulls, []
        for worker, wanted in waiting:
            self._answer_pull(worker, wanted)

    def _try_end(self) -> None:
        """Answer END once every portion is in (or report the missing ones after the timeout)."""
        state = self.current
        if self.end_request is None or state is None:
            return
        gradient, then, deadline = self.end_request
        if not state.complete:
            if self.clock() < deadline:
                return
            missing = [int(k) for k in np.flatnonzero(~state.received)]
            self.end_request = None
            self.comm.send((ShardCommand.END, state.pass_id, missing, None), dest=self.coordinator, tag=Tag.REPLY)
            return
        wrong = np.flatnonzero(state.contributions != 1)
        if wrong.size:
            raise CommError(f"sandblaster shard: pass {state.pass_id}: portions {wrong.tolist()} were added "
                            f"{state.contributions[wrong].tolist()} times instead of exactly once")
        self.vectors[gradient] = state.total / self.num_samples + self.decay * state.point
        regularizer = 0.5 * float(np.dot(self.decay * state.point, state.point))
        partials = run_program(self.vectors, then)
        stats = {"accepted": 0 if state.reported else int(state.contributions.sum()),
                 "duplicates": state.duplicates, "stale": self.stale}
        self.stale, state.duplicates, state.reported = 0, 0, True
        state.open = False
        self.end_request = None
        self.comm.send((ShardCommand.END, state.pass_id, [], (regularizer, partials, stats)),
                       dest=self.coordinator, tag=Tag.REPLY)

    # ---- workers -------------------------------------------------------------------------------
    def _accept_gradient(self, buffer: np.ndarray) -> None:
        pass_id, portion = int(buffer[0]), int(buffer[1])
        state = self.current
        if state is None or pass_id != state.pass_id or not state.open:
            self.stale += 1
            return
        if state.received[portion]:
            state.duplicates += 1
            return
        state.received[portion] = True
        state.held[portion] = buffer[2:]
        while state.next_portion in state.held:  # add in portion-id order: deterministic sums
            state.total += state.held.pop(state.next_portion)
            state.contributions[state.next_portion] += 1
            state.next_portion += 1

    def _answer_pull(self, worker: int, wanted: int) -> None:
        state = self.current
        # the point of a pass is served until the next BEGIN, even once this shard has all of the
        # pass's portions: another shard may be missing one, and its re-run needs the point from all
        if state is not None and wanted == state.pass_id:
            buffer = state.outgoing
        elif state is None or wanted > state.pass_id:
            self.deferred_pulls.append((worker, wanted))  # the BEGIN of that pass is still on its way
            return
        else:
            buffer = np.array([float(wanted), 0.0])  # that pass is over: the worker drops the portion
        self.sends.append((self.comm.Isend(buffer, dest=worker, tag=Tag.PARAMETERS), buffer))

    def _reap_sends(self) -> None:
        if self.sends:
            self.sends = [(request, buffer) for request, buffer in self.sends if not request.Test()]

    def _finish_sends(self) -> None:
        """Sends still pending at the end go to a worker that is gone or stuck: they are left to MPI
        with their buffers kept alive (such a job ends with MPI_Abort, see `mpisgd.sandblaster.job`)."""
        self._reap_sends()
        _ABANDONED_SENDS.extend(self.sends)
        self.sends = []


_ABANDONED_SENDS: list = []
