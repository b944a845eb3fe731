"""The memory block: what fits the room, and the token count reported for it."""

from __future__ import annotations

from proxy import tokens
from proxy.memory import inject
from proxy.memory.model import EPISODIC, Memory


def _memory(i: int, text: str) -> Memory:
    return Memory(id=f"m{i}", type=EPISODIC, text=text, ts=1_700_000_000 + i * 86_400, key=i, user="u",
                  session=f"s{i}", role="user", name="Ana")


def test_the_block_fits_the_room_and_its_reported_tokens_are_its_tokens() -> None:
    tokens.warm()
    memories = [_memory(i, f"Memory {i}: we agreed to ship release {i} on Friday after the review with Maria.") for i in range(12)]
    for room in (60, 150, 400, 5000):
        for procedural in ([], ["Answer in French.", "Keep replies short."]):
            block, kept, counted = inject.render(memories, procedural, room)
            actual = tokens.count_text(block)
            if not kept and not procedural:
                assert block == "" and counted == 0
                continue
            # As budgeted: a token of slack per line and four for the framing, so at most that
            # much over the block's tokens (and never more than a token or two under).
            assert actual - 2 <= counted <= actual + 4 + len(kept), (room, counted, actual)
            if kept:
                assert counted <= room
            assert [m.id for m in kept] == [m.id for m in memories[: len(kept)]]
    # Counted again from the cache, the same answer.
    assert inject.render(memories, [], 400)[2] == inject.render(memories, [], 400)[2]
