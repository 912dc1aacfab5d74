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
@given(workers=st.integers(1, 4), events=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.booleans()),
                                                  max_size=60))
def test_every_push_is_counted_once_whatever_the_interleaving(workers, events):
    """Events: a push by a worker (for the step being gathered, or an older one), or a look by the server,
    after which the step may advance. Each push is recorded; at a look, the newest push of each worker is
    an arrival when unseen and for the step, and every other unseen push is late."""
    ledger = SlotLedger(workers)
    tags = np.zeros(workers, dtype=np.int64)
    pushes = [[] for _ in range(workers)]  # per worker: [step, seen] of each push, in order
    step, arrivals, late = 1, 0, 0
    expected_arrivals, expected_late = 0, 0
    for is_push, who, old in events:
        worker = who % workers
        if is_push:
            push_step = step - 1 if old and step > 1 else step
            pushes[worker].append([push_step, False])
            tags[worker] = slot_tag(push_step, len(pushes[worker]))
            continue
        for records in pushes:
            for index, record in enumerate(records):
                if not record[1]:
                    record[1] = True
                    newest = index == len(records) - 1
                    expected_arrivals += newest and record[0] == step
                    expected_late += not (newest and record[0] == step)
        arrived, counted_late = ledger.note(tags, step)
        arrivals, late = arrivals + len(arrived), late + counted_late
        assert arrived == sorted(arrived) and len(set(arrived)) == len(arrived)
        assert (arrivals, late) == (expected_arrivals, expected_late)
        if old:
            step += 1
    ledger_total = arrivals + late + ledger.note(tags, step + 1)[1]  # the drain: whatever is left is late
    assert ledger_total == sum(len(records) for records in pushes)
