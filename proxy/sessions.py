"""Which session a request belongs to, and per-session ordering of concurrent requests."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from proxy.errors import BadRequest, Conflict
from proxy.transcript import block_identity

MAX_SESSION_ID = 512


@dataclass(frozen=True)
class SessionRef:
    id: str
    implicit: bool
    user_id: str | None
    source: str  # header | path | metadata | codex | claude-code | previous_response | implicit | resumed
    agent: str | None = None  # the agent identity of an implicit session, when its tenant resumes


def identify(
    tenant: str,
    headers: Mapping[str, str],
    path_session: str | None,
    body: dict[str, Any],
) -> SessionRef:
    """First match wins: X-Session-ID header, /s/{id}/ path prefix, metadata.session_id, the ids
    agents send of their own (Codex CLI's session-id header; Claude Code's X-Claude-Code-Session-Id
    header and the session_id in its metadata.user_id), implicit."""
    user_id = user_id_of(headers, body)
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    claude_code = _claude_code_ids(metadata.get("user_id"))
    for source, param, value in (
        ("header", "X-Session-ID", headers.get("X-Session-ID")),
        ("path", "session_id", path_session),
        ("metadata", "metadata.session_id", metadata.get("session_id")),
        # Codex CLI names its session in a `session-id` header (also thread-id and
        # x-client-request-id): one Codex session is one proxy session, with no configuration.
        ("codex", "session-id", headers.get("session-id")),
        ("claude-code", "X-Claude-Code-Session-Id", headers.get("X-Claude-Code-Session-Id")),
        ("claude-code", "metadata.user_id", _string(claude_code.get("session_id")) if claude_code else None),
    ):
        if value is not None:
            if not isinstance(value, str):
                raise BadRequest(f"session id from {source} must be a string", code="invalid_session_id", param=param)
            return SessionRef(_clean(value, f"session id from {source}", param), False, user_id, source)
    return SessionRef(implicit_session_id(tenant, body.get("messages") or []), True, user_id, "implicit")


def user_id_of(headers: Mapping[str, str], body: dict[str, Any]) -> str | None:
    """The user a request acts for: X-User-ID header, else metadata.user_id (for Claude Code,
    whose user_id is a JSON string that differs in every session, its account or device)."""
    user_id = _clean(headers.get("X-User-ID"), "X-User-ID header", "X-User-ID")
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    claude_code = _claude_code_ids(metadata.get("user_id"))
    if user_id is None and claude_code is not None:
        user_id = _clean(_string(claude_code.get("account_uuid")) or _string(claude_code.get("device_id")), "metadata.user_id", "metadata.user_id")
    elif user_id is None and isinstance(metadata.get("user_id"), str):
        user_id = _clean(metadata["user_id"], "metadata.user_id", "metadata.user_id")
    return user_id


def _claude_code_ids(user_id: Any) -> dict[str, Any] | None:
    """The fields of Claude Code's ``metadata.user_id`` (``{"device_id", "account_uuid",
    "session_id"}`` as a JSON string), or None for a plain user id."""
    if not isinstance(user_id, str) or not user_id.startswith("{"):
        return None
    try:
        fields = json.loads(user_id)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def implicit_session_id(tenant: str, messages: list[Any]) -> str:
    """One session per conversation: tenant + system prompt + first user message."""
    system = [_stable(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    first_user = next((_stable(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    seed = repr((tenant, system[:1], first_user)).encode()
    return "implicit-" + hashlib.sha256(seed).hexdigest()[:32]


def agent_identity(tenant: str, headers: Mapping[str, str], body: dict[str, Any], user_id: str | None) -> str:
    """Who is asking, for agents that name no session: tenant + credential + system prompt +
    user + tool names. The same agent restarted has the same identity; two agents with other
    prompts or tools never share one."""
    messages = body.get("messages") or []
    system = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    tools = sorted(str(((t.get("function") or {}) if isinstance(t, dict) else {}).get("name")) for t in body.get("tools") or [])
    credential = hashlib.sha256(headers.get("Authorization", "").encode("utf-8", "surrogateescape")).hexdigest()
    seed = repr((tenant, credential, system[:1], user_id, tools)).encode("utf-8", "surrogatepass")
    return "agent-" + hashlib.sha256(seed).hexdigest()[:32]


def _stable(content: Any) -> Any:
    """Content without what moves between requests of one conversation (cache breakpoints)."""
    return [block_identity(b) for b in content] if isinstance(content, list) else content


def strip_proxy_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Remove what only the proxy reads before the body goes upstream."""
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and ({"session_id", "user_id"} & metadata.keys()):
        rest = {k: v for k, v in metadata.items() if k not in ("session_id", "user_id")}
        body = dict(body)
        if rest:
            body["metadata"] = rest
        else:
            body.pop("metadata")
    return body


def _clean(value: str | None, what: str, param: str) -> str | None:
    if value is None:
        return None
    if not value or len(value) > MAX_SESSION_ID or not value.isprintable():
        raise BadRequest(f"{what} must be 1-{MAX_SESSION_ID} printable characters", code="invalid_session_id", param=param)
    return value


class SessionLocks:
    """Serialise requests of one session, or refuse the second with 409, per tenant choice."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._users: dict[tuple[str, str], int] = {}

    def hold(self, tenant: str, session_id: str, refuse_when_busy: bool) -> _Held:
        return _Held(self, (tenant, session_id), refuse_when_busy)

    def busy(self, tenant: str, session_id: str) -> bool:
        return (tenant, session_id) in self._locks


class _Held:
    def __init__(self, owner: SessionLocks, key: tuple[str, str], refuse: bool) -> None:
        self._owner, self._key, self._refuse = owner, key, refuse

    async def __aenter__(self) -> None:
        owner, key = self._owner, self._key
        lock = owner._locks.get(key)
        if lock is None:
            lock = owner._locks[key] = asyncio.Lock()
        if self._refuse and lock.locked():
            raise Conflict("another request of this session is in progress; retry when it completes")
        owner._users[key] = owner._users.get(key, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._owner._locks[self._key].release()
        self._release_user()

    def _release_user(self) -> None:
        owner, key = self._owner, self._key
        owner._users[key] -= 1
        if owner._users[key] == 0:
            # Forget idle sessions' locks so a long-running proxy does not accumulate them.
            del owner._users[key]
            del owner._locks[key]
