"""The collective watchdog: no rank waits forever in a collective, and a stalled one says who is missing.

Python cannot act while a rank sits in a blocking MPI call, so every collective mpisgd runs is
nonblocking (``Iallreduce``, ``Ibcast``, ``Isend``/``Irecv``) and waited on by :meth:`Watchdog.wait`:
a few inline ``Test`` calls (where a small collective completes), then the one wait loop of
:mod:`mpisgd.comm.wait`: a short spin, then sleeps of at most 1 ms.

Who has not arrived is known without the missing rank's help (as Horovod's stall inspector knows it):
each rank publishes, on entry to every collective, its sequence number and step in an *arrival board*,
a few int64 per rank in an MPI RMA window (``Win.Allocate`` + one ``Lock_all(MODE_NOCHECK)`` epoch). On
entry a rank only stores into its own memory (nanoseconds, no MPI call); only a wait that has lasted a
while reads the others' slots (``Rget`` + ``Test``, bounded in time). On one node MPICH serves such a
``Get`` from shared memory without the target's help, so a rank stopped with SIGSTOP can still be read
(and was, in tests, even with ``MPIR_CVAR_NOLOCAL=1``); a rank whose slot cannot be read is reported as
not answering. Waiting ranks also beat a heartbeat in their slot, so a rank stopped *inside* a
collective (it arrived, then froze) shows as the one whose heartbeat stands still.

Timeline of one wait (``waited`` restarts at every wait, so a collective that progresses, however
slowly, is never declared dead): after ``stall_warning`` seconds (and every ``stall_warning`` after)
every waiting rank logs which ranks have not arrived, at which collective and step; after ``timeout``
seconds it marks itself as having given up, waits a moment for the other live ranks to give up too
(so that every live rank reports, before a launcher ends the job), and raises
:class:`~mpisgd.errors.CollectiveTimeout`. ``timeout=0`` turns the watchdog off: waits then block
in MPI (``MPI_Waitall``) as a plain MPI program's do.

A few collectives have no nonblocking form in MPI (splitting or duplicating a communicator, creating
an RMA window): :mod:`mpisgd.comm.blocking` puts them under the same deadline from a timer thread.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, cast

from mpisgd import environment
from mpisgd.comm.blocking import blocking_collective
from mpisgd.comm.wait import Backoff, wait_until
from mpisgd.errors import CollectiveTimeout, ConfigError, UnfinishedCollective

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_STALL_WARNING_S = 60.0
#: a wait spins (polls without sleeping) this long: a collective still waiting after it waits for a
#: peer's computation, not for the wire, and then sleeps of at most 1 ms cost < 1 ms of latency
SPIN_S = 0.02
# Test() calls before the general wait loop: a small collective completes within them (4 KiB at p = 2:
# ~10 us of ~0.3 us calls); the loop's per-poll clock reads and sched_yield cost 2 us a call there.
# Bounded by count, so it adds no wait without a deadline (64 calls are microseconds).
FAST_POLLS = 64
_FAST_POLLS = range(FAST_POLLS)
FIRST_SLEEP_S = 1e-4
LONGEST_SLEEP_S = 1e-3
#: how long one read of the arrival board may take; a rank whose slot is not read by then is "not answering"
BOARD_READ_S = 1.0
#: at the timeout, how long a rank waits for the other live ranks to give up as well
AGREE_S = 5.0
NO_STEP = -1

_cli_defaults: dict[str, Optional[float]] = {"timeout": None, "stall_warning": None}


def set_defaults(*, timeout: Optional[float] = None, stall_warning: Optional[float] = None) -> None:
    """Process-wide defaults for communicators created from now on (the ``mpisgd`` command's
    ``--collective-timeout`` and ``--stall-warning``); they take precedence over the environment."""
    _cli_defaults["timeout"], _cli_defaults["stall_warning"] = timeout, stall_warning


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class WatchdogSettings:
    """``timeout``: seconds without progress before CollectiveTimeout (0: off, waits block in MPI);
    ``stall_warning``: seconds before the first warning naming who is missing (0: no warnings)."""

    timeout: float = DEFAULT_TIMEOUT_S
    stall_warning: float = DEFAULT_STALL_WARNING_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "timeout", _seconds("collective timeout", self.timeout))
        object.__setattr__(self, "stall_warning", _seconds("stall warning", self.stall_warning))

    @classmethod
    def resolve(cls, timeout: Optional[float] = None, stall_warning: Optional[float] = None) -> WatchdogSettings:
        """Explicit values, else the command's flags (:func:`set_defaults`), else ``MPISGD_COLLECTIVE_TIMEOUT``
        and ``MPISGD_STALL_WARNING``, else 600 s and 60 s."""
        def pick(given: Optional[float], key: str, variable: str, default: float) -> float:
            for value in (given, _cli_defaults[key], environment.read(variable)):
                if value is not None:
                    return float(value)
            return default
        return cls(pick(timeout, "timeout", "MPISGD_COLLECTIVE_TIMEOUT", DEFAULT_TIMEOUT_S),
                   pick(stall_warning, "stall_warning", "MPISGD_STALL_WARNING", DEFAULT_STALL_WARNING_S))

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    @property
    def beat_s(self) -> float:
        """How often a long wait beats its heartbeat (and first looks at the board)."""
        horizon = min(s for s in (self.stall_warning, self.timeout) if s > 0) if self.enabled else 1.0
        return max(0.005, min(1.0, horizon / 8))


def world_ranks(comm: Any) -> list[int]:
    """``comm``'s ranks as COMM_WORLD ranks: what launchers, logs and users call them (local, no message)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD.Get_group()
    group = comm.Get_group()
    try:
        translated = MPI.Group.Translate_ranks(group, list(range(comm.Get_size())), world)
    finally:
        group.Free()
        world.Free()
    return [r if r != MPI.UNDEFINED else i for i, r in enumerate(translated)]


