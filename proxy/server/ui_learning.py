"""The inspector's HTML for learned memories: a session's extraction runs and what they
extracted from which turns, the memories injected into each request, and a user's page with
their memories and supersession chains. The data are proxy/memory/audit.py's views, the same the
JSON route `/admin/memory/extractions` returns; every value is escaped (``esc``).
"""

from __future__ import annotations

from typing import Any, Callable

from proxy.config import TenantConfig
from proxy.records import Session
from proxy.server.ui_html import esc, frame, quoted, seq_list, short, when

_STATUS = {
    "live": "live",
    "expired": "expired: past its type's TTL, no longer recalled, erased at the next sweep",
    "erased": "erased: expired and swept, deleted, or the session it was kept in erased",
    "gone": "gone: superseded, expired and swept, or erased since",
    "not_looked_up": "not looked up: this session injected too many distinct memories to show each",
}

# Where a memory id links to on the page being rendered (None: shown without a link).
Linker = Callable[[str], "str | None"]


def user_href(user_id: str) -> str:
    return f"/ui/users/{quoted(user_id)}"


def _session_href(session_id: str, seq: int | None = None) -> str:
    return f"/ui/sessions/{quoted(session_id)}" + (f"#m{seq}" if seq is not None else "")


# -- a session's page ----------------------------------------------------------------------------


def linker(view: dict[str, Any] | None, user_id: str | None) -> Linker:
    """Where a session page links a memory id: its card on the page, else the user's page."""
    return _linker({m["id"] for m in [*view["memories"], *view["superseded"]]} if view else set(), user_id)


def session_section(view: dict[str, Any] | None, note: str | None, s: Session, link: Linker) -> str:
    """The session's extraction runs and the memories they extracted (``view`` is
    audit.session_view; ``note`` says why there is none)."""
    head = '<section id="learned"><h2>Learned memories</h2>'
    user = (f'<p>All memories learned about user <a class="user-link" href="{esc(user_href(s.user_id))}">{esc(s.user_id)}</a>.</p>'
            if s.user_id else "")
    if view is None:
        return f'{head}{user}<p class="empty">{esc(note)}</p></section>'
    runs, memories = view["extraction_runs"], view["memories"]
    if not runs:
        return (f'{head}{user}<p class="empty">No extraction has run on this session (extraction is off, the session has '
                'not been quiet for 2 s yet, or it was recorded before extraction was turned on).</p></section>')
    rows = "".join(_run_row(run, link) for run in runs)
    table = ('<table class="runs"><thead><tr><th>when</th><th>by</th><th>turns read</th><th>added</th><th>merged</th>'
             f'<th>superseded</th><th>attempts</th></tr></thead><tbody>{rows}</tbody></table>')
    cards = "".join(_card(m, s.id, link) for m in memories) or '<li class="empty">None: the runs found nothing to keep.</li>'
    replaced = [m for m in view["superseded"] if m["id"] not in {x["id"] for x in memories}]
    older = ('<h3>What they superseded</h3><ul class="memories">' + "".join(_card(m, s.id, link) for m in replaced) + '</ul>'
             if replaced else "")
    return (f'{head}{user}<p class="hint">Extraction runs in the background once the session is quiet: each run reads the '
            'turns since the last one and adds, merges or supersedes memories of the user (of the session, without a user id).</p>'
            f'<h3>Extraction runs</h3>{table}<h3>Memories extracted here</h3><ul class="memories">{cards}</ul>{older}</section>')


def _run_row(run: dict[str, Any], link: Linker) -> str:
    seqs = [s for s in run.get("seqs") or [] if isinstance(s, int)]
    if len(seqs) > 20:  # a long run: its ranges, linked to its first turn
        turns = f'<a class="turn-link" href="#m{seqs[0]}">{esc(seq_list(seqs))}</a>'
    else:
        turns = ", ".join(f'<a class="turn-link" href="#m{s}">#{s}</a>' for s in seqs) or "—"
    pairs = [p for p in run.get("superseded") or [] if isinstance(p, list) and len(p) == 2]
    superseded = "<br>".join(f'{_ref(old, link)} by {_ref(new, link)}' for old, new in pairs) or "—"
    attempts = esc(run.get("attempts"))
    if run.get("error"):
        attempts += f' <span class="badge outcome" title="{esc(run.get("error"))}">last error: {esc(short(str(run.get("error")), 80))}</span>'
    if run.get("over_quota"):
        attempts += f' <span class="badge outcome">{esc(run.get("over_quota"))} over quota</span>'
    return (f'<tr class="run"><td>{when(run.get("at"))}</td><td>{esc(run.get("by"))}</td><td>{turns}</td>'
            f'<td>{_refs(run.get("added"), link)}</td><td>{_refs(run.get("merged"), link)}</td><td>{superseded}</td><td>{attempts}</td></tr>')


