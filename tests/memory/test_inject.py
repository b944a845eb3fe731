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
            # As budgeted: a token of slack per line (a memory's and its session's heading) and
            # four for the framing, so at most that much over the block's tokens (and never more
            # than a token or two under).
            lines = len(kept) + len({m.session for m in kept})
            assert actual - 2 <= counted <= actual + 4 + lines, (room, counted, actual)
            if kept:
                assert counted <= room
            assert [m.id for m in kept] == [m.id for m in memories[: len(kept)]]
    # Counted again from the cache, the same answer.
    assert inject.render(memories, [], 400)[2] == inject.render(memories, [], 400)[2]


def test_memories_of_one_session_share_its_heading_and_carry_no_id() -> None:
    tokens.warm()
    memories = [Memory(id=f"mem_{i:020x}", type=EPISODIC, text=f"fact number {i}", ts=1_700_000_000, key=i, user="u",
                       session="s-a" if i % 2 else "s-b", role="user", name="Ana") for i in range(4)]
    block, kept, _ = inject.render(memories, [], 5000)
    assert len(kept) == 4
    assert block.count('session "s-a":') == 1 and block.count('session "s-b":') == 1
    assert "mem_" not in block
    # Each memory sits under its own session's heading.
    a, b = block.index('session "s-a":'), block.index('session "s-b":')
    for i in range(4):
        at = block.index(f"fact number {i}")
        heading = a if i % 2 else b
        other = b if i % 2 else a
        assert heading < at and not (heading < other < at)
