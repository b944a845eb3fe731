"""aiohttp's own HTTP-level errors (the request could not be parsed) as OpenAI-shaped JSON.

aiohttp answers a request it cannot parse (an over-long request line or header, a control
character in a header, bytes that are not HTTP) before any handler or middleware runs: plain
text that quotes the offending input, and a traceback in the log. A client gets the proxy's
error shape instead, the log one warning line, and neither quotes what was sent.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidHeader, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("agent_state_proxy.server")

# What the client is told, by aiohttp's exception class (never the parser's message: it quotes the input).
_MESSAGES: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "the request line or a header is longer than the proxy accepts"),
    (InvalidHeader, "a header name or value is invalid"),
    (BadHttpMethod, "the request line is not HTTP"),
    (BadStatusLine, "the request line is invalid"),
)


def _describe(exc: BaseException | None) -> str:
    for kind, message in _MESSAGES:
        if isinstance(exc, kind):
            return message
    return "the request is not valid HTTP/1.1"


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's per-connection protocol with ``handle_error`` answering in the proxy's shape."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: a response already started cannot be replaced
            raise ConnectionError("response already started; cannot send the error")
        if isinstance(exc, HttpProcessingError):
            # One line, the exception's class only: the parser's own message quotes the input.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING  # port scanners, TLS probes
            log.log(level, "malformed HTTP request from %s: %s (answered %d)", request.remote, type(exc).__name__, status)
            error = {"message": f"malformed HTTP request: {_describe(exc)}", "type": "invalid_request_error",
                     "code": "invalid_http_request", "param": None}
        else:  # a handler failure that escaped the error middleware: the operator needs the traceback
            self.log_exception("unhandled error on %s", request.remote, exc_info=exc)
            error = {"message": "internal error" if status >= 500 else "request failed", "type": "server_error",
                     "code": "internal_error" if status == 500 else None, "param": None}
        response = web.Response(status=status, body=orjson.dumps({"error": error}), content_type="application/json")
        response.force_close()
        return response


    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After the handler answered a body it could not read (400 invalid_body), aiohttp reads
        # the rest of that body, fails the same way and would log it as an unhandled exception.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            log.debug("discarded the rest of an unreadable request body")
            return
        super().log_exception(*args, **kw)


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer HTTP parse errors with JSON (see the module doc)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no public hook for the protocol class: the server the app built is given
        # the subclass whose only change is which protocol it creates for a connection.
        server.__class__ = _JsonErrorsServer
        return server