def injected(entry: dict[str, Any] | None, memory_ids: list[str], note: str | None, session_id: str, link: Linker) -> str:
    """The memories injected into one request, under the answer that recorded them (``entry``:
    one of audit.session_view's ``injected``; None with ``note`` when memory is off or loading)."""
    items = []
    described = {m["id"]: m for m in (entry or {}).get("memories") or []}
    for memory_id in memory_ids:
        found = described.get(memory_id)
        if found is None:
            items.append(f'<li><code>{esc(memory_id)}</code>: <i>{esc(note or "not looked up")}</i></li>')
            continue
        status = found.get("status")
        if found.get("content") is None:
            items.append(f'<li><code>{esc(memory_id)}</code> {_badge(status)}</li>')
            continue
        origin = ""
        if found.get("seq") is not None and found.get("session_id"):  # a recorded message
            target = f'#m{found["seq"]}' if found["session_id"] == session_id else _session_href(found["session_id"], found["seq"])
            origin = f' from <a href="{esc(target)}">{esc(found["session_id"])} #{esc(found["seq"])}</a>'
        elif found.get("extracted"):
            origin = " extracted" + _sources(found["extracted"].get("sources") or [], session_id)
        elif found.get("session_id"):
            origin = f' of session {esc(found["session_id"])}'
        ref = _ref(memory_id, link) if "extracted" in found else f"<code>{esc(memory_id)}</code>"  # only extracted ones have cards
        items.append(f'<li class="injected-memory">{ref} <span class="badge type">{esc(found.get("type"))}</span>'
                     f'{_badge(status, found.get("superseded_by"), link)}{origin}, {when(found.get("created_at"))}: '
                     f'<span class="memory-text">{esc(short(str(found.get("content")), 300))}</span></li>')
    return (f'<details class="injected" open><summary>{len(memory_ids)} memories injected into this request</summary>'
            '<p class="hint">Relevance scores are not recorded; status is as of now.</p>'
            f'<ul>{"".join(items)}</ul></details>')


# -- a user's page -------------------------------------------------------------------------------


def user_page(tenant: TenantConfig, user_id: str, view: dict[str, Any] | None, note: str | None, sessions: list[Session]) -> str:
    """A user's extracted memories (audit.user_view), their supersession chains, and sessions."""
    body = [f'<p><a href="/ui">← all sessions</a></p><h1>User <span class="sid">{esc(user_id)}</span></h1>']
    listed = "".join(f'<li><a href="{esc(_session_href(s.id))}">{esc(s.id)}</a> · last active {when(s.last_active)}</li>'
                     for s in sorted(sessions, key=lambda s: s.last_active, reverse=True))
    body.append(f'<section><h2>Sessions</h2><ul class="user-sessions">{listed}</ul></section>' if listed
                else '<section><h2>Sessions</h2><p class="empty">None recorded.</p></section>')
    if view is None:
        body.append(f'<section><h2>Learned memories</h2><p class="empty">{esc(note)}</p></section>')
        return frame(f"User {user_id}", "".join(body), tenant)
    memories, superseded = view["memories"], view["superseded"]
    known = {m["id"]: m for m in [*superseded, *memories]}
    link = _linker(set(known), None)
    cards = "".join(_card(m, None, link) for m in sorted(memories, key=lambda m: m.get("created_at") or 0, reverse=True))
    body.append('<section id="memories"><h2>Current memories</h2><p class="hint">Extracted from the user\'s turns; '
                'recalled into later requests while live.</p>' +
                (f'<ul class="memories">{cards}</ul>' if cards else '<p class="empty">No live extracted memories.</p>') + '</section>')
    chains = "".join(
        '<li><ol class="chain">' + "".join(
            f'<li>{_ref(i, link)} {_badge(known[i]["status"], known[i].get("superseded_by"), link)} '
            f'<span class="memory-text">{esc(short(str(known[i].get("content")), 200))}</span></li>' for i in chain) + '</ol></li>'
        for chain in view["chains"])
    body.append('<section id="chains"><h2>Supersession chains</h2><p class="hint">Newest first: each memory replaced the one '
                'below it, which is kept for audit and never recalled again.</p>' +
                (f'<ul class="chains">{chains}</ul>' if chains else '<p class="empty">Nothing was superseded.</p>') + '</section>')
    old = "".join(_card(m, None, link) for m in superseded)
    body.append('<section id="superseded"><h2>Superseded memories</h2>' +
                (f'<ul class="memories">{old}</ul>' if old else '<p class="empty">None.</p>') + '</section>')
    return frame(f"User {user_id}", "".join(body), tenant)


