"""Cursor pagination of admin listings: newest first, an opaque cursor, a bounded page size."""

from __future__ import annotations

import base64
import binascii
import heapq
from typing import Sequence

import orjson

from proxy.errors import BadRequest
from proxy.records import Session

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise BadRequest(f"'limit' must be an integer between 1 and {MAX_LIMIT}", code="invalid_limit")
    return value


def _position(session: Session) -> tuple[float, str]:
    return (-session.last_active, session.id)  # newest first; the id breaks ties


def encode_cursor(session: Session) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([session.last_active, session.id])).decode().rstrip("=")


def decode_cursor(raw: str) -> tuple[float, str]:
    """The position a cursor names; a 400 for anything this module did not write."""
    try:
        last_active, session_id = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if isinstance(last_active, bool) or not isinstance(last_active, (int, float)) or not isinstance(session_id, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise BadRequest("'after' is not a cursor this proxy returned (use next_cursor)", code="invalid_cursor") from None
    return (-float(last_active), session_id)


def newest_first(sessions: Sequence[Session], size: int, after: tuple[float, str] | None) -> tuple[list[Session], str | None]:
    """The page after ``after`` and the cursor of the next page (None on the last page).

    A session active again between two pages moves to the front and is not repeated; the
    listing is a snapshot per page, not a consistent read of the whole tenant.
    """
    ordered = heapq.nsmallest(size + 1, (s for s in sessions if after is None or _position(s) > after), key=_position)
    page = ordered[:size]
    return page, encode_cursor(page[-1]) if len(ordered) > size else None