class Slot(NamedTuple):
    """What one rank publishes in the arrival board."""

    sequence: int  # collectives this rank has entered on this communicator
    step: int  # the training step it was told about (NO_STEP: none)
    heartbeat: int  # bumped while it waits long
    gave_up: int  # the sequence number at which it timed out (0: never)


FIELDS = len(Slot._fields)


class ArrivalBoard:
    """The RMA window of :class:`Slot` s, one per rank of ``comm`` (collective to create and to free)."""

    def __init__(self, comm: Any) -> None:
        import numpy as np
        from mpi4py import MPI

        self._MPI, self._np = MPI, np
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.win = MPI.Win.Allocate(FIELDS * 8, 8, comm=comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.mine: Any = np.frombuffer(cast(Any, self.win.tomemory()), dtype=np.int64, count=FIELDS)
        self.mine[:] = 0
        self.mine[1] = NO_STEP
        self._inflight: dict[int, tuple[Any, Any]] = {}  # reads a frozen target has not answered yet
        self.world_ranks = world_ranks(comm)
        _live_boards.append(self)

    def publish(self, sequence: int, step: int) -> None:
        self.mine[0], self.mine[1] = sequence, step

    def beat(self) -> None:
        self.mine[2] += 1

    def give_up(self, sequence: int) -> None:
        self.mine[3] = sequence

    def read(self, within: float, clock: Callable[[], float] = time.monotonic) -> dict[int, Optional[Slot]]:
        """Every rank's slot; None for ranks whose slot did not arrive within ``within`` seconds."""
        MPI, np = self._MPI, self._np
        self.win.Sync()  # this rank's own stores, visible to the others' reads
        for rank in range(self.size):
            if rank != self.rank and rank not in self._inflight:
                buf = np.zeros(FIELDS, dtype=np.int64)
                self._inflight[rank] = (self.win.Rget(buf, rank, (0, FIELDS, MPI.INT64_T)), buf)
        slots: dict[int, Optional[Slot]] = {self.rank: Slot(*(int(v) for v in self.mine))}
        deadline = clock() + within
        while True:
            for rank, (request, buf) in list(self._inflight.items()):
                if request.Test():
                    slots[rank] = Slot(*(int(v) for v in buf))
                    del self._inflight[rank]
            if not self._inflight or clock() >= deadline:
                break
            time.sleep(1e-4)
        return {rank: slots.get(rank) for rank in range(self.size)}

    def free(self) -> None:
        """Collective (MPI_Win_free synchronizes); a second call does nothing (exit handlers may race)."""
        if getattr(self, "_freed", False):
            return
        self._freed = True
        if self in _live_boards:
            _live_boards.remove(self)
        self.win.Unlock_all()
        self.win.Free()


#: boards not freed yet, in creation order (the same on every rank); freed at exit, before MPI_Finalize, since
#: an RMA window left to MPI_Finalize makes UCX print warnings, unless a collective timed out: the ranks it
#: waited for would never join the (collective) free
_live_boards: list[ArrivalBoard] = []
_timed_out = False


def mark_timed_out() -> None:
    """Say that a collective of this process timed out or was left unfinished (see :func:`timed_out`)."""
    global _timed_out
    _timed_out = True


def timed_out() -> bool:
    """Whether a collective of this process has timed out or was left unfinished (cleanup code then must not
    wait for peers)."""
    return _timed_out


@atexit.register
def _free_boards_at_exit() -> None:
    from mpi4py import MPI

    if _timed_out or MPI.Is_finalized() or not MPI.Is_initialized() or not _live_boards:
        return
    with blocking_collective("exit: free the arrival boards"):
        for board in list(_live_boards):
            board.free()


class Diagnosis(NamedTuple):
    """Who a stalled collective waits for (ranks of the communicator)."""

    not_arrived: dict  # rank -> its Slot (it is at an earlier collective)
    silent: list  # entered this collective, but its heartbeat stood still between two reads
    not_answering: list  # its slot could not be read


def diagnose(sequence: int, me: int, now: dict, before: Optional[dict]) -> Diagnosis:
    """Compare every rank's slot with this rank's ``sequence`` (pure: unit-tested without MPI)."""
    not_arrived, silent, not_answering = {}, [], []
    for rank, slot in sorted(now.items()):
        if rank == me:
            continue
        if slot is None:
            not_answering.append(rank)
        elif slot.sequence < sequence:
            not_arrived[rank] = slot
        elif (slot.sequence == sequence and not slot.gave_up and before is not None
              and before.get(rank) is not None and before[rank] == slot):
            silent.append(rank)
    return Diagnosis(not_arrived, silent, not_answering)


def _names(ranks: list) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


class Watchdog:
    """The deadline and stall reports of one communicator's collectives (see the module docstring).

    Args:
        rank, size: this rank and the communicator's size.
        settings: timeout and stall warning.
        board: the :class:`ArrivalBoard` (None: size 1, or no window could be made; then reports say
            "unknown" where they would name ranks).
        clock, sleep: injectable, for tests of the timeline without MPI.
        world_ranks: how ranks are named in messages (default: the board's COMM_WORLD ranks).
    """

    def __init__(self, rank: int, size: int, settings: WatchdogSettings, *, board: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, world_ranks: Optional[list] = None) -> None:
        self.rank, self.size, self.settings, self.board = rank, size, settings, board
        self.clock, self.sleep = clock, sleep
        self.world_ranks = world_ranks or getattr(board, "world_ranks", None) or list(range(size))
        self.sequence = 0
        self.name = ""
        self.step: Optional[int] = None  # set by whoever knows the training step (DistributedOptimizer)
        self.unfinished: Optional[str] = None  # the collective whose wait an exception ended (it may be active)

    def attach(self, board: Any) -> None:
        """Use ``board`` from now on (a communicator's start-up is watched before its board exists)."""
        self.board = board
        self.world_ranks = getattr(board, "world_ranks", None) or self.world_ranks

    # ---- the fast path ----------------------------------------------------------------------------
    def enter(self, name: str) -> None:
        """A collective named ``name`` starts on this rank: publish its sequence number (a local store).
        Refused (:class:`~mpisgd.errors.UnfinishedCollective`) once a collective was left unfinished."""
        if self.unfinished is not None:
            raise UnfinishedCollective(f"{name!r} cannot start on rank {self.world_ranks[self.rank]}: "
                                       f"{self.unfinished}")
        self.sequence += 1
        self.name = name
        if self.board is not None:
            self.board.publish(self.sequence, NO_STEP if self.step is None else self.step)

    def wait(self, requests: list) -> None:
        """Complete MPI ``requests`` of the current collective, under the deadline."""
        if not requests:
            return
        if self.settings.timeout <= 0:  # not enabled (the property costs a call on this fast path)
            requests[0].Waitall(requests)
            return
        if len(requests) == 1:
            done: Callable[[], bool] = requests[0].Test
        else:
            def done() -> bool:
                return requests[0].Testall(requests)
        self._poll_then_wait(done)

    def start_and_wait(self, name: str, request: Any) -> None:
        """:meth:`enter` ``name``, start the persistent MPI ``request`` and :meth:`wait` for it: a repeated
        small collective's whole call, with the fewest Python calls (its latency is a few microseconds)."""
        self.enter(name)
        if self.settings.timeout <= 0:
            request.Start()
            request.Wait()
            return
        self._poll_then_wait(request.Test, start=request.Start)

    def _poll_then_wait(self, done: Callable[[], bool], start: Optional[Callable[[], Any]] = None) -> None:
        """``start()`` (where given), a few inline polls (where a small collective completes), then
        :meth:`wait_for`; an interrupt anywhere after the start leaves the collective unfinished."""
        try:
            if start is not None:
                start()
            for _ in _FAST_POLLS:
                if done():
                    return
            self.wait_for(done)
        except (CollectiveTimeout, KeyboardInterrupt) as error:  # also one that struck in the inline polls
            self.leave_unfinished(error)
            raise

    def wait_for(self, ready: Callable[[], Any], *, backoff: Optional[Backoff] = None) -> Any:
        """Poll ``ready()`` (nonblocking) until it is true, warning and timing out as the settings say
        (``backoff``: how to pause between polls, default a 20 ms spin, then sleeps of at most 1 ms). A
        timeout or an interrupt leaves the collective unfinished (:meth:`leave_unfinished`)."""
        backoff = backoff or Backoff(first=FIRST_SLEEP_S, longest=LONGEST_SLEEP_S, spin_for=SPIN_S,
                                     clock=self.clock, sleep=self.sleep)
        try:
            return wait_until(ready, backoff=backoff, clock=self.clock, watch=_StalledWait(self))
        except (CollectiveTimeout, KeyboardInterrupt) as error:
            self.leave_unfinished(error)
            raise

    def leave_unfinished(self, error: BaseException) -> None:
        """The current collective's wait ended by ``error`` (a timeout, an interrupt): its requests may stay
        active, and MPI cannot cancel a collective. So later collectives on this communicator are refused
        (:meth:`enter`), and cleanup skips collective frees (:func:`timed_out`): the other ranks may never
        join them."""
        mark_timed_out()
        if self.unfinished is None:
            cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            self.unfinished = (f"{self.where()} was left unfinished ({cause}); MPI "
                               "cannot cancel a collective, so this communicator's later collectives would not "
                               "match the other ranks' calls: end the job")

    def wait_for_peers(self, ready: Callable[[], Any], *, what: str, peers: Sequence[int],
                       timeout: Optional[float] = None, backoff: Optional[Backoff] = None,
                       agree: bool = True) -> Any:
        """Poll ``ready()`` for point-to-point traffic with ``peers`` (COMM_WORLD ranks, named in reports):
        stall warnings and :class:`~mpisgd.errors.CollectiveTimeout` as for collectives, naming ``what`` and
        the peers. ``timeout`` replaces the settings' (0: no deadline, and no warnings: polled forever).
        ``agree=False``: for waits the ranks outside ``peers`` never share (a sub-communicator's, such as the
        servers' own collectives): at the timeout, wait only for the peers that also time out
        (:meth:`await_the_group`), and name the peers whose heartbeat stood still."""
        settings = self.settings if timeout is None else dataclasses.replace(self.settings, timeout=timeout)
        backoff = backoff or Backoff(first=FIRST_SLEEP_S, longest=LONGEST_SLEEP_S, spin_for=SPIN_S,
                                     clock=self.clock, sleep=self.sleep)
        watch = _PeerWait(self, settings, what, list(peers), agree) if settings.enabled else None
        return wait_until(ready, backoff=backoff, clock=self.clock, watch=watch)

    @contextlib.contextmanager
    def timeout_of(self, timeout: Optional[float]) -> Iterator[None]:
        """Collectives inside the block time out after ``timeout`` seconds (None: the settings' own)."""
        if timeout is None:
            yield
            return
        saved = self.settings
        self.settings = dataclasses.replace(saved, timeout=timeout)
        try:
            yield
        finally:
            self.settings = saved

    def blocking(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Enter the collective ``name``, a blocking MPI call, under the deadline (:func:`blocking_collective`)."""
        self.enter(name)
        return blocking_collective(name, self)

    # ---- the slow path ----------------------------------------------------------------------------
    def where(self) -> str:
        step = "" if self.step is None else f", step {self.step}"
        return f"collective #{self.sequence} {self.name!r}{step}"

    def read_board(self) -> Optional[dict]:
        if self.board is None:
            return None
        return self.board.read(min(BOARD_READ_S, max(self.settings.beat_s, 0.05)), self.clock)

    def describe(self, now: Optional[dict], before: Optional[dict]) -> tuple[str, list]:
        """(text naming who is missing, their ranks as named in messages)."""
        if now is None:
            return "which ranks are missing is unknown (no arrival board)", []
        found = diagnose(self.sequence, self.rank, now, before)
        named = self.world_ranks
        parts, missing = [], []
        if found.not_arrived:
            ranks = sorted(found.not_arrived)
            missing += ranks
            at = "; ".join(f"rank {named[r]} at collective #{s.sequence}" + ("" if s.step == NO_STEP else
                                                                            f", step {s.step}")
                           for r, s in found.not_arrived.items())
            verb = "has" if len(ranks) == 1 else "have"
            parts.append(f"{_names([named[r] for r in ranks])} {verb} not arrived ({at})")
        if found.not_answering:
            missing += found.not_answering
            parts.append(f"{_names([named[r] for r in found.not_answering])} did not answer a read of the "
                         "arrival board (stopped, or unreachable without its progress)")
        if found.silent and not missing:
            missing += found.silent
            parts.append(f"{_names([named[r] for r in found.silent])} entered it but showed no sign of life "
                         "since (stopped, or busy outside mpisgd's waits)")
        if not parts:
            return "every rank has arrived; the data of some rank is late", []
        return "; ".join(parts), [named[r] for r in missing]

    def give_up(self, waited: float, now: Optional[dict], before: Optional[dict]) -> None:
        """Mark this rank as given up, wait (briefly) until every other live rank has too, and raise."""
        mark_timed_out()
        text, _ = self.describe(now, before)
        suspects = set(diagnose(self.sequence, self.rank, now or {}, before).not_arrived)
        self.await_the_others(suspects, self.sequence, self.settings.timeout)
        raise CollectiveTimeout(f"{self.where()}: no progress for {waited:.1f} s (collective timeout "
                                f"{self.settings.timeout:g} s) on rank {self.world_ranks[self.rank]}: {text}")

    def await_the_others(self, suspects: set, since: int, timeout: float) -> None:
        """At a timeout: mark this rank as given up and wait (at most :data:`AGREE_S`) until every other rank
        that is not a suspect and has entered collective ``since`` has given up too, so that every live rank
        reports before the first one's exit ends the job."""
        mark_timed_out()
        if self.board is None:
            return
        self.board.give_up(max(self.sequence, 1))
        deadline = self.clock() + min(AGREE_S, timeout)
        while self.clock() < deadline:
            slots = self.board.read(min(BOARD_READ_S, AGREE_S), self.clock)
            live = [r for r, s in slots.items() if r != self.rank and s is not None and r not in suspects
                    and s.sequence >= since]
            if all(slots[r].gave_up >= max(since, 1) for r in live):
                break
            self.sleep(0.01)

    def await_the_group(self, peers: set, timeout: float) -> list:
        """At the timeout of a wait that only ``peers`` (board indices) share, whose missing members the
        collective sequence numbers cannot tell: mark this rank as given up, then wait (at most
        :data:`AGREE_S`) until every peer has either given up too or shown a still heartbeat (a waiting
        rank beats it every ``beat_s``), and no peer has newly given up for :meth:`quiet_s`. So every peer
        that times out in the same wait reports before the first one's exit ends the job: each sees the
        last give-up at about the same time, so all leave together. Returns the peers (world ranks) that
        neither gave up nor beat: stopped, or not in this wait."""
        mark_timed_out()
        if self.board is None:
            return []
        self.board.give_up(max(self.sequence, 1))
        start = last_give_up = self.clock()
        first = self.board.read(BOARD_READ_S, self.clock)
        given, beating = set(), set()
        while True:
            slots = self.board.read(BOARD_READ_S, self.clock)
            now = self.clock()
            for peer in peers:
                slot, before = slots.get(peer), first.get(peer)
                if slot is None:
                    continue
                if slot.gave_up > 0 and peer not in given:
                    given.add(peer)
                    last_give_up = now
                if before is not None and slot.heartbeat != before.heartbeat:
                    beating.add(peer)
            observed = now >= start + self.quiet_s()  # long enough to have seen a waiting peer's heartbeat
            settled = all(peer in given or (observed and peer not in beating) for peer in peers)
            if settled and now >= last_give_up + self.quiet_s() or now >= start + min(AGREE_S, timeout):
                break
            self.sleep(0.01)
        return sorted(self.world_ranks[p] for p in peers - given - beating)

    def quiet_s(self) -> float:
        """How long without a new give-up ends :meth:`await_the_group`: two heartbeats of a waiting rank."""
        return 2 * self.settings.beat_s + 0.05


class _StalledWait:
    """One wait's :class:`~mpisgd.comm.wait.Watch`: heartbeats, warnings every ``stall_warning`` s, the
    timeout. Consulted only once the wait has lasted ``beat_s``."""

    def __init__(self, watchdog: Watchdog) -> None:
        self.dog = watchdog
        settings = watchdog.settings
        self.first_check = settings.beat_s
        self.next_warning = settings.stall_warning if settings.stall_warning > 0 else float("inf")
        self.before: Optional[dict] = None  # the board at the last read
        self.read_at = -1.0

    def check(self, waited: float) -> float:
        dog, settings = self.dog, self.dog.settings
        if dog.board is not None:
            dog.board.beat()
        if self.before is None or waited >= self.next_warning or waited >= settings.timeout:
            now = dog.read_board()
            previous = self.before if waited - self.read_at >= settings.beat_s else None
            if waited >= settings.timeout:
                dog.give_up(waited, now, previous)
            if waited >= self.next_warning:
                text, _ = dog.describe(now, previous)
                logger.warning("stall: %s has waited %.1f s on rank %d: %s", dog.where(), waited,
                               dog.world_ranks[dog.rank], text)
                while self.next_warning <= waited:
                    self.next_warning += settings.stall_warning
            self.before, self.read_at = now, waited
        return min(waited + settings.beat_s, self.next_warning, settings.timeout)


class _PeerWait:
    """The :class:`~mpisgd.comm.wait.Watch` of a point-to-point wait (:meth:`Watchdog.wait_for_peers`): the
    peers are known, so no board is read; warnings every ``stall_warning`` s, then the timeout."""

    def __init__(self, watchdog: Watchdog, settings: WatchdogSettings, what: str, peers: list,
                 agree: bool = True) -> None:
        self.dog, self.settings, self.what, self.peers, self.agree = watchdog, settings, what, peers, agree
        self.first_check = settings.beat_s
        self.next_warning = settings.stall_warning if settings.stall_warning > 0 else float("inf")

    def missing(self) -> str:
        return f"waiting for {_names(self.peers)}" if self.peers else "which rank is missing is unknown"

    def check(self, waited: float) -> float:
        dog, settings = self.dog, self.settings
        me = dog.world_ranks[dog.rank]
        if dog.board is not None:
            dog.board.beat()
        if waited >= settings.timeout:
            suspects = {i for i, world in enumerate(dog.world_ranks) if world in self.peers}
            still = ""
            if self.agree:
                dog.await_the_others(suspects, 0, settings.timeout)
            elif len(self.peers) > 1:
                frozen = dog.await_the_group(suspects, settings.timeout)
                if frozen:
                    still = f" (the heartbeat of {_names(frozen)} stood still: stopped, or not in this wait)"
            else:  # the one peer is the one missing: only say so on the board
                dog.await_the_others(suspects, 0, 0.0)
            raise CollectiveTimeout(f"{self.what}: no progress for {waited:.1f} s (collective timeout "
                                    f"{settings.timeout:g} s) on rank {me}: {self.missing()}{still}")
        if waited >= self.next_warning:
            logger.warning("stall: %s has waited %.1f s on rank %d: %s", self.what, waited, me, self.missing())
            while self.next_warning <= waited:
                self.next_warning += settings.stall_warning
        return min(waited + settings.beat_s, self.next_warning, settings.timeout)