def user_not_found(tenant: TenantConfig, user_id: str) -> str:
    return frame("Not found", f'<h1>No user “{esc(user_id)}”</h1><p>No session or memory of this tenant belongs to it. '
                              '<a href="/ui">All sessions</a></p>', tenant)


# -- shared pieces -------------------------------------------------------------------------------


def _linker(on_page: set[str], user_id: str | None) -> Linker:
    """Memories shown on the page link to their card; others to the user's page when there is one."""
    def link(memory_id: str) -> str | None:
        if memory_id in on_page:
            return f"#mem-{memory_id}"
        return f"{user_href(user_id)}#mem-{memory_id}" if user_id else None
    return link


def _ref(memory_id: Any, link: Linker) -> str:
    target = link(str(memory_id))
    return f'<a class="memory-ref" href="{esc(target)}"><code>{esc(memory_id)}</code></a>' if target else f"<code>{esc(memory_id)}</code>"


def _refs(ids: Any, link: Linker) -> str:
    return ", ".join(_ref(i, link) for i in ids or []) or "—"


def _badge(status: Any, superseded_by: Any = None, link: Linker | None = None) -> str:
    if status == "superseded":
        by = _ref(superseded_by, link) if link is not None else f"<code>{esc(superseded_by)}</code>"
        return f' <span class="badge status-superseded">superseded by {by}</span>'
    label = _STATUS.get(str(status), str(status))
    return f' <span class="badge status-{esc(status)}" title="{esc(label)}">{esc(str(status).replace("_", " "))}</span>'


def _sources(sources: list[Any], session_id: str | None) -> str:
    """' from #1–#2; from session s1 #4': the turns a memory was extracted from, linked."""
    parts = []
    for source in sources:
        if not isinstance(source, dict) or not isinstance(source.get("session"), str):
            continue
        seqs = [s for s in source.get("seqs") or [] if isinstance(s, int)]
        if source["session"] == session_id:
            turns = ", ".join(f'<a class="source-turn" href="#m{s}">#{s}</a>' for s in seqs)
            parts.append(f"turns {turns}" if turns else "this session")
        else:
            turns = ", ".join(f'<a class="source-turn" href="{esc(_session_href(source["session"], s))}">#{s}</a>' for s in seqs)
            parts.append(f'session <a class="source-session" href="{esc(_session_href(source["session"]))}">{esc(source["session"])}</a>'
                         + (f" turns {turns}" if turns else ""))
    return (" from " + "; ".join(parts)) if parts else ""


def _card(m: dict[str, Any], session_id: str | None, link: Linker) -> str:
    """One extracted memory: id, type, status, text, the turns it came from, what it superseded."""
    status, extracted = m.get("status"), m.get("extracted") or {}
    if m.get("content") is None:  # erased: only its id is left
        return f'<li id="mem-{esc(m["id"])}" class="memory status-{esc(status)}"><code>{esc(m["id"])}</code>{_badge(status)}</li>'
    kind = (m.get("metadata") or {}).get("kind")
    meta = [f'<code>{esc(m["id"])}</code> <span class="badge type">{esc(m.get("type"))}</span>{_badge(status, m.get("superseded_by"), link)}'
            + (f' <span class="badge tag">{esc(kind)}</span>' if kind else "")]
    if extracted.get("by"):
        meta.append(f'by {esc(extracted["by"])}')
    meta.append(when(m.get("created_at")))
    if m.get("valid_to"):
        meta.append(f"valid until {when(m.get('valid_to'))}")
    if extracted.get("subject"):
        meta.append(f'subject <code>{esc(extracted["subject"])}</code>')
    supersedes = extracted.get("supersedes") or []
    replaced = f'<div class="supersedes">supersedes {_refs(supersedes, link)}</div>' if supersedes else ""
    return (f'<li id="mem-{esc(m["id"])}" class="memory status-{esc(status)}"><div class="meta">{" · ".join(meta)}</div>'
            f'<pre class="content memory-text">{esc(m.get("content"))}</pre>'
            f'<div class="sources">extracted{_sources(extracted.get("sources") or [], session_id) or " (sources not recorded)"}</div>'
            f'{replaced}</li>')
