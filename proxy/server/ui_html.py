"""The inspector pages' building blocks: escaping, times, links, the page frame.

Recorded values are whatever clients and models sent: they pass through ``esc`` (html.escape,
quotes included) on their way into any page, attribute values included.
"""

from __future__ import annotations

import datetime
import html
from typing import Any, Iterable
from urllib.parse import quote

from proxy.config import TenantConfig


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(ts: float | None) -> str:
    if not ts:
        return "—"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def quoted(segment: str) -> str:
    """A session or user id as one URL path segment ('/' included)."""
    return quote(segment, safe="")


def frame(title: str, body: str, tenant: TenantConfig | None) -> str:
    who = ""
    if tenant is not None:
        who = (f'<span class="who">tenant <b>{esc(tenant.name)}</b></span>'
               '<form method="post" action="/ui/logout" class="inline"><button type="submit">log out</button></form>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)} · agent-state-proxy</title><link rel="stylesheet" href="/ui/static/inspector.css"></head>'
        f'<body><header><a href="/ui" class="brand">agent-state-proxy · inspector</a>{who}</header>'
        f'<main>{body}</main></body></html>'
    )


def seq_list(seqs: Iterable[int]) -> str:
    """1,2,3,5 -> '#1–#3, #5'."""
    ordered, spans = sorted(seqs), []
    for seq in ordered:
        if spans and seq == spans[-1][1] + 1:
            spans[-1][1] = seq
        else:
            spans.append([seq, seq])
    return ", ".join(f"#{a}" if a == b else f"#{a}–#{b}" for a, b in spans)


def short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
