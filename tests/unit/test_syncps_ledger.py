"""sync-ps slot accounting (mpisgd.syncps): every push a worker makes is counted once, as an arrival for the step
being gathered or as late, however the server's looks interleave with the pushes. The reference keeps a record of
each push, written here; the server sees only the tags, as in the windows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpisgd.syncps.server import SlotLedger
from mpisgd.syncps.windows import STEP_BITS, slot_tag, tag_pushes, tag_step


def test_a_tag_holds_its_step_and_push_count_in_one_int64():
    tags = np.array([slot_tag(0, 0), slot_tag(7, 1), slot_tag((1 << STEP_BITS) - 1, (1 << (63 - STEP_BITS)) - 1)],
                    dtype=np.int64)
    assert tag_step(tags).tolist() == [0, 7, (1 << STEP_BITS) - 1]
    assert tag_pushes(tags).tolist() == [0, 1, (1 << (63 - STEP_BITS)) - 1]
    for bad in ((-1, 0), (1 << STEP_BITS, 0), (0, 1 << (63 - STEP_BITS))):
        with pytest.raises(ValueError, match="out of range"):
            slot_tag(*bad)


def test_a_push_overwritten_before_the_server_looked_is_counted_late():
    """Worker 1's gradient for step 1 is overwritten by its step-2 gradient before the server's next look
    (seen under oversubscription): it was counted nowhere before the push counts were in the tags."""
    ledger = SlotLedger(2)
    tags = np.zeros(2, dtype=np.int64)
    tags[0] = slot_tag(1, 1)
    assert ledger.note(tags, 1) == ([0], 0)  # step 1 is applied with worker 0 alone (b = 1)
    tags[1] = slot_tag(1, 1)  # worker 1, late for step 1 ...
    tags[1] = slot_tag(2, 2)  # ... pushes for step 2 before the server looks
    assert ledger.note(tags, 2) == ([1], 1)
    assert ledger.note(tags, 2) == ([], 0)  # nothing new


@settings(max_examples=300, deadline=None)
@given(workers=st.integers(1, 4), backups=st.integers(0, 3), turns=st.lists(st.integers(0, 5), max_size=80))
def test_every_push_is_counted_once_in_the_protocol_whatever_the_interleaving(workers, backups, turns):
    """The sync-ps protocol, simulated: a worker pushes for step version + 1 once the shard has passed the
    step of its last push (mpisgd.syncps.worker), overwriting its slot's tag; the server looks at the tags
    and applies a step once N - b gradients for it arrived (mpisgd.syncps.server). Each turn is one worker's
    move or the server's look. At the end (the drain) every push is applied or late, each step applied
    exactly N - b gradients, and each was for that step (the simulation's own record of every push)."""
    backups = min(backups, workers - 1)
    quorum = workers - backups
    ledger = SlotLedger(workers)
    tags = np.zeros(workers, dtype=np.int64)
    pushed_steps = [[] for _ in range(workers)]  # the step of each push, per worker
    version, applied, late, arrivals = 0, 0, 0, []
    for turn in turns:
        if turn < workers:  # a worker's move, if its last step is past
            if not pushed_steps[turn] or version >= pushed_steps[turn][-1]:
                pushed_steps[turn].append(version + 1)
                tags[turn] = slot_tag(version + 1, len(pushed_steps[turn]))
            continue
        if (turn - workers) % 2 == 0:  # the server reads the tags ...
            arrived, counted_late = ledger.note(tags, version + 1)
            arrivals, late = arrivals + arrived, late + counted_late
        elif len(arrivals) >= quorum:  # ... and, in a later turn, applies the step (pushes may come between)
            chosen, discarded = arrivals[:quorum], arrivals[quorum:]
            assert all(pushed_steps[w][-1] == version + 1 for w in chosen), (chosen, pushed_steps)
            applied, late, arrivals = applied + len(chosen), late + len(discarded), []
            version += 1
    arrived, counted_late = ledger.note(tags, version + 1)  # the drain: whatever is left is late
    late += counted_late + len(arrivals + arrived)
    assert applied == version * quorum
    assert applied + late == sum(len(steps) for steps in pushed_steps)
