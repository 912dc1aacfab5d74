"""The collective watchdog's timeline and diagnosis, without MPI: a fake arrival board and an injected clock."""

from __future__ import annotations

import logging
import threading

import pytest

from mpisgd.comm import watchdog as wd
from mpisgd.comm.blocking import blocking_collective
from mpisgd.comm.wait import wait_until
from mpisgd.comm.watchdog import NO_STEP, Slot, Watchdog, WatchdogSettings, diagnose
from mpisgd.errors import CollectiveTimeout, CommError, ConfigError, UnfinishedCollective


class Clock:
    """Monotonic seconds that advance by ``tick`` at every reading (and by what is slept)."""

    def __init__(self, tick: float = 0.001) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Board:
    """An arrival board whose other ranks are scripted: ``others(now)`` gives their slots at a time."""

    world_ranks = None

    def __init__(self, rank: int, size: int, clock: Clock, others) -> None:
        self.rank, self.size, self.clock, self.others = rank, size, clock, others
        self.mine = [0, NO_STEP, 0, 0]
        self.reads = 0

    def publish(self, sequence: int, step: int) -> None:
        self.mine[0], self.mine[1] = sequence, step

    def beat(self) -> None:
        self.mine[2] += 1

    def give_up(self, sequence: int) -> None:
        self.mine[3] = sequence

    def read(self, within: float, clock=None) -> dict:
        self.reads += 1
        slots = dict(self.others(self.clock.now))
        slots[self.rank] = Slot(*self.mine)
        return slots


def _watchdog(others, *, timeout=5.0, stall_warning=0.2, size=3):
    clock = Clock()
    board = Board(0, size, clock, others)
    dog = Watchdog(0, size, WatchdogSettings(timeout, stall_warning), board=board, clock=clock, sleep=clock.sleep)
    return dog, clock, board


def test_a_frozen_rank_is_warned_about_then_named_in_the_timeout(caplog):
    # rank 1 stopped before collective #7 (it is at #6, step 41); rank 2 waits with us and gives up with us
    def others(now):
        return {1: Slot(6, 41, 0, 0), 2: Slot(7, 42, int(now * 100), 7 if now >= 5.0 else 0)}
    dog, clock, board = _watchdog(others)
    dog.step = 42
    for _ in range(7):
        dog.enter("allreduce_many_")
    with caplog.at_level(logging.WARNING, logger="mpisgd.comm.watchdog"):
        with pytest.raises(CollectiveTimeout) as raised:
            dog.wait_for(lambda: False)
    message = str(raised.value)
    assert "collective #7 'allreduce_many_', step 42" in message
    assert "rank 1 has not arrived" in message and "#6, step 41" in message
    assert "rank 2" not in message
    assert board.mine[3] == 7  # it said so on the board before raising, for the other live ranks
    warnings = [r.getMessage() for r in caplog.records if "stall" in r.getMessage()]
    assert len(warnings) == pytest.approx(5.0 / 0.2, abs=1)  # one every stall_warning seconds
    assert all("rank 1 has not arrived" in w for w in warnings)
    assert isinstance(raised.value, CommError) and CollectiveTimeout.every_rank


def test_a_slow_rank_that_arrives_is_warned_about_but_never_timed_out(caplog):
    # rank 1 sleeps 0.5 s before each collective, 10 times; the timeout is 5 s: 20x what any single wait takes
    arrival = {"at": 0.0}

    def others(now):
        return {1: Slot(dog.sequence - 1, 0, 0, 0), 2: Slot(dog.sequence, 0, 0, 0)}
    dog, clock, _ = _watchdog(others)
    with caplog.at_level(logging.WARNING, logger="mpisgd.comm.watchdog"):
        for _ in range(10):
            dog.enter("allreduce_")
            arrival["at"] = clock.now + 0.5
            dog.wait_for(lambda: clock.now >= arrival["at"])
    warnings = [r.getMessage() for r in caplog.records if "stall" in r.getMessage()]
    assert len(warnings) >= 10 and all("rank 1 has not arrived" in w for w in warnings)


def test_a_rank_frozen_inside_the_collective_is_named_by_its_still_heartbeat():
    # every rank entered #3; rank 2 beats while it waits, rank 1's heartbeat stands still
    def others(now):
        return {1: Slot(3, NO_STEP, 5, 0), 2: Slot(3, NO_STEP, int(now * 1000), 3 if now >= 5.0 else 0)}
    dog, _, _ = _watchdog(others)
    for _ in range(3):
        dog.enter("broadcast_")
    with pytest.raises(CollectiveTimeout, match=r"rank 1 entered it but showed no sign of life"):
        dog.wait_for(lambda: False)


