"""The background coordinator: owns every message of mpisgd.horovod, as Horovod's background thread does.

User threads submit operations and get handles; a *cycle* sends this rank's newly submitted
operations to every rank (one nonblocking allgather of a small fixed-size slot per rank; a second,
variable-size one only when some rank's message does not fit), lets the identical negotiators
decide, and runs the agreed responses in the agreed order, fused. The background thread runs cycles
while nobody waits (asynchronous progress during backward), pausing HOROVOD_CYCLE_TIME between idle
ones; a thread that waits in ``synchronize`` runs the cycles itself (no hand-off between threads on
the latency path). Cycles are serialized by one lock, so MPI sees one caller at a time. Waits are
nonblocking tests with a polite backoff under the deadline of the global process set's collective
watchdog (:mod:`mpisgd.comm.watchdog`): ``shutdown`` always gets through, and a rank that stops
answering (frozen, dead) fails every operation on every live rank with a HorovodInternalError naming
it, after ``MPISGD_COLLECTIVE_TIMEOUT``. A cycle that repeats the last one's small allreduce sends it
with its own negotiation, in one message (:mod:`~mpisgd.horovod.torch.speculation`); a synchronous
``hvd.allreduce`` that can travel so is that cycle, run by its own thread (:meth:`allreduce_alone`).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from mpi4py import MPI

from mpisgd.comm import Communicator
from mpisgd.comm.objects import allreduce_numbers
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.horovod.torch.basics import HorovodInternalError, Settings
from mpisgd.horovod.torch.executor import Executor, Operation
from mpisgd.horovod.torch.negotiation import Message, Negotiator, fusion_plan
from mpisgd.horovod.torch.process_sets import ProcessSetTable
from mpisgd.horovod.torch.speculation import ALL_IDLE, FAILED, PARTIAL, Carry, Speculation

logger = logging.getLogger(__name__)

SLOT_BYTES = 2048  # per rank and cycle; larger messages take a second, variable-size round
HEADER = 8
IDLE_DOUBLINGS = 4  # idle oversubscribed ranks pause up to 16 cycle times
GATHER_CYCLES = 8  # the longest a background cycle waits for a stream of submissions to pause
SPIN_S = 2e-4  # poll without pausing this long first: a small collective completes within it
COOLDOWN_CYCLES = 2  # negotiated cycles without speculation after a failed one (they agree on the failure)
SHUT_DOWN = "Horovod has been shut down. This was caused by an exception on one of the ranks or an attempt to " \
            "run a collective after hvd.shutdown()."


class Coordinator:
    """Negotiates and runs the collectives of one Horovod runtime."""

    def __init__(self, communicator: Communicator, process_sets: ProcessSetTable, settings: Settings) -> None:
        with communicator.watchdog.blocking("horovod init: duplicate the coordinator's communicator"):
            self.comm = communicator.mpi.Dup()  # the coordinator's own: nothing else sends on it
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.settings = settings
        self.negotiator = Negotiator(self.size, cache_capacity=settings.cache_capacity,
                                     stall_check_s=settings.stall_check_s, stall_shutdown_s=settings.stall_shutdown_s)
        self.executor = Executor(self.rank, process_sets, settings.fusion_threshold_bytes)
        # the global set's watchdog: every wait of the negotiation has its deadline (and names who is missing)
        everyone = process_sets.get(0).communicator
        assert everyone is not None  # every process is a member of the global set
        self.watchdog = everyone.watchdog
        # on unless switched off ("auto" is on: 4 ranks on 2 cores, a loop of small allreduces took 0.08 ms
        # a call speculated, 0.8 ms negotiated). A payload travelling apart speculates under "auto" only where
        # no node's ranks outnumber its cores: there a training step's gradients rarely fill the layout
        # (the background cycle takes part of them), and each failed message cost more than it saved (4
        # ranks on 2 cores: 20.5 ms a step so, 18.0 negotiated). The choices must be the same on every rank.
        wanted = settings.speculation != "off"
        apart = settings.speculation == "on" or not communicator.oversubscribed
        agreed = allreduce_numbers(everyone, [int(wanted), int(wanted and apart)], "min", name="horovod speculation")
        self._speculating = bool(agreed[0])
        self.speculation = Speculation(self.size, apart=bool(agreed[1]))
        self._cooldown = 0
        self._lock = threading.Lock()  # queue, in_flight, flags
        self._wake = threading.Condition(self._lock)
        self._cycle_lock = threading.Lock()  # one cycle at a time, whichever thread runs it
        self._queue: list = []
        self._in_flight: dict = {}
        self._drivers = 0
        self._last_driven = 0.0
        self._idle_cycles = 0
        self._woken = False
        self._first_queued = self._last_submit = 0.0
        self._stop_requested = False
        self.stopped = False
        self._join: Optional[Operation] = None
        self._send = np.zeros(SLOT_BYTES, dtype=np.uint8)
        self._recv = np.zeros(SLOT_BYTES * self.size, dtype=np.uint8)
        self._polite = communicator.oversubscribed
        self._thread = threading.Thread(target=self._background, name="mpisgd-horovod", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- user threads ---------------------------------------------------------------------
    def submit(self, operations: list) -> None:
        """Queue operations for the next cycle; ValueError if a name is still in flight on this rank."""
        with self._lock:
            if self.stopped or self._stop_requested:
                raise HorovodInternalError(SHUT_DOWN)
            keys = [op.key for op in operations]
            busy = [k for k in keys if k in self._in_flight]
            if not busy and len(set(keys)) < len(keys):  # a name twice in one call (counted once: 100 in a group)
                busy = sorted(k for k, n in Counter(keys).items() if n > 1)
            if busy:
                raise ValueError(f"Requested to collective on a tensor with the same name as another tensor that "
                                 f"is currently being processed: {busy[0][1]!r}. If you want to request another "
                                 "collective with the same name, synchronize the first one before.")
            for op in operations:
                self._in_flight[op.key] = op
            now = time.monotonic()
            if not self._queue:
                self._first_queued = now
            self._last_submit = now
            self._queue.extend(operations)
            if self._idle_cycles:
                self._woken = True
                self._wake.notify()
            # no wake-up: the next cycle (within HOROVOD_CYCLE_TIME, or at once when a thread waits in
            # synchronize) takes everything queued meanwhile, so that tensors produced close together
            # during backward travel fused, as in Horovod

    def join(self, operation: Operation) -> None:
        with self._lock:
            if self.stopped or self._stop_requested:
                raise HorovodInternalError(SHUT_DOWN)
            self._join = operation
            self._wake.notify()

    @contextmanager
    def driving(self) -> Iterator[None]:
        """While inside, this thread runs the cycles for what it submits and waits for (``wait``); the
        background thread stands back."""
        with self._lock:
            self._drivers += 1
        try:
            yield
        finally:
            with self._lock:
                self._drivers -= 1
                self._last_driven = time.monotonic()

    def wait(self, operations: list) -> None:
        """Run cycles on this thread until every operation completed (or Horovod stopped)."""
        with self.driving():
            while not all(op.done for op in operations) and not self.stopped:
                with self._cycle_lock:
                    if not all(op.done for op in operations) and not self.stopped:
                        try:
                            self._cycle(urgent=True)
                        except Exception as exc:
                            self._broken(exc)
                        except BaseException as exc:  # Ctrl-C, SystemExit: fail what is pending, then go on
                            self._broken(exc)
                            raise
        # stopped: the thread that saw the shutdown fails what is left, at once
        wait_until(lambda: all(op.done for op in operations), what="the shutdown of the coordinator")

    def allreduce_alone(self, tensor: torch.Tensor, carry: Carry, in_place: bool) -> Optional[torch.Tensor]:
        """A synchronous small allreduce as this thread's own cycle, one speculative message, where this
        rank's next cycle would carry it alone (the facts :meth:`_speculate` checks, and it fills the
        layout): the whole call is then one MPI all-reduce and two copies. Its result when it is done;
        None when it was not sent, or the cycle failed as a speculation does (the next cycles
        negotiate): submit it then."""
        if not self._carries(carry):  # a cheap look first; checked again under the cycle lock
            return None
        self._last_driven = time.monotonic()  # the background thread stays out of a loop of such calls
        if not self._cycle_lock.acquire(blocking=False):
            return None
        try:
            # what every cycle writes (cooldown, layout) is written under the cycle lock: exact here; the
            # queue and join flags other threads set under self._lock: a late one waits for the next cycle
            if not self._carries(carry) or self._queue or self._in_flight or self._join is not None \
                    or self._stop_requested or self.stopped or self.negotiator.pending or self.negotiator.joined:
                return None
            try:
                prepared = self.speculation.prepare(self.comm, tensor, carry, in_place)
            except Exception:  # nothing sent yet: the general path says what is wrong
                return None
            try:
                ended, out = self.speculation.carry_alone(self.comm, tensor, carry, prepared, self.watchdog)
            except Exception as exc:
                self._broken(exc)
                raise HorovodInternalError(f"coordinator failed: {type(exc).__name__}: {exc}") from exc
            except BaseException as exc:  # Ctrl-C, SystemExit: fail what is pending, then go on
                self._broken(exc)
                raise
            self._idle_cycles = 0
            if ended == FAILED:
                self._cooldown = COOLDOWN_CYCLES
            return out
        finally:
            self._cycle_lock.release()

    def _carries(self, carry: Carry) -> bool:
        """Whether this rank's next cycle speculates with ``carry``'s layout."""
        layout = self.speculation.layout
        return self._speculating and not self._cooldown and layout is not None and (
            carry.layout is layout or carry.layout == layout)

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every rank to stop (through the next cycle) and wait for this rank's thread."""
        with self._lock:
            self._stop_requested = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("mpisgd.horovod: the coordinator did not stop within %g s; leaving it", timeout)
            return
        if not MPI.Is_finalized():
            self.speculation.free()
            self.comm.Free()

    # ---- the background thread ------------------------------------------------------------------
    def _background(self) -> None:
        try:
            while not self.stopped:
                with self._lock:  # one cycle per HOROVOD_CYCLE_TIME: what is queued meanwhile travels fused
                    if not self._stop_requested and self._join is None:
                        self._wake.wait(self.settings.cycle_time_s * (1 << min(self._idle_cycles, IDLE_DOUBLINGS)))
                    if self._woken:  # a submission ended a long idle pause: gather for one cycle time
                        self._woken, self._idle_cycles = False, 0
                        continue
                    # a thread that drives calls after calls (a loop of synchronous collectives) keeps the
                    # cycles to itself: a background cycle slipped in between would miss its speculation
                    if self._drivers or self._gathering() or (self._recently_driven() and not self._stop_requested):
                        continue
                with self._cycle_lock:
                    if not self.stopped and (self._stop_requested or not self._recently_driven()):
                        self._cycle()
        except BaseException as exc:
            self._broken(exc)

    def _recently_driven(self) -> bool:
        return time.monotonic() - self._last_driven < self.settings.cycle_time_s

    def _broken(self, exc: BaseException) -> None:
        """A cycle failed (a peer stopped answering: CollectiveTimeout; or a bug): no waiter may hang, so
        every operation fails with the reason and the coordinator stops."""
        logger.error("mpisgd.horovod coordinator failed: %s: %s", type(exc).__name__, exc)
        self._fail_all(HorovodInternalError(f"coordinator failed: {type(exc).__name__}: {exc}"))
        self.stopped = True

    def _gathering(self) -> bool:
        """Operations are still arriving (a backward pass submitting gradients): hold the cycle, up to
        GATHER_CYCLES cycle times, so that they travel in one fused negotiation rather than in several,
        each waiting for every rank (a thread that synchronizes runs the cycle at once anyway)."""
        if not self._queue or self._stop_requested:
            return False
        now, cycle = time.monotonic(), self.settings.cycle_time_s
        return now - self._last_submit < cycle and now - self._first_queued < GATHER_CYCLES * cycle

    def _cycle(self, urgent: bool = False) -> None:
        """One negotiation and what it decided. ``urgent``: a thread waits for the result, so the
        negotiation is polled without pausing at first; otherwise politely from the start."""
        with self._lock:
            submitted, self._queue = self._queue, []
            urgent = urgent or bool(submitted) or bool(self._in_flight)
            shutdown = self._stop_requested
            joining = self._join is not None
            alone = len(self._in_flight) == len(submitted)  # nothing else of this rank's in flight
        if self._speculate(submitted, alone and not shutdown and not joining, urgent):
            return
        entries = tuple(self.negotiator.encode(op.name, op.signature, op.extra) for op in submitted)
        message = Message(shutdown, joining, time.monotonic(), entries)
        outcome = self.negotiator.step(self._exchange(message, urgent))
        self.speculation.learn(outcome.responses, outcome.traffic)
        self._cooldown = max(0, self._cooldown - 1)
        # oversubscribed ranks (more than cores) pause longer and longer while every rank is idle: idle
        # cycles of four ranks on two cores took the CPU their training needed
        self._idle_cycles = 0 if outcome.traffic or not self._polite else self._idle_cycles + 1
        if self.rank == 0:
            for warning in outcome.warnings:
                logger.warning("%s", warning)
        with self._lock:
            in_flight = dict(self._in_flight)
        plan = fusion_plan(outcome.responses, self.settings.fusion_threshold_bytes,
                           lambda r: _nbytes(in_flight.get(r.key)))
        for batch in plan:
            self.executor.run(batch, in_flight)
            with self._lock:
                for response in batch:
                    self._in_flight.pop(response.key, None)
        if outcome.last_joined is not None:
            with self._lock:
                join, self._join = self._join, None
            if join is not None:
                join.complete(outcome.last_joined)
        if outcome.shutdown:
            self.stopped = True
            self._fail_all(HorovodInternalError(SHUT_DOWN))

    def _speculate(self, submitted: list, may_carry: bool, urgent: bool) -> bool:
        """The cycle's speculative message, where every rank sends one (the same facts everywhere: a
        layout, nothing pending or joined in the negotiation, no recent failure); True when it did
        the cycle's work."""
        if (not self._speculating or self.speculation.layout is None or self.negotiator.pending
                or self.negotiator.joined or self._cooldown):
            return False
        carried = submitted if may_carry and self.speculation.fits(submitted) else None
        # a control block alone stands for the negotiation (it waits for the peers' computation): it
        # waits as the negotiation does where ranks outnumber cores
        what = "speculative control" if self.speculation.layout.apart else "speculative"
        ended = self.speculation.exchange(self.comm, carried, may_carry and not submitted,
                                          lambda start: self._complete(start, urgent, what), self.executor.run_carried)
        if ended == FAILED:
            self._cooldown = COOLDOWN_CYCLES
            return False
        if ended == ALL_IDLE:  # what the negotiation of an empty cycle would have done
            self.speculation.learn([], traffic=False)
            self._idle_cycles = self._idle_cycles + 1 if self._polite else 0
            return True
        self._idle_cycles = 0
        if ended == PARTIAL:  # peers still computing: this rank's operations wait for the next cycle
            with self._lock:
                self._queue[:0] = submitted
            return True
        with self._lock:
            for op in submitted:
                self._in_flight.pop(op.key, None)
        return True

    def _fail_all(self, error: HorovodInternalError) -> None:
        with self._lock:
            left = list(self._in_flight.values()) + ([self._join] if self._join is not None else [])
            self._in_flight.clear()
            self._queue, self._join = [], None
            self._wake.notify_all()
        for op in left:
            if not op.done:
                op.fail(error)

    # ---- the exchange -------------------------------------------------------------------
    def _exchange(self, message: Message, urgent: bool) -> list:
        """Every rank's message of this cycle, in rank order."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        length = len(payload)
        self._send[:HEADER] = np.frombuffer(np.int64(length).tobytes(), dtype=np.uint8)
        if length <= SLOT_BYTES - HEADER:
            self._send[HEADER:HEADER + length] = np.frombuffer(payload, dtype=np.uint8)
        self._complete(lambda: self.comm.Iallgather(self._send, self._recv), urgent, "negotiation")
        slots = self._recv.reshape(self.size, SLOT_BYTES)
        lengths = [int(np.frombuffer(slots[r, :HEADER].tobytes(), dtype=np.int64)[0]) for r in range(self.size)]
        if max(lengths) <= SLOT_BYTES - HEADER:
            return [pickle.loads(slots[r, HEADER:HEADER + n].tobytes()) for r, n in enumerate(lengths)]
        # a second round carries the messages that did not fit their slot
        large = [n if n > SLOT_BYTES - HEADER else 0 for n in lengths]
        received = np.empty(sum(large), dtype=np.uint8)
        own = np.frombuffer(payload, dtype=np.uint8) if large[self.rank] else np.empty(0, dtype=np.uint8)
        offsets = [sum(large[:r]) for r in range(self.size)]
        self._complete(lambda: self.comm.Iallgatherv(own, [received, large, offsets, MPI.BYTE]), urgent, "negotiation")
        return [pickle.loads(received[offsets[r]:offsets[r] + n].tobytes()) if large[r]
                else pickle.loads(slots[r, HEADER:HEADER + n].tobytes()) for r, n in enumerate(lengths)]

    def _complete(self, start: Callable[[], MPI.Request], urgent: bool, what: str) -> None:
        """Wait under the watchdog's deadline (a rank frozen mid-job must not hang the rest): a user
        thread as mpisgd's collectives do; the background thread polls without pausing for a moment when
        urgent (a small collective needs microseconds), then backs off politely (it shares the core
        with the training)."""
        self.watchdog.enter(f"horovod {what}")  # on every rank, for every message: the board's count
        request = start()  # after the entry, which refuses a communicator with a collective left unfinished
        if urgent and threading.current_thread() is not self._thread and (what == "speculative" or not self._polite):
            # a user thread waits for its result as mpisgd's collectives do (inline polls, a spin that
            # yields the core, then sleeps): with sleeps from the first miss, 4 ranks on 2 cores took
            # 7.4 ms a speculated small allreduce (0.4 ms so). Where ranks outnumber cores a negotiation
            # still backs off politely: it mostly waits for a peer's computation, which needs the core
            # (a training step at p=4 on 2 cores: 67 steps/s so, 37 spinning).
            self.watchdog.wait([request])
            return
        deadline = time.perf_counter() + (SPIN_S if urgent and not self._polite else 0.0)
        while time.perf_counter() < deadline:
            if request.Test():
                return
        backoff = Backoff(first=2e-5, longest=1e-3, spin=False)
        if self.watchdog.settings.enabled:
            self.watchdog.wait_for(request.Test, backoff=backoff)
        else:
            wait_until(request.Test, what="the coordinator's negotiation", backoff=backoff)

def _nbytes(op: Optional[Operation]) -> int:
    return 0 if op is None else op.tensor.numel() * op.tensor.element_size()
