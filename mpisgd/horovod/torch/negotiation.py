"""Name-matched negotiation: which submitted operations are ready on every rank, in one agreed order.

Each cycle every rank contributes one message (its newly submitted operations: name, signature and
per-rank extras such as an allgather's first dimension); every rank receives all messages and feeds
them to its own :class:`Negotiator`. All negotiators hold the same state and decide the same
responses, in the same order, without a coordinator rank: that is what lets ranks submit in
different orders. The mismatch check costs nothing extra: the signatures (kind, dtype, shape, op,
root, scale factors, process set) travel anyway, and any difference becomes an error response
naming the ranks. Names seen before with the same signature travel as a small integer (Horovod's
response cache), which keeps the steady state cheap. No MPI here: unit-testable in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple, Optional

AUTO_NAME_MARK = ".noname."
ADASUM = 2  # ReduceOp.ADASUM (basics.py): reduced alone, never fused


class Kind(IntEnum):
    ALLREDUCE = 0
    ALLGATHER = 1
    BROADCAST = 2
    ALLTOALL = 3
    REDUCESCATTER = 4
    BARRIER = 5


class Signature(NamedTuple):
    """What every rank must agree on for one named operation."""

    kind: Kind
    dtype: str
    shape: tuple  # allgather/alltoall: the dimensions after the first, which may differ per rank
    op: int  # ReduceOp, -1 where none
    root: int  # broadcast's root (a global rank), -1 otherwise
    prescale: float
    postscale: float
    process_set: int
    members: tuple  # global ranks of the process set


FIELD_WORDS = {"kind": "operation", "dtype": "dtype", "shape": "shape", "op": "reduction op", "root": "root rank",
               "prescale": "prescale factor", "postscale": "postscale factor", "process_set": "process set",
               "members": "process set ranks"}


class Message(NamedTuple):
    """One rank's contribution to one cycle."""

    shutdown: bool
    join: bool
    clock: float  # the sender's monotonic clock: rank 0's decides stalls, the same way on every rank
    entries: tuple  # (cache id, extra) or (name, Signature, extra)


class Response(NamedTuple):
    """A decision every rank made alike: run ``name`` of the signature's process set (or fail it with
    ``error``)."""

    name: str
    signature: Signature
    extras: dict  # rank -> that rank's extra (allgather rows, alltoall splits)
    error: Optional[str]
    participants: tuple  # ranks that submitted it (joined ranks take part without submitting)
    joined: tuple

    @property
    def key(self) -> tuple:
        return (self.signature.process_set, self.name)


@dataclass
class Pending:
    first_cycle: int
    first_clock: float
    reports: dict = field(default_factory=dict)  # rank -> (Signature, extra)
    warned: bool = False


@dataclass
class Outcome:
    responses: list
    shutdown: bool = False
    last_joined: Optional[int] = None  # every rank joined; this one last
    warnings: list = field(default_factory=list)
    traffic: bool = False  # some rank sent something, or something waits: no time to idle


def ranks_text(ranks: Any) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(str(r) for r in ranks)


def describe_mismatch(name: str, reports: dict) -> str:
    """Which fields differ, and which ranks hold which value."""
    signatures = {rank: sig for rank, (sig, _) in reports.items()}
    parts = []
    for index, field_name in enumerate(Signature._fields):
        by_value: dict = {}
        for rank, sig in sorted(signatures.items()):
            value = sig[index]
            by_value.setdefault(value.name.lower() if isinstance(value, Kind) else value, []).append(rank)
        if len(by_value) > 1:
            held = "; ".join(f"{ranks_text(r)}: {v}" for v, r in by_value.items())
            parts.append(f"{FIELD_WORDS[field_name]} differs ({held})")
    kinds = {sig.kind.name.lower() for sig in signatures.values()}
    return f"Mismatched {'/'.join(sorted(kinds))} {name!r} across ranks: " + "; ".join(parts)


