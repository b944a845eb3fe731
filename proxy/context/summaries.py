"""Summaries as stored records: session-scoped Records of kind "summary", with provenance.

Key ``seg:<first seq>:<last seq>:<digest>`` is one segment's summary; ``ses:<last seq>:<chain>``
is a session summary folding every segment up to that one. The value says which message
seqs the summary covers, how it was made (``llm`` or ``extractive``) and from what
(``parts``). A key names exactly one span, so a summary is computed once and reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from proxy import tokens
from proxy.storage.base import Record, Store, Write

KIND = "summary"


@dataclass(frozen=True, slots=True)
class Summary:
    key: str
    level: str  # "segment" | "session"
    text: str
    tokens: int
    encoding: str  # what ``tokens`` was counted with
    first: int  # first and last seq covered
    last: int
    seqs: tuple[int, ...]  # every seq covered
    method: str  # "llm" | "extractive"
    model: str | None = None
    parts: tuple[str, ...] = ()  # keys this one was folded from
    created_at: float = 0.0
    stored: bool = True  # False: made for one request only (a span that can never be reused)

    def to_value(self) -> dict[str, Any]:
        return {
            "level": self.level, "text": self.text, "tokens": self.tokens, "encoding": self.encoding,
            "first": self.first, "last": self.last, "seqs": list(self.seqs), "method": self.method,
            "model": self.model, "parts": list(self.parts), "created_at": self.created_at,
        }

    @classmethod
    def from_value(cls, key: str, value: dict[str, Any], seq_objects: dict[int, int] | None = None) -> Summary | None:
        """``seq_objects``: the seqs already decoded (see ``load``), reused instead of copied."""
        shared = {} if seq_objects is None else seq_objects
        try:
            return cls(
                key=key, level=str(value["level"]), text=str(value["text"]), tokens=int(value["tokens"]),
                encoding=str(value.get("encoding") or tokens.DEFAULT_ENCODING), first=int(value["first"]),
                last=int(value["last"]), seqs=tuple(shared.setdefault(s, s) for s in map(int, value.get("seqs") or ())),
                method=str(value.get("method") or "llm"), model=value.get("model"),
                parts=tuple(str(p) for p in value.get("parts") or ()), created_at=float(value.get("created_at") or 0),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def tokens_in(self, encoding: str) -> int:
        return self.tokens if encoding == self.encoding else tokens.count_text(self.text, encoding)


def make(key: str, level: str, text: str, encoding: str, seqs: Sequence[int], method: str, *,
         model: str | None = None, parts: Sequence[str] = (), stored: bool = True) -> Summary:
    return Summary(
        key=key, level=level, text=text, tokens=tokens.count_text(text, encoding), encoding=encoding,
        first=seqs[0] if seqs else -1, last=seqs[-1] if seqs else -1, seqs=tuple(seqs), method=method,
        model=model, parts=tuple(parts), created_at=time.time(), stored=stored,
    )


async def load(store: Store, tenant: str, session_id: str) -> dict[str, Summary]:
    found = {}
    # A session summary covers every seq of the segments it folds, and the context manager
    # keeps a session's summaries cached: one int object per seq, not one per summary.
    seq_objects: dict[int, int] = {}
    for key, value in await store.scan_records(tenant, KIND, session_id):
        summary = Summary.from_value(key, value, seq_objects)
        if summary is not None:
            found[key] = summary
    return found


async def save(store: Store, tenant: str, session_id: str, *summaries: Summary) -> None:
    await put_derived(store, tenant, [Record(KIND, summary.key, summary.to_value(), session_id) for summary in summaries])


async def put_derived(store: Store, tenant: str, records: Sequence[Record]) -> None:
    """Write records that can be recomputed: batched when the store batches, else at once."""
    await store.apply([Write(tenant, records=list(records))], durable=False)


async def for_admin(store: Store, tenant: str, session_id: str) -> list[dict[str, Any]]:
    """The session's summaries for the admin view: what each covers, how it was made, its text."""
    found = await load(store, tenant, session_id)
    ordered = sorted(found.values(), key=lambda s: (s.first, s.level != "session", s.last))
    return [{"key": s.key, **s.to_value()} for s in ordered]
