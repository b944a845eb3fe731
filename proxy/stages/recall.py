"""The recall stage: long-term memories for this turn, within the room the context stage left.

The memory service (``proxy/memory``) recalls in two steps so the query embedding computes while
the context is shaped: ``begin`` (before shaping: how many tokens to keep free for the memory
block) and ``finish`` (after: search, and the body with the memory block). The service reads a
turn and writes its outcome into what it is given; this stage gives it a fresh view of the turn
each time and returns that outcome as a value, so the turn itself changes only in the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.turn import Turn

if TYPE_CHECKING:
    from proxy.memory.service import MemoryService, QueryEmbedding, Recall


@dataclass
class _TurnView:
    """What the memory service reads of a turn, and the fields it writes its outcome into."""

    tenant: Any
    ref: Any
    session: Any
    plan: Any
    body: dict[str, Any]
    recalled: list[dict[str, Any]]
    headers: dict[str, str] = field(default_factory=dict)
    injected: list[str] | None = None

    @classmethod
    def of(cls, turn: Turn, body: dict[str, Any], recalled: list[dict[str, Any]], headers: dict[str, str]) -> _TurnView:
        return cls(turn.tenant, turn.ref, turn.session, turn.plan, body, recalled, dict(headers))


@dataclass
class Started:
    """A recall under way: what the context stage must keep free for it, and its headers so far."""

    recall: Recall | None  # None: nothing to recall (memory off, loading, nothing worth a search)
    headers: dict[str, str]

    @property
    def reserve(self) -> int:
        """Tokens the memory block may take (the context stage keeps up to these free)."""
        return self.recall.room if self.recall is not None else 0

    def cancel(self) -> None:
        """Drop the query embedding if still computing (a no-op once the recall finished)."""
        if self.recall is not None:
            self.recall.cancel()


@dataclass(frozen=True)
class Memories:
    """What the recall stage decided for one turn."""

    body: dict[str, Any] | None = None  # the upstream body with the memory block; None: none added
    ids: list[str] | None = None  # the memories injected (recorded with the answer)
    headers: dict[str, str] = field(default_factory=dict)  # X-Memory-* response headers
    searched_seconds: float | None = None  # the whole recall, query embedding included, when it searched

    @property
    def missed_budget(self) -> bool:
        return self.headers.get("X-Memory-Status") == "budget-exceeded"


def begin(memory: MemoryService, turn: Turn, early: QueryEmbedding | None) -> Started:
    """Start recalling for ``turn`` (the query embedding ``early`` started, taken over)."""
    view = _TurnView.of(turn, turn.body, turn.recalled, {})
    return Started(memory.begin_recall(view, early), view.headers)


async def finish(memory: MemoryService, turn: Turn, started: Started, body: dict[str, Any], quoted: list[dict[str, Any]],
                 room: int) -> Memories:
    """Search and render the memories into ``body`` (the shaped one), in at most ``room`` tokens;
    what the request already holds (``body``'s messages, the older ones ``quoted``) is not recalled."""
    recall = started.recall
    if recall is None:
        return Memories(headers=started.headers)
    view = _TurnView.of(turn, body, quoted, started.headers)
    recall.room = room  # the service reads the room from its Recall: the value the context left
    await memory.finish_recall(view, recall)
    searched = time.perf_counter() - recall.started if recall.query is not None else None
    return Memories(view.body if view.body is not body else None, view.injected, view.headers, searched)