class Negotiator:
    """The table of operations submitted by some ranks, identical on every rank."""

    def __init__(self, size: int, *, cache_capacity: int = 1024, stall_check_s: float = 60.0,
                 stall_shutdown_s: float = 0.0) -> None:
        self.size = size
        self.cache_capacity = cache_capacity
        self.stall_check_s, self.stall_shutdown_s = stall_check_s, stall_shutdown_s
        self.pending: dict = {}
        self.cache_ids: dict = {}
        self.cached: list = []
        self.joined: dict = {}  # rank -> cycle it joined in
        self.cycle = 0

    def encode(self, name: str, signature: Signature, extra: Any) -> tuple:
        """The entry this rank sends for an operation: a cache id where every rank knows the name."""
        cache_id = self.cache_ids.get((name, signature))
        return (cache_id, extra) if cache_id is not None else (name, signature, extra)

    def _decode(self, entry: tuple) -> tuple:
        if len(entry) == 2:
            name, signature = self.cached[entry[0]]
            return name, signature, entry[1]
        return entry

    def step(self, messages: list) -> Outcome:
        """Feed one cycle's messages (index = rank); return what every rank now does."""
        outcome = Outcome(responses=[])
        clock = messages[0].clock
        for rank, message in enumerate(messages):
            outcome.shutdown |= message.shutdown
            if message.join and rank not in self.joined:
                self.joined[rank] = self.cycle
            for entry in message.entries:
                name, signature, extra = self._decode(entry)
                key = (signature.process_set, name)  # each process set has its own names, as in Horovod
                pending = self.pending.get(key)
                if pending is None:
                    pending = self.pending[key] = Pending(self.cycle, clock)
                pending.reports[rank] = (signature, extra)
        for key in list(self.pending):
            response = self._decide(key[1], self.pending[key], clock, outcome)
            if response is not None:
                del self.pending[key]
                outcome.responses.append(response)
        outcome.traffic = bool(self.pending) or bool(self.joined) or any(m.entries for m in messages)
        if len(self.joined) == self.size:
            outcome.last_joined = max(self.joined, key=lambda r: (self.joined[r], r))
            self.joined.clear()
        self.cycle += 1
        return outcome

    def _decide(self, name: str, pending: Pending, clock: float, outcome: Outcome) -> Optional[Response]:
        first_signature = next(iter(pending.reports.values()))[0]
        members = first_signature.members
        joined = ()
        if first_signature.kind == Kind.ALLREDUCE:
            joined = tuple(r for r in members if r in self.joined and r not in pending.reports)
        missing = [r for r in members if r not in pending.reports and r not in joined]
        reporters = tuple(sorted(pending.reports))
        if missing:
            waited = clock - pending.first_clock
            if self.stall_shutdown_s > 0 and waited >= self.stall_shutdown_s:
                error = (f"operation {name!r} stalled for {waited:.0f} s: submitted by {ranks_text(reporters)}, "
                         f"never by {ranks_text(missing)} (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS)")
                return Response(name, first_signature, {}, error, reporters, ())
            if self.stall_check_s > 0 and waited >= self.stall_check_s and not pending.warned:
                pending.warned = True
                outcome.warnings.append(f"Stalled operation {name!r} for {waited:.0f} s: submitted by "
                                        f"{ranks_text(reporters)}, missing {ranks_text(missing)}")
            return None
        if any(sig != first_signature for sig, _ in pending.reports.values()) or any(
                r not in members for r in pending.reports):
            return Response(name, first_signature, {}, describe_mismatch(name, pending.reports), reporters, ())
        if (AUTO_NAME_MARK not in name and len(self.cached) < self.cache_capacity
                and (name, first_signature) not in self.cache_ids):
            self.cache_ids[(name, first_signature)] = len(self.cached)
            self.cached.append((name, first_signature))
        extras = {rank: extra for rank, (_, extra) in pending.reports.items()}
        return Response(name, first_signature, extras, None, reporters, joined)


def fusion_plan(responses: list, threshold_bytes: int, nbytes: Any) -> list:
    """Group successful allreduces of one process set, dtype, op and scaling (first-appearance order)
    into batches of at most ``threshold_bytes`` (``nbytes(response)``); everything else runs alone."""
    plan: list = []
    open_batches: dict = {}
    for response in responses:
        sig = response.signature
        if response.error is not None or sig.kind != Kind.ALLREDUCE or sig.op == ADASUM or threshold_bytes <= 0:
            plan.append([response])
            continue
        key = (sig.process_set, sig.dtype, sig.op, sig.prescale, sig.postscale)
        batch = open_batches.get(key)
        size = nbytes(response)
        if batch is None or batch[1] + size > threshold_bytes:
            batch = open_batches[key] = [[], 0]
            plan.append(batch[0])
        batch[0].append(response)
        batch[1] += size
    return plan
