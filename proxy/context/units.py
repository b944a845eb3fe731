"""The conversation as the assembler sees it: messages grouped into atomic units and segments.

A *unit* is what is kept or dropped as a whole: one message, or an assistant message that
calls tools together with the tool results that answer it. A *segment* is a run of units
that one summary covers. Segment boundaries depend only on the messages before them (a
segment closes after ``segment_turns`` user turns, or once it holds ``SEGMENT_CHARS``
characters), so as a conversation grows its closed segments never move and their summaries
can be reused forever.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

from proxy.message_text import message_text as text_of  # noqa: F401 - the context package's name for it

# A segment also closes once it holds this much text, so one summarizer call stays bounded
# even in a tool loop that never returns to the user. Characters, not tokens: boundaries must
# not move when the session switches to a model with another tokenizer.
SEGMENT_CHARS = 12_000

_SYSTEM_ROLES = ("system", "developer")
_RESULT_ROLES = ("tool", "function")


@dataclass(slots=True)
class Item:
    """One message of the request, with what the assembler needs to know about it."""

    body: dict[str, Any]
    tokens: int
    seq: int | None = None  # stored seq; None for a message not (yet) recorded
    tags: tuple[str, ...] = ()
    chars: int = 0


@dataclass(slots=True)
class Unit:
    start: int  # item indices [start, end)
    end: int
    tokens: int
    chars: int
    role: str  # role of the first message
    priority: int = 0  # importance: 0 = not pinned


@dataclass(frozen=True, slots=True)
class Segment:
    index: int
    lo: int  # unit indices [lo, hi)
    hi: int
    seqs: tuple[int, ...]  # every stored seq it covers; empty when not all are stored
    key: str  # summary record key: "seg:<first>:<last>:<digest of seqs>"
    session_key: str  # key of the session summary covering segments 0..index
    tokens: int


@dataclass
class View:
    """Items, units and closed segments of one conversation path."""

    items: list[Item]
    units: list[Unit]
    head: int  # leading system units (the system prompt), always sent
    segments: list[Segment]
    tokens: int  # all items
    last_user: int  # unit index of the newest user message, -1 when there is none
    suffix: list[int] = field(default_factory=list)  # suffix[u] = tokens of units u..end




def build_units(items: Sequence[Item], priorities: dict[str, int] | None = None,
                units: list[Unit] | None = None) -> list[Unit]:
    """Group items into units: tool results stay with the assistant message that called them.

    ``units``: those of a prefix of ``items`` already grouped (closed: see ``build_view``);
    grouping goes on from where they end."""
    units = [] if units is None else units
    for index in range(units[-1].end if units else 0, len(items)):
        item = items[index]
        role = item.body.get("role")
        if role in _RESULT_ROLES and units and units[-1].end == index:
            unit = units[-1]  # a tool result joins the call before it (or the preceding unit)
            unit.end = index + 1
            unit.tokens += item.tokens
            unit.chars += item.chars
        else:
            unit = Unit(index, index + 1, item.tokens, item.chars, str(role))
            units.append(unit)
        if priorities and item.tags:
            unit.priority = max(unit.priority, max(priorities.get(t, 0) for t in item.tags))
    return units


def build_view(items: list[Item], segment_turns: int, priorities: dict[str, int] | None = None,
               previous: View | None = None) -> View:
    """The view of ``items``. ``previous``: the view of an earlier request of the same
    conversation, built with the same settings; its units and closed segments over the items
    both requests share (the same Item objects, in the same places) are reused, so a long
    session costs per request what its new messages do, not what its whole history does."""
    units: list[Unit] = []
    segments: list[Segment] = []
    if previous is not None:
        shared = shared_prefix(previous.items, items)
        # A unit ending before the shared items do saw the same next item, so it is closed the
        # same way: kept as is (never mutated again, since grouping resumes after it).
        keep = 0
        while keep < len(previous.units) and previous.units[keep].end < shared:
            keep += 1
        units = previous.units[:keep]
        # A segment closes on the unit after it: it is the same if that unit is a kept one.
        segments = [s for s in previous.segments if s.hi < keep]
    units = build_units(items, priorities, units)
    head = 0
    while head < len(units) and units[head].role in _SYSTEM_ROLES:
        head += 1
    last_user = -1
    for u in range(len(units) - 1, head - 1, -1):
        if units[u].role == "user":
            last_user = u
            break
    suffix = list(itertools.accumulate((u.tokens for u in reversed(units)), initial=0))
    suffix.reverse()
    view = View(items, units, head, [], suffix[0], last_user, suffix)
    view.segments = _segments(view, segment_turns, segments)
    return view


def shared_prefix(old: Sequence[Any], new: Sequence[Any]) -> int:
    """How many leading elements ``old`` and ``new`` share (the same objects)."""
    n = min(len(old), len(new))
    if n and old[n - 1] is new[n - 1] and all(map(operator.is_, old[:n], new[:n])):
        return n
    shared = 0
    while shared < n and old[shared] is new[shared]:
        shared += 1
    return shared


def _segments(view: View, segment_turns: int, closed: list[Segment] | None = None) -> list[Segment]:
    """Closed segments, greedily from the first non-system unit (see the module docstring);
    ``closed``: the first ones, already known (``build_view``): the greedy pass resumes after
    the last of them."""
    units, items = view.units, view.items
    segments: list[Segment] = list(closed or ())
    chain = bytes.fromhex(segments[-1].session_key.rsplit(":", 1)[1]) if segments else b""
    lo = segments[-1].hi if segments else view.head
    turns = chars = tokens = 0
    for u in range(lo, len(units)):
        unit = units[u]
        starts_turn = unit.role == "user"
        if u > lo and ((starts_turn and turns >= segment_turns) or chars >= SEGMENT_CHARS):
            seqs = tuple(i.seq for i in items[units[lo].start:units[u - 1].end] if i.seq is not None)
            complete = len(seqs) == units[u - 1].end - units[lo].start
            digest = hashlib.blake2b(b"".join(s.to_bytes(8, "big") for s in seqs), digest_size=8).hexdigest()
            key = f"seg:{seqs[0]:010d}:{seqs[-1]:010d}:{digest}" if complete else f"tmp:{lo}:{u}:{digest}"
            chain = hashlib.blake2b(chain + key.encode(), digest_size=8).digest()
            session_key = f"ses:{seqs[-1]:010d}:{chain.hex()}" if complete else f"tmp:ses:{u}:{chain.hex()}"
            segments.append(Segment(len(segments), lo, u, seqs if complete else (), key, session_key, tokens))
            lo, turns, chars, tokens = u, 0, 0, 0
        if starts_turn:
            turns += 1
        chars += unit.chars
        tokens += unit.tokens
    return segments
