"""The session inspector's HTML: plain server-rendered pages, every recorded value escaped.

Message contents are whatever clients and models sent: they pass through ``esc`` (html.escape,
proxy/server/ui_html.py) on their way into any page, attribute values included.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson

from proxy.config import TenantConfig
from proxy.records import Message, Session
from proxy.server import ui_learning
from proxy.server.ui_html import esc, frame, quoted, seq_list, short, when

_TAGS_PINNED = ("decision", "commitment", "preference", "fact")


def login(error: str | None, tenant: TenantConfig | None) -> str:
    note = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    current = (f'<p>This browser can already inspect tenant <b>{esc(tenant.name)}</b> without a key '
               '(<a href="/ui">sessions</a>).</p>') if tenant is not None else ""
    body = (
        '<h1>Log in</h1>' + current + note +
        '<form method="post" action="/ui/login" class="login">'
        '<label for="key">Tenant proxy key</label>'
        '<input id="key" name="key" type="password" autocomplete="current-password" required>'
        '<button type="submit">Log in</button></form>'
        '<p class="hint">The key is exchanged for a login cookie; the cookie never holds the key.</p>'
    )
    return frame("Log in", body, None)


def not_found(tenant: TenantConfig, session_id: str) -> str:
    return frame("Not found", f'<h1>No session “{esc(session_id)}”</h1><p><a href="/ui">All sessions</a></p>', tenant)


# -- the sessions list ---------------------------------------------------------------------------


def sessions(tenant: TenantConfig, shown: list[Session], query: str, page: int, pages: int, total: int,
             link: Callable[[int], str]) -> str:
    rows = "".join(
        '<tr class="session-row">'
        f'<td><a href="/ui/sessions/{esc(quoted(s.id))}">{esc(s.id)}</a>{" <span class=badge>fork</span>" if s.extra.get("forked_from") else ""}</td>'
        f'<td>{esc(s.user_id or "—")}</td><td>{when(s.last_active)}</td><td>{when(s.created_at)}</td>'
        f'<td class="num">{s.turns}</td><td class="num">{s.next_seq}</td><td class="num">{s.branches + 1}</td>'
        f'<td class="num">{s.prompt_tokens:,} / {s.completion_tokens:,}</td></tr>'
        for s in shown
    ) or '<tr><td colspan="8" class="empty">No sessions' + (" match this search" if query else " yet") + '.</td></tr>'
    nav = []
    if page > 1:
        nav.append(f'<a href="{esc(link(page - 1))}" rel="prev">← newer</a>')
    nav.append(f'<span>page {page} of {pages}</span>')
    if page < pages:
        nav.append(f'<a href="{esc(link(page + 1))}" rel="next">older →</a>')
    body = (
        f'<h1>Sessions <small>{total} {"matching" if query else "in all"}, newest first</small></h1>'
        '<form method="get" action="/ui" class="search" role="search">'
        f'<input name="q" value="{esc(query)}" placeholder="session or user id" aria-label="search sessions">'
        '<button type="submit">Search</button></form>'
        '<table class="sessions"><thead><tr><th>session</th><th>user</th><th>last active</th><th>created</th>'
        '<th>requests</th><th>messages</th><th>branches</th><th>tokens (prompt / completion)</th></tr></thead>'
        f'<tbody>{rows}</tbody></table><nav class="pages">{" ".join(nav)}</nav>'
    )
    return frame("Sessions", body, tenant)


# -- one session ---------------------------------------------------------------------------------


def session(tenant: TenantConfig, s: Session, messages: list[Message], active: set[int], summaries: list[dict[str, Any]],
            forks: list[str], learned: dict[str, Any] | None, memory_note: str | None, newest_requests: int | None = None) -> str:
    """The session's page; ``learned`` is proxy/memory/audit.py's session view (None, and
    ``memory_note`` says why, when long-term memory is off or loading); the timeline holds only
    its ``newest_requests`` latest requests when given."""
    body = [f'<p><a href="/ui">← all sessions</a></p><h1>Session <span class="sid">{esc(s.id)}</span></h1>']
    body.append(_facts(s, messages, forks))
    body.append('<section><h2>Tokens per request</h2>' + _chart(messages) + '</section>')
    body.append(_summaries(summaries))
    body.append(_pinned(messages, active))
    body.append(_rollbacks(s))
    link = ui_learning.linker(learned, s.user_id)
    body.append(ui_learning.session_section(learned, memory_note, s, link))
    injected = {entry["seq"]: entry for entry in (learned or {}).get("injected", [])}
    body.append(_timeline(messages, active, lambda m: ui_learning.injected(injected.get(m.seq), m.injected, memory_note, s.id, link)
                          if m.injected else "", newest_requests, s.id))
    return frame(f"Session {s.id}", "".join(body), tenant)


def _facts(s: Session, messages: list[Message], forks: list[str]) -> str:
    items = [
        ("user", f'<a class="user-link" href="{esc(ui_learning.user_href(s.user_id))}">{esc(s.user_id)}</a>' if s.user_id else "—"), ("created", when(s.created_at)), ("last active", when(s.last_active)),
        ("requests", str(s.turns)), ("messages", f"{len(messages)} ({sum(m.reverted for m in messages)} rolled back)"),
        ("branches", str(s.branches + 1)), ("tokens", f"{s.prompt_tokens:,} prompt / {s.completion_tokens:,} completion"),
        ("identified", "implicitly (from the conversation)" if s.implicit else "by the client"),
    ]
    source = s.extra.get("forked_from")
    if isinstance(source, dict):
        items.append(("forked from", f'<a href="/ui/sessions/{esc(quoted(str(source.get("session"))))}">{esc(source.get("session"))}</a>'
                                     f' at message #{esc(source.get("seq"))}'))
    if forks:
        items.append(("forks", ", ".join(f'<a href="/ui/sessions/{esc(quoted(f))}">{esc(f)}</a>' for f in forks)))
    context = s.extra.get("context")
    if isinstance(context, dict) and context.get("requests"):
        items.append(("context", f'{context.get("tokens_sent", 0):,} tokens sent of {context.get("tokens_full", 0):,} '
                                 f'({context.get("compressed", 0)} of {context.get("requests")} requests compacted)'))
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def _chart(messages: list[Message]) -> str:
    """Inline SVG bars per request: the full history's tokens, the tokens sent, the cached ones."""
    requests = [m for m in messages if m.role == "assistant" and m.usage]
    if not requests:
        return '<p class="empty">No token counts were recorded for this session\'s requests.</p>'
    series = [("full history", "full", "bar-full"), ("sent", "sent", "bar-sent"), ("cached", "cached", "bar-cached")]

    def row(usage: dict[str, int]) -> dict[str, int | None]:
        # The provider's prompt count when it gave one (the unit its cached count is in); the
        # full history adds what compaction left out, as the proxy counted it.
        sent = usage.get("prompt", usage.get("sent", 0))
        full = sent + usage["full"] - usage["sent"] if "full" in usage and "sent" in usage else None
        return {"full": full, "sent": sent, "cached": usage.get("cached")}

    values = [row(m.usage) for m in requests]
    top = max(max((v or 0) for v in row.values()) for row in values) or 1
    height, base, group = 160, 20, 54
    width = 48 + group * len(requests)
    parts = [f'<svg id="token-chart" class="chart" role="img" viewBox="0 0 {width} {height + base + 16}" width="{width}" '
             f'height="{height + base + 16}" xmlns="http://www.w3.org/2000/svg"><title>Tokens per request: full history, sent, cached</title>',
             f'<text x="2" y="12" class="axis">{top:,}</text><text x="2" y="{height + 4}" class="axis">0</text>',
             f'<line x1="40" y1="{height + 2}" x2="{width}" y2="{height + 2}" class="axis-line"/>']
    for i, (message, row) in enumerate(zip(requests, values)):
        x = 44 + i * group
        for j, (label, key, css) in enumerate(series):
            value = row[key]
            if value is None:
                continue
            h = max(1, round(value / top * (height - 14))) if value else 0
            parts.append(f'<rect class="{css}" x="{x + j * 15}" y="{height + 2 - h}" width="13" height="{h}">'
                         f'<title>request #{esc(message.seq)}: {esc(label)} {value:,} tokens</title></rect>')
        parts.append(f'<text x="{x}" y="{height + base}" class="axis">#{esc(message.seq)}</text>')
    parts.append("</svg>")
    legend = ('<p class="legend"><span class="key bar-full"></span>full history <span class="key bar-sent"></span>sent upstream '
              '<span class="key bar-cached"></span>cached by the provider · prompt tokens of each answer\'s request, as the provider '
              'counted them; the full history adds what context compaction left out</p>')
    table = "".join(
        f'<tr><td>#{m.seq}</td><td class="num">{_num(row["full"])}</td><td class="num">{_num(row["sent"])}</td>'
        f'<td class="num">{_num(row["cached"])}</td><td class="num">{_num(m.usage.get("completion"))}</td></tr>'
        for m, row in zip(requests, values))
    return (legend + '<div class="chart-box">' + "".join(parts) + '</div><details><summary>numbers</summary>'
            '<table class="numbers"><thead><tr><th>answer</th><th>full history</th><th>sent</th><th>cached</th><th>completion</th></tr></thead>'
            f'<tbody>{table}</tbody></table></details>')


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def _summaries(summaries: list[dict[str, Any]]) -> str:
    if not summaries:
        return '<section><h2>Summaries</h2><p class="empty">No summaries: the history has fit the budget so far.</p></section>'
    items = "".join(
        f'<li class="summary"><div class="meta">{esc(s.get("level"))} summary of messages #{esc(s.get("first"))}–#{esc(s.get("last"))}'
        f' ({len(s.get("seqs") or [])} messages: {esc(seq_list(s.get("seqs") or []))}) · {esc(s.get("method"))}'
        f'{" by " + esc(s.get("model")) if s.get("model") else ""} · {esc(s.get("tokens"))} tokens</div>'
        f'<pre class="content">{esc(s.get("text"))}</pre></li>'
        for s in summaries)
    return f'<section><h2>Summaries</h2><ul class="summaries">{items}</ul></section>'