def test_a_rank_whose_slot_cannot_be_read_is_named():
    def others(now):
        return {1: None, 2: Slot(1, NO_STEP, int(now * 1000), 1 if now >= 2.0 else 0)}
    dog, _, _ = _watchdog(others, timeout=2.0, stall_warning=0)
    dog.enter("barrier")
    with pytest.raises(CollectiveTimeout, match=r"rank 1 did not answer a read of the arrival board"):
        dog.wait_for(lambda: False)


def test_without_a_board_the_timeout_still_fires():
    clock = Clock()
    dog = Watchdog(0, 2, WatchdogSettings(1.0, 0.5), board=None, clock=clock, sleep=clock.sleep)
    dog.enter("allreduce_")
    with pytest.raises(CollectiveTimeout, match="unknown"):
        dog.wait_for(lambda: False)


def test_world_ranks_name_the_ranks_of_a_sub_communicator():
    dog, _, _ = _watchdog(lambda now: {1: Slot(0, NO_STEP, 0, 0), 2: Slot(1, NO_STEP, 0, 1)}, timeout=1.0)
    dog.world_ranks = [4, 6, 8]
    dog.enter("allreduce_")
    with pytest.raises(CollectiveTimeout, match=r"on rank 4: rank 6 has not arrived"):
        dog.wait_for(lambda: False)


def test_diagnose():
    now = {0: Slot(5, 1, 0, 0), 1: Slot(4, 1, 0, 0), 2: None, 3: Slot(5, 1, 9, 0), 4: Slot(5, 1, 2, 0),
           5: Slot(6, 2, 0, 0)}
    before = {0: Slot(5, 1, 0, 0), 1: Slot(4, 1, 0, 0), 3: Slot(5, 1, 9, 0), 4: Slot(5, 1, 1, 0),
              5: Slot(6, 2, 0, 0)}
    found = diagnose(5, 0, now, before)
    assert list(found.not_arrived) == [1]
    assert found.not_answering == [2]
    assert found.silent == [3]  # 4 beat, 5 is past this collective
    assert diagnose(5, 0, now, None).silent == []  # one read proves nothing about a heartbeat


def test_wait_until_consults_its_watch_only_after_first_check():
    clock = Clock(tick=0.01)
    calls = []

    class Watch:
        first_check = 0.5

        def check(self, waited):
            calls.append(round(waited, 2))
            return waited + 0.5

    polls = iter(range(200))
    wait_until(lambda: next(polls) == 150, clock=clock, watch=Watch())
    assert calls and calls[0] >= 0.5 and all(b - a >= 0.49 for a, b in zip(calls, calls[1:]))


