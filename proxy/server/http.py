"""HTTP helpers: OpenAI-shaped errors, JSON bodies, tenant authentication."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Config, TenantConfig
from proxy.storage.base import StorageError
from proxy.errors import BadRequest, PayloadTooLarge, ProxyError, Unauthorized

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


async def read_json(request: web.Request, limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    raw = await request.read()
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    if not raw:
        raise BadRequest("request body is empty; expected JSON", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def authenticate(config: Config, request: web.Request) -> TenantConfig:
    """The tenant a request acts for: its proxy key, or the open tenant for local clients.

    An unknown key from an address an open tenant admits is treated as anonymous, because
    agents that only changed their base URL still send whatever OPENAI_API_KEY they had.
    """
    header = request.headers.get("Authorization", "")
    # x-api-key: how the Anthropic SDKs send a key (Claude Code sends ANTHROPIC_AUTH_TOKEN as a bearer).
    key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "").strip()
    if key:
        tenant = config.tenant_for_key(key)
        if tenant is not None:
            return tenant
    tenant = config.anonymous_tenant(request.remote)
    if tenant is not None:
        return tenant
    if key:
        raise Unauthorized("incorrect proxy API key provided")
    raise Unauthorized("missing proxy API key: send 'Authorization: Bearer <key>'")
