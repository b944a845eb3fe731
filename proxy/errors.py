"""The proxy's error classes; the server renders each as an OpenAI-shaped error body."""

from __future__ import annotations

import re
from typing import Any

_SECRET_PATTERNS = [
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"),
    re.compile(r"(?i)(api[_-]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{4,}"),
]


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys from a message that may reach a client or a log."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", text)
    return text


class ProxyError(Exception):
    """An error the client should see, with the HTTP status and OpenAI error type to use."""

    status = 500
    type = "server_error"
    code: str | None = None
    param: str | None = None  # the request field at fault, when one is

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, as OpenAI names it ("messages[2].content")
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.headers = headers or {}
        if param is not None:
            self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "session_busy"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class NotReady(ProxyError):
    status = 503
    type = "server_error"
    code = "not_ready"


class StoreUnusable(ProxyError):
    """The store is damaged: nothing can be read or recorded until an operator repairs it."""

    status = 503
    type = "server_error"
    code = "store_damaged"


class UpstreamError(ProxyError):
    """The model provider failed; status mirrors what the provider said (or 502/504)."""

    type = "upstream_error"
    status = 502

    def __init__(self, message: str, *, provider_status: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.provider_status = provider_status  # what the provider answered (None: no answer)


def upstream_status(provider_status: int | None) -> int:
    """Which status the client sees for a provider's status."""
    if provider_status is None:
        return 502
    if provider_status in (400, 401, 403, 404, 408, 409, 413, 422, 429):
        # The provider rejected the request itself; 401/403 mean the proxy's upstream key is
        # wrong, which is the operator's problem, not the client's credentials.
        return 502 if provider_status in (401, 403) else provider_status
    if provider_status == 504:
        return 504
    if 500 <= provider_status < 600:
        return provider_status if provider_status in (500, 502, 503) else 502
    return 502