def test_settings_come_from_arguments_then_flags_then_environment(monkeypatch):
    monkeypatch.setenv("MPISGD_COLLECTIVE_TIMEOUT", "30")
    monkeypatch.setenv("MPISGD_STALL_WARNING", "3")
    assert WatchdogSettings.resolve() == WatchdogSettings(30.0, 3.0)
    wd.set_defaults(timeout=20.0)
    try:
        assert WatchdogSettings.resolve() == WatchdogSettings(20.0, 3.0)
        assert WatchdogSettings.resolve(timeout=10.0, stall_warning=1.0) == WatchdogSettings(10.0, 1.0)
    finally:
        wd.set_defaults()
    monkeypatch.delenv("MPISGD_COLLECTIVE_TIMEOUT")
    monkeypatch.delenv("MPISGD_STALL_WARNING")
    assert WatchdogSettings.resolve() == WatchdogSettings(600.0, 60.0)
    monkeypatch.setenv("MPISGD_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="MPISGD_COLLECTIVE_TIMEOUT"):
        WatchdogSettings.resolve()
    with pytest.raises(ConfigError, match="collective timeout"):
        WatchdogSettings(-1.0)


def test_timeout_zero_waits_in_mpi():
    class Request:
        waited = False

        def Waitall(self, requests):
            Request.waited = True

        def Test(self):
            raise AssertionError("a disabled watchdog must not poll")

    dog = Watchdog(0, 2, WatchdogSettings(0.0, 0.0))
    dog.wait([Request()])
    assert Request.waited


class PersistentRequest:
    """A persistent MPI request that completes at its ``done_after``-th Test after each Start."""

    def __init__(self, done_after: float) -> None:
        self.done_after, self.starts, self.tests, self.waited = done_after, 0, 0, False

    def Start(self):
        self.starts += 1
        self.tests = 0

    def Test(self):
        self.tests += 1
        return self.tests >= self.done_after

    def Wait(self):
        self.waited = True


@pytest.mark.parametrize("done_after", [1, wd.FAST_POLLS, wd.FAST_POLLS + 5])
def test_start_and_wait_enters_starts_once_and_waits_past_the_inline_polls(done_after):
    dog, clock, board = _watchdog(lambda now: {})
    request = PersistentRequest(done_after)
    dog.start_and_wait("allreduce (argument check)", request)
    assert (request.starts, request.tests, dog.sequence, board.mine[0]) == (1, done_after, 1, 1)
    assert dog.name == "allreduce (argument check)"


def test_start_and_wait_on_a_frozen_rank_times_out_naming_it():
    dog, clock, board = _watchdog(lambda now: {1: Slot(0, NO_STEP, 0, 0), 2: Slot(1, NO_STEP, int(now * 100), 0)})
    with pytest.raises(CollectiveTimeout, match="rank 1 has not arrived"):
        dog.start_and_wait("allreduce (argument check)", PersistentRequest(float("inf")))
    assert clock.now >= 5.0


def test_after_a_timeout_the_next_collective_is_refused_and_the_active_request_never_restarted(monkeypatch):
    monkeypatch.setattr(wd, "_timed_out", False)
    dog, clock, board = _watchdog(lambda now: {1: Slot(0, NO_STEP, 0, 0), 2: Slot(1, NO_STEP, int(now * 100), 0)})
    request = PersistentRequest(float("inf"))
    with pytest.raises(CollectiveTimeout):
        dog.start_and_wait("allreduce (argument check)", request)
    with pytest.raises(UnfinishedCollective, match=r"collective #1 'allreduce \(argument check\)' was left "
                                                   r"unfinished \(CollectiveTimeout: .*rank 1 has not arrived"):
        dog.start_and_wait("allreduce (argument check)", request)
    assert request.starts == 1 and dog.sequence == 1 and wd.timed_out()  # cleanup then skips collective frees


class InterruptedRequest(PersistentRequest):
    def Test(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("call", ["wait", "start_and_wait"])
def test_an_interrupted_wait_leaves_its_collective_unfinished_and_refuses_the_next(monkeypatch, call):
    monkeypatch.setattr(wd, "_timed_out", False)
    dog, clock, board = _watchdog(lambda now: {})
    request = InterruptedRequest(1)
    with pytest.raises(KeyboardInterrupt):
        if call == "wait":
            dog.enter("allreduce_")
            dog.wait([request])
        else:
            dog.start_and_wait("allreduce_", request)
    with pytest.raises(UnfinishedCollective, match="'broadcast_' cannot start on rank 0: collective #1 "
                                                   "'allreduce_' was left unfinished \\(KeyboardInterrupt"):
        dog.enter("broadcast_")
    assert wd.timed_out()


def test_start_and_wait_with_timeout_zero_waits_in_mpi():
    dog = Watchdog(0, 2, WatchdogSettings(0.0, 0.0))
    request = PersistentRequest(float("inf"))
    dog.start_and_wait("allreduce", request)
    assert request.waited and request.starts == 1 and request.tests == 0


# ---- point-to-point waits (model-parallel stage-to-stage messages) ---------------------------------------

def test_a_peer_wait_warns_then_times_out_naming_the_peer(caplog):
    # rank 1 (the peer) never sends; rank 2 gives up at about the same time as we do
    def others(now):
        return {1: Slot(3, NO_STEP, 0, 0), 2: Slot(3, NO_STEP, int(now * 100), 3 if now >= 2.0 else 0)}
    dog, clock, board = _watchdog(others, timeout=2.0, stall_warning=0.5)
    for _ in range(3):
        dog.enter("end of the model-parallel step")
    with caplog.at_level(logging.WARNING, logger="mpisgd.comm.watchdog"):
        with pytest.raises(CollectiveTimeout) as raised:
            dog.wait_for_peers(lambda: False, what="micro-batch 0's gradient from stage 1", peers=[1])
    message = str(raised.value)
    assert message.startswith("micro-batch 0's gradient from stage 1: no progress for 2.0 s")
    assert "on rank 0: waiting for rank 1" in message
    assert board.mine[3] == 3  # given up on the board, for the other live ranks
    warnings = [r.getMessage() for r in caplog.records if "stall" in r.getMessage()]
    assert len(warnings) == 3 and all("waiting for rank 1" in w for w in warnings)  # at 0.5, 1.0, 1.5 s


def test_a_slow_peer_is_warned_about_but_its_message_is_taken(caplog):
    dog, clock, board = _watchdog(lambda now: {}, timeout=2.0, stall_warning=0.5)
    arrives_at = 1.9  # late, but before the timeout: a slow peer is not a dead one
    with caplog.at_level(logging.WARNING, logger="mpisgd.comm.watchdog"):
        got = dog.wait_for_peers(lambda: "tensor" if clock.now >= arrives_at else None, what="x", peers=[1])
    assert got == "tensor"
    assert len([r for r in caplog.records if "stall" in r.getMessage()]) == 3


# ---- the servers' own collectives: a group whose missing members no sequence number names -------------

def _servers(gives_up_at, *, size=5):
    """Board indices 1 and 2 are our fellow servers, 3 and 4 workers that never join: server 1 is frozen
    (a still heartbeat), server 2 waits with us (it beats) and gives up at ``gives_up_at`` (None: never)."""
    def others(now):
        gave_up = 1 if gives_up_at is not None and now >= gives_up_at else 0
        beat = int(min(now, gives_up_at or now) * 100)  # a rank that gave up stops beating
        return {1: Slot(4, NO_STEP, 7, 0), 2: Slot(4, NO_STEP, beat, gave_up), 3: Slot(9, 3, 0, 0),
                4: Slot(9, 3, 0, 0)}
    return _watchdog(others, timeout=5.0, stall_warning=0.2, size=size)


def _time_out_among_servers(dog):
    with pytest.raises(CollectiveTimeout) as raised:
        dog.wait_for_peers(lambda: False, what="parameter servers: shard params", peers=[1, 2], agree=False)
    return str(raised.value)


@pytest.mark.parametrize("gives_up_at", [4.9, 5.0, 6.5])
def test_a_server_that_times_out_waits_for_the_fellow_server_that_also_waits_and_names_the_frozen_one(gives_up_at):
    dog, clock, board = _servers(gives_up_at)
    message = _time_out_among_servers(dog)
    assert "waiting for ranks 1, 2" in message
    assert "the heartbeat of rank 1 stood still" in message and "rank 2 stood" not in message
    assert board.mine[3] > 0
    # it left only once server 2 had given up too, and no later than quiet_s after that (or after its own)
    assert max(gives_up_at, 5.0) <= clock.now <= max(gives_up_at, 5.0) + dog.quiet_s() + 0.1


def test_a_fellow_server_that_beats_but_never_gives_up_is_waited_for_at_most_agree_s():
    dog, clock, board = _servers(None)
    message = _time_out_among_servers(dog)
    assert "the heartbeat of rank 1 stood still" in message
    assert 5.0 + wd.AGREE_S <= clock.now <= 5.0 + wd.AGREE_S + 0.1


def test_when_every_fellow_server_is_frozen_the_timeout_costs_only_the_quiet_time():
    def others(now):
        return {1: Slot(4, NO_STEP, 7, 0), 2: Slot(4, NO_STEP, 3, 0)}
    dog, clock, board = _watchdog(others, timeout=5.0, stall_warning=0.2)
    message = _time_out_among_servers(dog)
    assert "the heartbeat of ranks 1, 2 stood still" in message
    assert clock.now <= 5.0 + dog.quiet_s() + 0.1


def test_a_peer_wait_with_timeout_zero_never_gives_up():
    dog, clock, board = _watchdog(lambda now: {}, timeout=5.0, stall_warning=0.5)
    got = dog.wait_for_peers(lambda: clock.now >= 50.0, what="x", peers=[1], timeout=0)  # ten times the timeout
    assert got is True and board.mine[3] == 0


def test_a_blocking_call_where_no_thread_can_start_runs_without_a_deadline(monkeypatch):
    """Python 3.12+ starts no thread during interpreter exit (RuntimeError), where the boards' free runs:
    the call must still run (unwatched), not raise."""
    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran = []
    with blocking_collective("exit: free the arrival boards", Watchdog(0, 2, WatchdogSettings(5.0, 1.0))):
        ran.append(True)
    assert ran == [True]
