"""Claims on background jobs: one runner at a time per job, in this process and across a fleet.

A job is named by a string (``janitor``, one session's summaries). ``Claims.claim(job)`` grants it
to the first asker and refuses the others until that one is done; a refused runner skips the run
(the holder does the work). On one process that is all there is. In fleet mode (PostgreSQL,
``replicas: many``) the store's ``job_claim`` adds a session-level advisory lock, which
PostgreSQL lets go when the holder's connection ends: a replica that dies mid-job (even SIGKILL)
leaves the job to the next replica that asks.
"""

from __future__ import annotations

import collections
import contextlib
from typing import AsyncContextManager, AsyncIterator, Callable

Across = Callable[[str], AsyncContextManager[bool]]


class Claims:
    """Grants each job to one runner at a time; ``across`` asks the rest of the fleet too."""

    def __init__(self, across: Across | None = None) -> None:
        self._across = across
        self._held: set[str] = set()
        self.granted: collections.Counter[str] = collections.Counter()  # by job family (before the first ':')
        self.refused: collections.Counter[str] = collections.Counter()

    @property
    def fleet(self) -> bool:
        return self._across is not None

    @contextlib.asynccontextmanager
    async def claim(self, job: str) -> AsyncIterator[bool]:
        """True for the block when this runner holds ``job``; False when another does (skip it)."""
        family = job.split(":", 1)[0]
        if job in self._held:  # a PostgreSQL session's advisory locks are re-entrant: exclude here
            self.refused[family] += 1
            yield False
            return
        self._held.add(job)
        try:
            if self._across is None:
                self.granted[family] += 1
                yield True
                return
            async with self._across(job) as granted:
                (self.granted if granted else self.refused)[family] += 1
                yield granted
        finally:
            self._held.discard(job)


def claims_for(store: object) -> Claims:
    """Claims for a store: across the fleet when it is shared with other replicas."""
    across = getattr(store, "job_claim", None)
    return Claims(across if getattr(store, "shared", False) and across is not None else None)