def _pinned(messages: list[Message], active: set[int]) -> str:
    pinned = [m for m in messages if set(m.tags or ()) & set(_TAGS_PINNED) and not m.reverted]
    if not pinned:
        return '<section><h2>Pinned messages</h2><p class="empty">None: no message was tagged as a decision, commitment, preference or fact.</p></section>'
    items = "".join(
        f'<li><a href="#m{m.seq}">#{m.seq}</a> {esc(m.role)} <span class="tags">{esc(", ".join(m.tags or ()))}</span>'
        f'{"" if m.seq in active else " <span class=badge>other branch</span>"}: {esc(short(_text(m.body), 160))}</li>'
        for m in pinned)
    return f'<section><h2>Pinned messages</h2><p class="hint">Kept verbatim when older turns are summarized.</p><ul>{items}</ul></section>'


def _rollbacks(s: Session) -> str:
    history = s.extra.get("rollbacks") or []
    if not history:
        return ""
    items = "".join(
        f'<li>{when(r.get("ts"))}: rolled back {esc(seq_list(r.get("reverted") or []) or "nothing")}'
        f'{", to checkpoint " + esc(r.get("checkpoint")) if r.get("checkpoint") else ""}; head now #{esc(r.get("head"))}</li>'
        for r in history if isinstance(r, dict))
    return f'<section><h2>Rollbacks</h2><ul class="rollbacks">{items}</ul></section>'


