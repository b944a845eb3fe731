"""The memory block: what fits the room, and the token count reported for it."""

from __future__ import annotations

from proxy import tokens
from proxy.memory import inject, snippet
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


def test_a_long_memory_is_cut_to_its_sentences_about_the_query_so_all_ten_fit() -> None:
    tokens.warm()
    page = " ".join(f"Log line {i}: the nightly build of module {i} finished without warnings." for i in range(60))
    page += " The staging database password rotation failed because the vault token had expired."
    page += " " + " ".join(f"Trailing note {i} about lunch plans and the weather." for i in range(40))
    memories = [_memory(0, page)] + [_memory(i, f"Memory {i}: we agreed to ship release {i} on Friday.") for i in range(1, 10)]
    room = 600
    assert tokens.count_text(page) > room  # alone it would not fit: before, it was left out
    block, kept, counted = inject.render(memories, [], room, query="why did the vault password rotation fail?")
    assert [m.id for m in kept] == [m.id for m in memories]
    assert counted <= room and tokens.count_text(block) <= room
    assert "password rotation failed because the vault token had expired" in block
    assert "…" in block and "Log line 59" not in block and "Trailing note 39" not in block
    for i in range(1, 10):  # the short ones are whole
        assert f"Memory {i}: we agreed to ship release {i} on Friday." in block


def test_when_even_cut_memories_cannot_all_fit_the_lowest_ranked_are_left_out() -> None:
    tokens.warm()
    memories = [_memory(i, f"Memory {i}: " + "we discussed the quarterly roadmap and its many open risks. " * 8) for i in range(10)]
    block, kept, counted = inject.render(memories, [], 250, query="roadmap risks")
    assert 0 < len(kept) < 10
    assert [m.id for m in kept] == [m.id for m in memories[: len(kept)]]  # rank order: a prefix
    assert counted <= 250 and tokens.count_text(block) <= 250
    for memory in kept:  # each still says something: at least a sentence of it
        assert f"Memory {memory.key}: we discussed the quarterly roadmap" in block


def test_snippet_keeps_the_matching_sentences_in_order_within_the_allowance() -> None:
    tokens.warm()
    text = ("We met on Monday. The cat is called Miso and she is four. Lunch was pasta. "
            "Miso hates the vet, so bring treats. The weather was grey.")
    assert snippet.cut(text, "anything", 500) == text  # fits: unchanged
    cut = snippet.cut(text, "what does Miso the cat hate?", 28)
    assert tokens.count_text(cut) <= 28
    assert "The cat is called Miso" in cut and "Miso hates the vet" in cut
    assert cut.index("The cat is called Miso") < cut.index("Miso hates the vet")
    assert "Lunch was pasta" not in cut and cut.startswith("…")
    # No sentence fits: the opening words of the best one.
    long_sentence = "Miso " + "purrs loudly and " * 40 + "sleeps."
    cut = snippet.cut(long_sentence, "Miso", 10)
    assert cut.startswith("Miso purrs") and cut.endswith("…") and tokens.count_text(cut) <= 10


def test_a_long_memory_without_spaces_is_cut_by_its_sentences_or_characters() -> None:
    tokens.warm()
    # Chinese: sentences end with 。 and take no space. The lexical stack has no terms for
    # Chinese, so no sentence matches the query better: the opening sentences are kept, whole.
    text = "我们讨论了很多事情。" * 30 + "猫的名字叫味噌。" + "天气很好。" * 30
    cut = snippet.cut(text, "猫的名字叫味噌", 40)
    assert tokens.count_text(cut) <= 40 and cut.startswith("我们讨论了很多事情。 我们讨论了很多事情。") and cut.endswith("…")
    unbroken = "味" * 400  # one "word", no sentence end: its opening characters
    cut = snippet.cut(unbroken, "味", 20)
    assert cut.startswith("味味") and cut.endswith("…") and tokens.count_text(cut) <= 20
