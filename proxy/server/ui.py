"""The session inspector's routes (/ui): login by tenant key, the sessions list, one session,
one user's learned memories.

The key is exchanged once for a random token held server-side; the cookie carries only the
token (HttpOnly, SameSite=Strict), never the key, and the key travels in a POST body, never
in a URL that could be logged. The open local tenant needs no key from the clients it admits.
Pages are rendered on the server (proxy/server/ui_pages.py, ui_learning.py); no JavaScript runs.
What was learned comes from proxy/memory/audit.py, like the JSON route /admin/memory/extractions.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from proxy.config import TenantConfig
from proxy.context import summaries as context_summaries
from proxy.memory import audit
from proxy.memory.service import MemoryService
from proxy.server import keys, ui_learning, ui_pages
from proxy.server.access_log import note_tenant
from proxy.transcript import active_path

COOKIE = "asp_inspector"
LOGIN_TTL = 12 * 3600.0  # seconds a login lasts
MAX_LOGINS = 10_000  # tokens kept at most; the oldest go first
PAGE_SIZE = 25
TIMELINE_REQUESTS = 200  # requests on a session page's timeline unless ?all=1 (a long session's page stays small)
STATIC = Path(__file__).parent / "ui_static"
# No script may run at all, so content that slipped past escaping still could not act.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Logins:
    """Inspector logins: random token -> (tenant name, expiry). In memory: a restart logs out."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}

    def issue(self, tenant: str) -> str:
        now = self.clock()
        for token in [t for t, (_, expires) in self._tokens.items() if expires <= now]:
            del self._tokens[token]
        while len(self._tokens) >= MAX_LOGINS:
            del self._tokens[next(iter(self._tokens))]
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (tenant, now + LOGIN_TTL)
        return token

    def tenant(self, token: str | None) -> str | None:
        found = self._tokens.get(token or "")
        if found is None or found[1] <= self.clock():
            return None
        return found[0]

    def revoke(self, token: str | None) -> None:
        self._tokens.pop(token or "", None)


LOGINS = web.AppKey("inspector_logins", Logins)


def setup_ui_routes(app: web.Application) -> None:
    app[LOGINS] = Logins()
    app.router.add_get("/ui", sessions_page)
    app.router.add_get("/ui/", sessions_page)
    app.router.add_get("/ui/login", login_page)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/ui/sessions/{session_id}", session_page)
    app.router.add_get("/ui/users/{user_id}", user_page)
    app.router.add_static("/ui/static", STATIC)


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers=_HEADERS | {"Location": location})


def _viewer(request: web.Request) -> TenantConfig | None:
    """The tenant this browser may inspect: its login, else the open tenant for its address."""
    config = request.app[keys.CONFIG]
    name = request.app[LOGINS].tenant(request.cookies.get(COOKIE))
    tenant = config.tenants.get(name) if name else None
    if tenant is None:
        tenant = config.anonymous_tenant(request.remote)
    if tenant is not None:
        note_tenant(request, tenant.name)
    return tenant


async def login_page(request: web.Request) -> web.Response:
    return _html(ui_pages.login(None, _viewer(request)))


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    key = form.get("key")
    tenant = request.app[keys.CONFIG].tenant_for_key(key) if isinstance(key, str) and key else None
    if tenant is None:
        return _html(ui_pages.login("That key is not a proxy key of any tenant.", _viewer(request)), status=401)
    note_tenant(request, tenant.name)
    request.app[LOGINS].revoke(request.cookies.get(COOKIE))
    response = _redirect("/ui")
    response.set_cookie(COOKIE, request.app[LOGINS].issue(tenant.name), path="/ui", httponly=True, samesite="Strict",
                        max_age=int(LOGIN_TTL), secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    request.app[LOGINS].revoke(request.cookies.get(COOKIE))
    response = _redirect("/ui/login")
    response.del_cookie(COOKIE, path="/ui")
    return response


async def sessions_page(request: web.Request) -> web.Response:
    tenant = _viewer(request)
    if tenant is None:
        return _redirect("/ui/login")
    query = request.query.get("q", "").strip()[:200]
    try:
        page = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page = 1
    sessions = await request.app[keys.STORE].list_sessions(tenant.name)
    if query:
        needle = query.lower()
        sessions = [s for s in sessions if needle in s.id.lower() or needle in (s.user_id or "").lower()]
    sessions.sort(key=lambda s: s.last_active, reverse=True)
    pages = max(1, -(-len(sessions) // PAGE_SIZE))
    page = min(page, pages)
    shown = sessions[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]

    def link(number: int) -> str:
        return "/ui?" + urlencode({"q": query, "page": number} if query else {"page": number})

    return _html(ui_pages.sessions(tenant, shown, query, page, pages, len(sessions), link))


async def session_page(request: web.Request) -> web.Response:
    tenant = _viewer(request)
    if tenant is None:
        return _redirect("/ui/login")
    store, session_id = request.app[keys.STORE], request.match_info["session_id"]
    session = await store.get_session(tenant.name, session_id)
    if session is None:
        return _html(ui_pages.not_found(tenant, session_id), status=404)
    messages = await store.get_messages(tenant.name, session_id)
    active = {m.seq for m in active_path(messages, session.head)}
    summaries = await context_summaries.for_admin(store, tenant.name, session_id)
    forks = sorted((s.id for s in await store.list_sessions(tenant.name)
                    if (s.extra.get("forked_from") or {}).get("session") == session_id))
    service, note = _memory(request, tenant)
    learned = await audit.session_view(service, tenant.name, session_id) if service is not None else None
    newest = None if request.query.get("all") == "1" else TIMELINE_REQUESTS
    return _html(ui_pages.session(tenant, session, messages, active, summaries, forks, learned, note, newest))


async def user_page(request: web.Request) -> web.Response:
    tenant = _viewer(request)
    if tenant is None:
        return _redirect("/ui/login")
    user_id = request.match_info["user_id"]
    sessions = [s for s in await request.app[keys.STORE].list_sessions(tenant.name) if s.user_id == user_id]
    service, note = _memory(request, tenant)
    view = await audit.user_view(service, tenant.name, user_id) if service is not None else None
    if not sessions and not (view and (view["memories"] or view["superseded"])):
        return _html(ui_learning.user_not_found(tenant, user_id), status=404)
    return _html(ui_learning.user_page(tenant, user_id, view, note, sessions))


def _memory(request: web.Request, tenant: TenantConfig) -> tuple[MemoryService | None, str | None]:
    """The memory service when the tenant's long-term memory is on and loaded; else None and
    what the page says instead."""
    service = request.app[keys.PIPELINE].memory
    if tenant.stateless or not tenant.memory.enabled or service is None or tenant.name not in service.tenants:
        return None, "Long-term memory is off for this tenant."
    if not service.tenants[tenant.name].ready.is_set():
        return None, "Long-term memory is still loading; reload the page shortly."
    return service, None
