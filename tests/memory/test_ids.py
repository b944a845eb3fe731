"""proxy/memory/ids.py against the list and dict it replaces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.memory.ids import MemoryIds
from proxy.memory.model import new_id

# Ids the proxy makes, and ones a client or an older store could hold: short, long, non-ASCII,
# with NULs (numpy strips trailing ones from its byte strings).
_IDS = st.one_of(st.builds(new_id), st.text(min_size=1, max_size=40), st.sampled_from(["a", "a\0", "\0", "mem_x", "é" * 30]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "add"]), _IDS, st.integers(0, 1 << 30)), max_size=300))
def test_it_answers_as_a_list_and_a_dict_would(operations: list[tuple[str, str, int]]) -> None:
    ids, by_slot, slot_of = MemoryIds(), [], {}
    seen: list[str] = []
    for action, memory_id, pick in operations:
        if action == "remove" and seen:
            memory_id = seen[pick % len(seen)]  # mostly ids that are there
            expected = slot_of.pop(memory_id, None)
            if expected is not None:
                by_slot[expected] = None
            assert ids.remove(memory_id) == expected
        elif memory_id not in slot_of:
            slot_of[memory_id] = len(by_slot)
            by_slot.append(memory_id)
            assert ids.append(memory_id) == slot_of[memory_id]
            seen.append(memory_id)
    assert len(ids) == len(by_slot) and ids.live == len(slot_of)
    assert [ids[slot] for slot in range(len(ids))] == by_slot
    assert MemoryIds.decoded(ids.column(list(range(len(ids)))[::-1])) == by_slot[::-1]  # at once, as a saved key map takes them
    for memory_id in seen + ["never added"]:
        assert ids.slot(memory_id) == slot_of.get(memory_id)
        assert (memory_id in ids) == (memory_id in slot_of)


def test_a_hundred_thousand_ids_with_churn() -> None:
    ids = MemoryIds()
    made = [f"mem_{i:020x}" for i in range(100_000)]
    for memory_id in made:
        ids.append(memory_id)
    for memory_id in made[::3]:  # removed entries are reused, never left to fill the table
        assert ids.remove(memory_id) is not None
    for i in range(30_000):
        ids.append(f"new_{i}")
    assert ids.live == 100_000 - len(made[::3]) + 30_000
    assert ids.slot(made[1]) == 1 and ids.slot(made[3]) is None and ids[3] is None and ids[4] == made[4]
    assert ids.slot("new_29999") == 129_999 and len(ids) == 130_000