def _timeline(messages: list[Message], active: set[int], injected: Callable[[Message], str],
              newest_requests: int | None, session_id: str) -> str:
    starts = [i for i, m in enumerate(messages) if i == 0 or m.request_id != messages[i - 1].request_id]
    note = ""
    if newest_requests is not None and len(starts) > newest_requests:
        first = starts[-newest_requests]
        note = (f'<p class="hint">The newest {newest_requests} of {len(starts)} requests ({len(messages) - first} of '
                f'{len(messages)} messages). <a href="/ui/sessions/{esc(quoted(session_id))}?all=1">Show all</a></p>')
        messages = messages[first:]
    out = [note, '<section><h2>Timeline</h2><p class="hint">Every recorded message in order. '
           '<span class="marker-active">●</span> marks the active path; other branches are dimmed; rolled-back messages are struck through. '
           'The request as forwarded upstream is not recorded; each request shows the recorded message bodies instead.</p>'
           '<ol class="timeline">']
    previous: Message | None = None
    request_id: str | None = None
    request_group: list[Message] = []
    for m in messages:
        if m.request_id != request_id:
            if request_id is not None:
                out.append(_request_bodies(request_group))
                out.append("</ol></li>")
            request_id, request_group = m.request_id, []
            out.append(f'<li class="request"><div class="request-head">request <code>{esc(m.request_id or "—")}</code> · {when(m.ts)}</div><ol class="messages">')
        request_group.append(m)
        out.append(_message(m, previous, m.seq in active, injected))
        previous = m
    if request_id is not None:
        out.append(_request_bodies(request_group))
        out.append("</ol></li>")
    out.append("</ol></section>")
    return "".join(out)


