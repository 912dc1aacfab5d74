"""One way to wait: poll a condition, back off politely, and give up at a deadline.

Every wait in mpisgd goes through :func:`wait_until` (or :class:`Backoff` in loops that do other work
between polls), so that the deadline of the collective watchdog lives in one place and no rank ever sits
in a blocking MPI call that Python cannot interrupt. The clock is injectable, so tests can drive time.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Protocol, TypeVar

from mpisgd.errors import CommError

T = TypeVar("T")

FIRST_SLEEP_S = 1e-4
LONGEST_SLEEP_S = 5e-3


class WaitTimeout(CommError):
    """A wait passed its deadline; the message says what was awaited."""


class Backoff:
    """Pause after an idle poll, a little longer each time, reset as soon as work arrives.

    ``spin=True`` only yields the CPU (``sched_yield``) instead of sleeping: for latency-bound waits on
    collectives, where a sleep's granularity would cost more than the message. ``spin_for`` (seconds)
    spins that long first and sleeps afterwards: a collective that is not done after it waits for a
    peer's computation, not for the wire, and a sleeping rank gives its core back.
    """

    def __init__(self, *, first: float = FIRST_SLEEP_S, longest: float = LONGEST_SLEEP_S, spin: bool = False,
                 sleep: Callable[[float], None] = time.sleep, spin_for: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first, self.longest, self.spin, self._sleep = first, longest, spin, sleep
        self.spin_for, self._clock = spin_for, clock
        self.pause = first
        self._spin_until: Optional[float] = None

    def idle(self) -> None:
        if self.spin_for is not None:
            now = self._clock()
            if self._spin_until is None:
                self._spin_until = now + self.spin_for
            if now < self._spin_until:
                os.sched_yield()
                return
        elif self.spin:
            os.sched_yield()
            return
        self._sleep(self.pause)
        self.pause = min(2 * self.pause, self.longest)

    def busy(self) -> None:
        self.pause = self.first
        self._spin_until = None


class Watch(Protocol):
    """Something a long wait reports to (the collective watchdog): ``first_check`` seconds into the wait
    :func:`wait_until` calls ``check(waited)``, which returns when (seconds into the wait) to be called
    next, and may raise to end the wait. One comparison per poll costs the fast path nothing."""

    first_check: float

    def check(self, waited: float) -> float: ...


def wait_until(ready: Callable[[], Optional[T]], *, timeout: Optional[float] = None, what: str = "a condition",
               backoff: Optional[Backoff] = None, clock: Callable[[], float] = time.monotonic,
               on_timeout: Optional[Callable[[], None]] = None, watch: Optional[Watch] = None) -> T:
    """Call ``ready()`` until it returns something other than None/False, and return that.

    Args:
        ready: the poll; it must not block.
        timeout: seconds until :class:`WaitTimeout` (None: no deadline).
        what: named in the timeout's message ("rank 3's reply").
        backoff: how to pause between polls (default: sleeps from 0.1 ms doubling to 5 ms).
        clock: monotonic seconds; injectable for tests.
        on_timeout: called instead of raising (it may raise its own error); then the wait returns None.
        watch: told how long the wait has lasted at the times it asks for (:class:`Watch`).
    """
    backoff = backoff or Backoff()
    start = clock() if timeout is not None or watch is not None else 0.0
    deadline = None if timeout is None else start + timeout
    next_check = None if watch is None else start + watch.first_check
    while True:
        result = ready()
        if result is not None and result is not False:
            return result
        now = clock() if deadline is not None or next_check is not None else 0.0
        if next_check is not None and now >= next_check:
            assert watch is not None
            next_check = start + watch.check(now - start)
        if deadline is not None and now >= deadline:
            if on_timeout is not None:
                on_timeout()
                return None  # type: ignore[return-value]
            raise WaitTimeout(f"no {what} within {timeout:g} s")
        backoff.idle()
