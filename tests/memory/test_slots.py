"""proxy/memory/slots.py against the Python set it replaces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.memory.slots import SlotSet, union


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "add", "discard"]), st.integers(0, 300)), max_size=200))
def test_it_answers_as_a_set_would(operations: list[tuple[str, int]]) -> None:
    # Mostly increasing slots (as TenantMemory hands them out), some out of order and repeated.
    slots, model = SlotSet(), set()
    for action, slot in operations:
        getattr(slots, action)(slot)
        getattr(model, action)(slot)
        assert len(slots) == len(model)
    assert list(slots) == sorted(model) and slots.array().tolist() == sorted(model)
    assert all(s in slots for s in model) and -1 not in slots and 301 not in slots and "1" not in slots


def test_the_union_of_groups_is_sorted_and_distinct() -> None:
    a, b, empty = SlotSet([1, 5, 9]), SlotSet([5, 6, 100_000]), SlotSet()
    got = union([a, b, empty])
    assert got.dtype == np.int64 and got.tolist() == [1, 5, 6, 9, 100_000]
    assert union([empty]).tolist() == [] and union([]).tolist() == []
