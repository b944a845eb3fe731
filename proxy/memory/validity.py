"""Which memories a recall may use besides relevance: the types it searches (extracted lessons
and preferences too when the tenant extracts) and whether a memory has outlived its type's TTL."""

from __future__ import annotations

import time

from proxy.config import MemorySettings
from proxy.memory.model import EPISODIC, PROCEDURAL, SEMANTIC, Memory


def recall_types(settings: MemorySettings) -> tuple[str, ...]:
    """What a request recalls by relevance: with extraction on, the extracted lessons and
    preferences too (configured standing ones are in the system prompt and excluded by text)."""
    return (EPISODIC, SEMANTIC, PROCEDURAL) if settings.extract else (EPISODIC, SEMANTIC)


def expired(settings: MemorySettings, memory: Memory, now: float | None = None) -> bool:
    ttl = settings.ttl_seconds(memory.type)
    return ttl is not None and memory.ts < (time.time() if now is None else now) - ttl
