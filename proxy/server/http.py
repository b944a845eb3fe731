"""HTTP helpers: OpenAI-shaped errors, JSON bodies, tenant authentication."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Config, TenantConfig
from proxy.server import keys
from proxy.errors import BadRequest, NotFound, PayloadTooLarge, ProxyError, StoreUnusable, Unauthorized
from proxy.storage.base import InvalidWrite, StorageError, StoreDamaged
from proxy.server.access_log import note_tenant
from proxy.validate import check_depth, message_count, too_many_messages

log = logging.getLogger("agent_state_proxy.server")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(error: ProxyError) -> web.Response:
    return json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error; never a traceback to the client."""
    try:
        return await handler(request)
    except ProxyError as error:
        return error_response(error)
    except StoreDamaged as exc:
        return error_response(store_damaged(str(exc)))
    except InvalidWrite as exc:  # what the client sent can never be stored: its fault, nothing was written
        return error_response(BadRequest(f"the request cannot be stored: {exc}", code="invalid_value"))
    except StorageError as exc:
        log.critical("storage failure on %s %s: %s", request.method, request.path, exc)
        return error_response(ProxyError("the proxy could not persist state; nothing was acknowledged", status=503, code="storage_error"))
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge("request body is larger than the configured limit"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        error = ProxyError(exc.reason or "error", status=exc.status, type=kind, code=code)
        return error_response(error)
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error (incident %s) on %s %s", incident, request.method, request.path)
        return error_response(ProxyError(f"internal error (incident {incident})", code="internal_error"))


def store_damaged(reason: str) -> StoreUnusable:
    return StoreUnusable(f"the proxy's state store is damaged and it cannot serve until an operator repairs it ({reason})")


def refuse_if_damaged(request: web.Request, tenant: TenantConfig) -> None:
    """A turn of a stateful tenant is never written to a damaged store (every protocol's route)."""
    if not tenant.stateless and (damage := request.app[keys.STORE].damage()) is not None:
        raise store_damaged(damage)


async def read_json(request: web.Request, limit: int, max_messages: int | None = None) -> Any:
    """The body as JSON (400/413 otherwise). With ``max_messages`` (a chat body), more messages
    than that are a 413, decided without parsing on this process's event loop: a large body is
    counted in the probe process first (body_probe), and a smaller one is counted right after
    its parse, on the worker thread, where it is also freed."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    raw = await _read_body(request)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    if not raw:
        raise BadRequest("request body is empty; expected JSON", code="invalid_json")
    if max_messages is not None and len(raw) > _PROBE_BYTES:
        count = await request.app[keys.BODY_PROBE].message_count(raw)
        if count is not None and count > max_messages:
            raise too_many_messages(count, max_messages)
    if len(raw) > _PARSE_INLINE_BYTES:  # a parse of megabytes would stall the loop: elsewhere
        return await asyncio.to_thread(parse_json, raw, max_messages)
    return parse_json(raw, max_messages)


# Bodies up to this size are parsed on the event loop: a typical chat request is far smaller and
# cheap to parse (docs/SECURITY.md, Measurements).
_PARSE_INLINE_BYTES = 256 * 1024
# Chat bodies over this size are counted in the probe process before they are parsed here (orjson
# holds the GIL for the whole parse, even on a worker thread). A valid body this large is rare; it
# pays the probe's parse on top of its own.
_PROBE_BYTES = 1024 * 1024


def parse_json(raw: bytes, max_messages: int | None = None) -> Any:
    """A request body as JSON, nested at most validate.MAX_DEPTH levels; 400 otherwise; with
    ``max_messages``, a chat body holding more messages is a 413 (checked first: it is cheaper)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if max_messages is not None:
        message_count(value, max_messages)
    check_depth(value)  # before anything hashes, counts or stores it
    return value


async def _read_body(request: web.Request) -> bytes:
    """The whole body, within the configured time: a client that never finishes sending (a
    chunked body without its last chunk) gets a 408 instead of holding the connection."""
    timeout = request.app[keys.CONFIG].body_read_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        log.warning("request body on %s %s not received within %gs", request.method, request.path, timeout)
        raise ProxyError(f"the request body was not received within {timeout:g} seconds", status=408,
                         type="invalid_request_error", code="request_timeout", headers={"Connection": "close"}) from None
    except web.RequestPayloadError as exc:  # a body that contradicts its Content-Encoding or framing
        log.warning("unreadable request body on %s %s: %s", request.method, request.path, type(exc.__cause__ or exc).__name__)
        raise BadRequest("the request body could not be read (it does not match its Content-Encoding or Transfer-Encoding)",
                         code="invalid_body", headers={"Connection": "close"}) from None


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def is_operator(config: Config, request: web.Request) -> bool:
    """Whether the request carries an operator key (server.operator_key_sha256)."""
    return config.is_operator_key(_bearer(request))


def admin_tenant(config: Config, request: web.Request) -> TenantConfig:
    """The tenant an admin request acts for: the key's tenant, or for an operator key the
    tenant named by the ``X-Tenant`` header."""
    if is_operator(config, request):
        name = request.headers.get("X-Tenant")
        if not name:
            raise BadRequest("an operator key acts for the tenant named by the 'X-Tenant' header", code="tenant_required")
        tenant = config.tenants.get(name)
        if tenant is None:
            raise NotFound(f"no tenant '{name}'", code="tenant_not_found")
        return tenant
    return authenticate(config, request)


def authenticate(config: Config, request: web.Request) -> TenantConfig:
    """The tenant a request acts for: its proxy key, or an open tenant for a client it admits.

    A key that matches no tenant is 401 from anywhere, loopback included, once any tenant has
    keys: a mistyped team key must not land silently in the open tenant. While no tenant has
    keys (the embedded defaults), or where an open tenant sets ``ignore_client_keys: true``, the
    open tenant admits it: the SDKs insist on sending some key and agents that only changed their
    base URL send their old OpenAI key. That key is ignored, never stored or forwarded.
    """
    # x-api-key: how the Anthropic SDKs send a key (Claude Code sends ANTHROPIC_AUTH_TOKEN as a bearer).
    key = _bearer(request) or request.headers.get("x-api-key", "").strip()
    if key:
        tenant = config.tenant_for_key(key)
        if tenant is not None:
            note_tenant(request, tenant.name)
            return tenant
    tenant = config.anonymous_tenant(request.remote)
    if tenant is not None and (not key or config.ignores_unknown_key(tenant)):
        note_tenant(request, tenant.name)
        return tenant
    if key:
        raise Unauthorized("incorrect proxy API key provided")
    raise Unauthorized("missing proxy API key: send 'Authorization: Bearer <key>'")
