"""The server side of one parameter shard: take what the workers pushed, check it, apply the update rule,
publish the new parameters and the version.

Why chunks and polls: on MPICH's network path (between nodes, or MPIR_CVAR_NOLOCAL=1 on one node) RMA
operations targeting this rank complete only while it is inside MPI. A server that computed a large
update without entering MPI stopped every worker (measured: 0 pushes during the computation). So the
take and the update run in chunks of ``chunk_elements`` and the server polls MPI (``Iprobe``) between
them; on the shared-memory path the polls cost a few microseconds and change nothing.

When nothing was pushed, :meth:`ShardServer.idle` polls and then either sleeps ``idle_sleep_s`` (where
every worker reaches the shard through shared memory, RMA needs no help from the server and a sleeping
server leaves the cores to the workers) or only yields the CPU (``idle_sleep_s=0``: where workers need
the server's progress, its reaction time is their latency; measured with 1M parameters on the network
path, 1 worker: 284 pull+push/s yielding vs 79/s sleeping 0.5 ms; on shared memory, 3 ranks on 2
cores: 980/s yielding vs 1221/s sleeping). :func:`idle_sleep_for` chooses.

A pushed sum holding NaN/Inf is never applied: the whole update is rejected, counted in the shard's
REJECTED counter, and the shard keeps its values. (Workers do not push non-finite gradients in the first
place; this is the server's own guard against anything that reaches the buffer anyway.)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
from mpi4py import MPI

from mpisgd import environment
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.downpour.rules import UpdateRule
from mpisgd.downpour.windows import (
    CLAIMS,
    CONTROL_SLOTS,
    PUSHES,
    REJECTED,
    VERSION,
    ParameterServerWindows,
    window_array,
)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 16
SHARED_MEMORY_IDLE_SLEEP_S = 0.0005
IDLE_SLEEP_VARIABLE = "MPISGD_PS_IDLE_SLEEP"


def idle_sleep_for(*, remote_workers: bool) -> float:
    """How long an idle server sleeps between polls: 0 (only yield the CPU) when some worker reaches it
    over the network (``remote_workers``: a worker on another node, or MPICH told to use its network
    path on one node with MPIR_CVAR_NOLOCAL=1), else 0.5 ms. MPISGD_PS_IDLE_SLEEP=<seconds> overrides."""
    override = environment.read(IDLE_SLEEP_VARIABLE)
    if override is not None:
        return float(override)
    return 0.0 if network_path(remote_workers=remote_workers) else SHARED_MEMORY_IDLE_SLEEP_S


def network_path(*, remote_workers: bool) -> bool:
    """True when some worker reaches this server over MPI's network path (a worker on another node,
    or MPIR_CVAR_NOLOCAL=1): its RMA operations then progress only while the server enters MPI."""
    return remote_workers or environment.mpi_uses_network_path()


def lower_cpu_priority(niceness: int) -> None:
    """Let workers that share this server's cores run first: a busy server then costs them no
    throughput (measured under MPICH: 0.75x -> 1.04x pull+push/s, 2 workers + 1 server on 2 cores;
    BENCHMARKS.md). Only where workers reach the server through shared memory: on the network path
    their RMA needs the server's polls, and a starved server stalls them (measured 0.11x).

    Linux's autogroup scheduling shares the CPU between sessions first. MPICH's hydra starts every rank
    in a session of its own, where ``os.nice`` alone does nothing, so the rank lowers its autogroup's
    niceness too. Open MPI's launcher starts the ranks in the launcher's session: there ``os.nice`` in
    the one shared autogroup starved the servers (2 workers, 2 servers at niceness 10 on 2 cores: 45
    updates/s per shard instead of 500, 60 pushes folded into one Adagrad update, the stated accuracy
    after 1300-1700 pushes instead of 140). So the rank first moves into a session of its own
    (:func:`lead_own_session`) and lowers that autogroup, as under hydra (the workers stay in the
    launcher's, so their figures still differ between the launchers: BENCHMARKS.md, section 11).
    """
    if niceness <= 0:
        return
    os.nice(niceness)
    if not lead_own_session():
        logger.info("--server-nice %d: this rank shares its launcher's session; its niceness counts only "
                    "within that session's autogroup", niceness)
        return
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(niceness))
    except OSError:  # no autogroup scheduling (or not Linux): os.nice was enough
        pass


def lead_own_session() -> bool:
    """Make this process the leader of a session (and so of an autogroup) of its own, unless it is one
    already; False where it must not or cannot.

    Only a process-group leader moves (Open MPI's launcher starts every rank as one, alone in its
    group): its group id is its pid again afterwards, so a launcher that signals or tracks the rank's
    group still reaches it. A process in someone else's group (a Slurm task: the step's tasks share
    one group) stays there. ``setsid`` is refused to a group leader, so it first joins its parent's
    group; where ``setsid`` still fails (another process in its group), it goes back to its own."""
    pid = os.getpid()
    if os.getsid(0) == pid:
        return True
    if os.getpgrp() != pid:
        return False
    try:
        os.setpgid(0, os.getpgid(os.getppid()))
    except OSError:  # a parent in another session, or no permission
        return False
    try:
        os.setsid()
    except OSError:
        os.setpgid(0, 0)  # back to leading its own group, with the processes still in it
        return False
    return True


class ShardServer:
    """Serve shard ``windows.shard`` with ``rule``.

    Args:
        windows: the job's windows; this rank must be a server.
        rule: the update rule, sized for this shard.
        chunk_elements: elements taken or updated between two polls of MPI.
        idle_sleep_s: see :meth:`idle` and :func:`idle_sleep_for`.
    """

    def __init__(self, windows: ParameterServerWindows, rule: UpdateRule, *,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 idle_sleep_s: float = SHARED_MEMORY_IDLE_SLEEP_S) -> None:
        if windows.shard is None:
            raise RuntimeError("ShardServer needs a server rank")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.windows = windows
        self.shard = windows.shard
        self.rank = windows.rank
        self.params = windows.local_params()
        self.size = len(self.params)
        if rule.size != self.size:
            raise ValueError(f"rule sized for {rule.size} elements, shard {self.shard} holds {self.size}")
        self.rule = rule
        self.chunk = int(chunk_elements)
        self.idle_sleep_s = float(idle_sleep_s)
        # a constant pause (first == longest): the server's reaction time is its workers' latency
        self.backoff = Backoff(first=self.idle_sleep_s, longest=self.idle_sleep_s, spin=self.idle_sleep_s == 0)
        self._zeros = np.zeros(min(self.chunk, max(self.size, 1)), dtype=np.float32)
        self.taken = np.zeros(self.size, dtype=np.float32)
        self._counters = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._ignored = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._one_update = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._one_update[VERSION] = 1
        self._one_rejection = np.zeros(CONTROL_SLOTS, dtype=np.int64)
        self._one_rejection[REJECTED] = 1
        self.pushes_seen = 0
        self.updates = 0
        self.rejected = 0

    def initialize(self, values: np.ndarray, *, claimed_steps: int = 0) -> None:
        """Before any worker access (the caller synchronizes after): set the shard's parameters and
        zero its accumulation buffer and counters (the step claims start at ``claimed_steps`` when
        resuming). Window memory from Win.Allocate starts undefined."""
        self.params[:] = values
        window_array(self.windows.grads[self.shard], np.float32)[:] = 0
        control = window_array(self.windows.control, np.int64)
        control[:] = 0
        control[CLAIMS] = claimed_steps
        for win in (self.windows.params, self.windows.grads[self.shard], self.windows.control):
            win.Sync()

    def poll(self) -> None:
        """Enter MPI briefly so RMA operations targeting this rank progress on the network path."""
        self.windows.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)

    def idle(self) -> None:
        """Nothing to do: poll MPI, then sleep ``idle_sleep_s`` (or just yield the CPU when it is 0)."""
        self.poll()
        self.backoff.idle()

    def serve_for(self, seconds: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        """Serve the shard for about ``seconds``: take and apply what is pushed, poll and pause (see
        :meth:`idle`) whenever nothing is."""
        deadline = clock() + seconds

        def served_enough() -> bool:
            while self.serve_once():
                if clock() >= deadline:
                    return True
            self.poll()
            return clock() >= deadline

        wait_until(served_enough, backoff=self.backoff, clock=clock)

    def counters(self) -> np.ndarray:
        """This shard's counters (VERSION, PUSHES, REJECTED), read atomically."""
        control = self.windows.control
        control.Get_accumulate([self._ignored, MPI.INT64_T], [self._counters, MPI.INT64_T], self.rank,
                               (0, CONTROL_SLOTS, MPI.INT64_T), op=MPI.NO_OP)
        control.Flush(self.rank)
        return self._counters.copy()

    def pending(self) -> bool:
        """Have workers pushed since the last take?"""
        return int(self.counters()[PUSHES]) != self.pushes_seen

    def take_gradients(self) -> np.ndarray:
        """Move the accumulation buffer into :attr:`taken` and zero it, chunk by chunk, each chunk
        atomically (Get_accumulate with REPLACE): a concurrent push lands either in this take or in
        the next, never lost."""
        self.pushes_seen = int(self.counters()[PUSHES])
        win = self.windows.grads[self.shard]
        for start in range(0, self.size, self.chunk):
            count = min(self.chunk, self.size - start)
            win.Get_accumulate([self._zeros[:count], MPI.FLOAT], [self.taken[start:start + count], MPI.FLOAT],
                               self.rank, (start, count, MPI.FLOAT), op=MPI.REPLACE)
            win.Flush(self.rank)
            self.poll()
        return self.taken

    def apply_update(self) -> bool:
        """Apply the rule to :attr:`taken`; returns False when there was nothing to apply or the sum was
        not finite (rejected, counted, the shard unchanged)."""
        if not self.taken.any():
            return False
        if not np.isfinite(self.taken).all():
            self.rejected += 1
            self._bump(self._one_rejection)
            return False
        for start in range(0, self.size, self.chunk):
            where = slice(start, min(start + self.chunk, self.size))
            self.rule.apply(self.params[where], self.taken[where], where)
            self.poll()
        self.windows.sync_local()
        self.updates += 1
        self._bump(self._one_update)
        return True

    def serve_once(self) -> bool:
        """Take and apply if anything was pushed; returns whether the shard changed."""
        if not self.pending():
            return False
        self.take_gradients()
        return self.apply_update()

    def drain(self) -> int:
        """Serve until no push is pending; returns the updates applied."""
        applied = 0
        while self.pending():
            self.take_gradients()
            applied += int(self.apply_update())
        return applied

    def _bump(self, increment: np.ndarray) -> None:
        control = self.windows.control
        control.Accumulate([increment, MPI.INT64_T], self.rank, (0, CONTROL_SLOTS, MPI.INT64_T), op=MPI.SUM)
        control.Flush(self.rank)