def _message(m: Message, previous: Message | None, on_path: bool, injected: Callable[[Message], str]) -> str:
    classes = ["msg", f"role-{esc(m.role)}", "active" if on_path else "inactive"]
    if m.reverted:
        classes.append("reverted")
    badges = ['<span class="badge marker-active" title="on the active path">● active</span>' if on_path
              else '<span class="badge branch-off">other branch</span>']
    if m.branch:
        badges.append(f'<span class="badge branch-marker">branch {m.branch}</span>')
    if m.parent is not None and (previous is None or previous.seq != m.parent):
        badges.append(f'<span class="badge fork-point">branches from <a href="#m{m.parent}">#{m.parent}</a></span>')
    if m.reverted:
        badges.append('<span class="badge rolled-back">rolled back</span>')
    if m.outcome != "ok":
        badges.append(f'<span class="badge outcome">{esc(m.outcome)}</span>')
    for tag in m.tags or ():
        badges.append(f'<span class="badge tag">{esc(tag)}</span>')
    meta = [f"#{m.seq}", esc(m.role), when(m.ts), f"{m.tokens} tokens"]
    if m.model:
        meta.append(esc(m.model))
    if m.latency_ms is not None:
        meta.append(f"{m.latency_ms:.0f} ms")
    if m.finish_reason:
        meta.append(f"finish: {esc(m.finish_reason)}")
    extra = injected(m) + _tool_calls(m.body)
    return (f'<li id="m{m.seq}" class="{" ".join(classes)}"><div class="meta">{" · ".join(meta)} {" ".join(badges)}</div>'
            f'<pre class="content">{esc(_text(m.body))}</pre>{extra}</li>')




def _tool_calls(body: dict[str, Any]) -> str:
    calls = body.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return ""
    items = "".join(
        f'<li><code>{esc((c.get("function") or {}).get("name"))}</code>({esc(short(str((c.get("function") or {}).get("arguments", "")), 400))})</li>'
        for c in calls if isinstance(c, dict))
    return f'<div class="tools">tool calls: <ul>{items}</ul></div>'


def _request_bodies(group: list[Message]) -> str:
    raw = orjson.dumps([m.body for m in group], option=orjson.OPT_INDENT_2).decode()
    return (f'<li class="raw"><details><summary>recorded bodies of this request ({len(group)} messages; '
            f'the forwarded request itself is not recorded)</summary><pre class="json">{esc(raw)}</pre></details></li>')


def _text(body: dict[str, Any]) -> str:
    content = body.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(str(part.get("text")) if part.get("type") == "text" else f"[{part.get('type', 'part')}]")
        return "\n".join(parts)
    if body.get("tool_calls"):
        return ""
    return "" if content is None else str(content)

