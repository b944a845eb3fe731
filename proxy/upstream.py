"""Calls to the model provider: litellm for any provider, direct aiohttp paths for OpenAI- and Anthropic-compatible ones.

Every provider failure leaves this module as an UpstreamError (secrets redacted); nothing
above it sees aiohttp or litellm exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import aiohttp
import orjson

from proxy import logs, protocol_fields
from proxy.config import ResolvedModel
from proxy.errors import BadRequest, UpstreamError, redact, upstream_status
from proxy.protocol_fields import CHAT_COMPLETIONS, EMBEDDINGS, Protocol

log = logging.getLogger("agent_state_proxy.upstream")


class Upstream:
    """One pooled HTTP client for the direct path; litellm imported only when first needed.

    ``http``: a ClientSession to send with instead of the pool ``start()`` opens (tests give one
    whose requests a handler function answers, tests/harness.py ``handler_upstream``); its owner
    closes it, not ``close()``.
    """

    def __init__(self, secrets: tuple[str, ...] = (), http: aiohttp.ClientSession | None = None) -> None:
        self._secrets = secrets
        self._http = http
        self._owns_http = http is None
        self._litellm: Any = None

    async def start(self) -> None:
        if self._owns_http:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=128, keepalive_timeout=30)
            self._http = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode())

    async def close(self) -> None:
        if self._http is not None and self._owns_http:
            await self._http.close()
        if self._litellm is not None:
            # litellm's logging worker runs on the loop of its first call: stopped here, or its
            # task outlives the loop (an "Event loop is closed" error at interpreter exit).
            from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

            with contextlib.suppress(Exception):
                await GLOBAL_LOGGING_WORKER.stop(discard_pending=True, timeout=2)

    # -- chat --------------------------------------------------------------------------------

    async def complete(self, route: ResolvedModel, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if route.direct:
            with self._translate(timeout):
                async with self._post(route, "/chat/completions", _payload(route, body, CHAT_COMPLETIONS), timeout) as response:
                    return await self._json_or_raise(response, route.max_response_bytes)
        litellm = await self._import_litellm()
        with self._translate(timeout):
            result = await litellm.acompletion(**_litellm_args(route, body, CHAT_COMPLETIONS, timeout))
            return _litellm_dict(result)

    async def stream(self, route: ResolvedModel, body: dict[str, Any], timeout: float) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield the provider's chunks as dicts, in batches: all the chunks that arrived together
        (one network read), so the relay writes them with one send; raises UpstreamError before
        or during the stream."""
        if route.direct:
            with self._translate(timeout):
                async with self._post(route, "/chat/completions", _payload(route, body, CHAT_COMPLETIONS), timeout) as response:
                    if response.status != 200:
                        await self._json_or_raise(response, route.max_response_bytes)
                    async for batch in _read_sse(response, route.max_response_bytes):
                        yield batch
            return
        litellm = await self._import_litellm()
        with self._translate(timeout):
            result = await litellm.acompletion(**_litellm_args(route, body, CHAT_COMPLETIONS, timeout))
            async for chunk in result:
                yield [_litellm_dict(chunk)]

    # -- Anthropic Messages ------------------------------------------------------------------

    async def anthropic(self, route: ResolvedModel, body: dict[str, Any], headers: Mapping[str, str], timeout: float,
                        path: str = "/messages") -> dict[str, Any]:
        """POST a Messages request (or count_tokens, by ``path``) to an Anthropic-compatible upstream."""
        with self._translate(timeout):
            async with self._post_anthropic(route, path, body, headers, timeout) as response:
                return await self._json_or_raise(response, route.max_response_bytes)

    async def anthropic_stream(self, route: ResolvedModel, body: dict[str, Any], headers: Mapping[str, str],
                               timeout: float) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield a Messages stream's events (every type, known or not), one list per network read."""
        with self._translate(timeout):
            async with self._post_anthropic(route, "/messages", body, headers, timeout) as response:
                if response.status != 200:
                    await self._json_or_raise(response, route.max_response_bytes)
                async for batch in _read_sse(response, route.max_response_bytes, MESSAGES_SSE):
                    yield batch

    def _post_anthropic(self, route: ResolvedModel, path: str, body: dict[str, Any], headers: Mapping[str, str], timeout: float):
        assert self._http is not None, "Upstream.start() was not awaited"
        # Only the protocol's own headers pass from the client; the key is the route's.
        sent = {"Content-Type": "application/json", "anthropic-version": headers.get("anthropic-version") or ANTHROPIC_VERSION}
        if headers.get("anthropic-beta"):
            sent["anthropic-beta"] = headers["anthropic-beta"]
        if route.api_key:
            sent["x-api-key"] = route.api_key
        base = (route.api_base or ANTHROPIC_BASE).rstrip("/")
        url = base + ("" if base.endswith("/v1") else "/v1") + path
        payload = orjson.dumps(body | {"model": anthropic_model(route)})
        return self._http.post(url, data=payload, headers=sent,
                               timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10)))

    # -- embeddings --------------------------------------------------------------------------

    async def embeddings(self, route: ResolvedModel, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if route.direct:
            with self._translate(timeout):
                async with self._post(route, "/embeddings", _payload(route, body, EMBEDDINGS), timeout) as response:
                    return await self._json_or_raise(response, route.max_response_bytes)
        litellm = await self._import_litellm()
        with self._translate(timeout):
            result = await litellm.aembedding(**_litellm_args(route, body, EMBEDDINGS, timeout))
            return _litellm_dict(result)

    # -- plumbing ----------------------------------------------------------------------------

    def _post(self, route: ResolvedModel, path: str, payload: dict[str, Any], timeout: float):
        assert self._http is not None, "Upstream.start() was not awaited"
        headers = {"Content-Type": "application/json"}
        if route.api_key:
            headers["Authorization"] = f"Bearer {route.api_key}"
        try:
            data = orjson.dumps(payload)
        except orjson.JSONEncodeError as exc:  # e.g. nested deeper than the encoder writes
            raise BadRequest(f"the request cannot be encoded for the provider: {exc}", code="invalid_body") from None
        return self._http.post(
            f"{route.api_base}{path}",
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10)),
        )

    async def _json_or_raise(self, response: aiohttp.ClientResponse, limit: int) -> dict[str, Any]:
        raw = await _read_capped(response, limit)
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        if response.status >= 400 or not isinstance(data, dict):
            message = _error_message(data) or raw[:500].decode("utf-8", "replace") or response.reason or "error"
            headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else {}
            raise UpstreamError(
                f"upstream error ({response.status}): {redact(message, self._secrets)}",
                status=upstream_status(response.status if response.status >= 400 else None),
                code=_error_code(data),
                headers=headers,
                provider_status=response.status,
            )
        return data

    def set_secrets(self, secrets: tuple[str, ...]) -> None:
        """The upstream keys to redact from errors (a configuration reload may add some)."""
        self._secrets = secrets

    @contextlib.contextmanager
    def _translate(self, timeout: float) -> Iterator[None]:
        """Turn aiohttp/litellm failures into UpstreamError, once, here, and log each one."""
        try:
            with self._translating(timeout):
                yield
        except UpstreamError as error:
            log.warning("%s", error.message, extra={"fields": {
                "event": "upstream_error", "status": error.status, "upstream_status": error.provider_status, "code": error.code}})
            raise

    @contextlib.contextmanager
    def _translating(self, timeout: float) -> Iterator[None]:
        try:
            yield
        except (UpstreamError, BadRequest):
            raise
        except asyncio.CancelledError:
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise UpstreamError(f"upstream timed out after {timeout:g}s", status=504, code="upstream_timeout") from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamError("upstream closed the stream early", status=502, code="upstream_interrupted") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"upstream unreachable: {redact(str(exc), self._secrets)}", status=502, code="upstream_unreachable"
            ) from exc
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            name = type(exc).__name__
            if "Timeout" in name:
                raise UpstreamError(f"upstream timed out after {timeout:g}s", status=504, code="upstream_timeout") from exc
            if self._litellm is None or not isinstance(exc, self._litellm_errors()):
                raise
            message = redact(str(getattr(exc, "message", exc)), self._secrets)
            headers = {}
            response = getattr(exc, "response", None)
            retry_after = getattr(getattr(response, "headers", None), "get", lambda _k: None)("retry-after")
            if retry_after:
                headers["Retry-After"] = str(retry_after)
            raise UpstreamError(
                f"upstream error ({status or name}): {message}",
                status=upstream_status(status if isinstance(status, int) else None),
                headers=headers,
                provider_status=status if isinstance(status, int) else None,
            ) from exc

    def _litellm_errors(self) -> tuple[type[BaseException], ...]:
        import openai

        return (self._litellm.exceptions.APIError, openai.APIError, self._litellm.exceptions.OpenAIError)

    async def _import_litellm(self) -> Any:
        if self._litellm is None:
            self._litellm = await asyncio.to_thread(import_litellm)
        return self._litellm


def _payload(route: ResolvedModel, body: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """The JSON body for the direct path: the protocol's fields and the tenant's passthrough
    fields, nothing else (``split`` raises on any other), with the route's upstream model name."""
    fields, extensions = protocol_fields.split(body, protocol, route.passthrough)
    return fields | extensions | {"model": route.upstream_model}


def _litellm_args(route: ResolvedModel, body: dict[str, Any], protocol: Protocol, timeout: float) -> dict[str, Any]:
    """litellm's call parameters, built from the allow-list: protocol fields become parameters
    (litellm maps them per provider); the tenant's passthrough fields travel only as JSON in
    ``extra_body``; where the call goes, with which key, and how it retries come from the route.
    A client can therefore never set fallbacks, api_base, mock_* or any other litellm parameter."""
    fields, extensions = protocol_fields.split(body, protocol, route.passthrough)
    args = {k: v for k, v in fields.items() if k != "model" and k not in protocol.not_for_litellm}
    args.update(route.params)  # the tenant's YAML: trusted
    if extensions:
        args["extra_body"] = extensions
    args.update(model=route.model, api_base=route.api_base, api_key=route.api_key, timeout=timeout, num_retries=0)
    return args


ANTHROPIC_BASE = "https://api.anthropic.com/v1"
ANTHROPIC_VERSION = "2023-06-01"


def anthropic_model(route: ResolvedModel) -> str:
    return route.model.removeprefix("anthropic/")


def speaks_anthropic(route: ResolvedModel) -> bool:
    """Whether a route's upstream takes Messages requests as they are (the direct Anthropic path)."""
    return route.model.startswith("anthropic/")


def import_litellm() -> Any:
    """Import litellm without its start-up download of the model cost map."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    with logs.importing_litellm():  # its lines go through the proxy's handler, once
        import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.drop_params = False
    return litellm


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refused (before it is all in memory) once it is over ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(limit)
    parts, size = [], 0
    async for data in response.content.iter_chunked(1 << 16):
        size += len(data)
        if size > limit:
            raise _too_large(limit)
        parts.append(data)
    return b"".join(parts)


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError(f"the upstream reply is larger than this tenant's max_response_bytes ({limit} bytes)",
                         status=502, code="upstream_response_too_large")


@dataclass(frozen=True)
class _SseFormat:
    """What differs between the providers' SSE streams; the reading is the same (_read_sse)."""

    parse: Callable[[bytes], Any]  # a data line's payload -> its event, or None to skip it; raises UpstreamError
    done: bytes | None  # a payload that ends the stream and is not an event (OpenAI's [DONE])
    is_last: Callable[[Any], bool]  # the event that completes the stream (reading goes on to the end of the body)
    missing_end: str  # named when the body ends before the stream was complete


def _chat_chunk(payload: bytes) -> Any:
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream sent a malformed stream chunk", status=502, code="upstream_malformed") from None
    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
        raise UpstreamError(
            f"upstream error during stream: {_error_message(chunk)}", status=502, code="upstream_stream_error"
        )
    return chunk


def _messages_event(payload: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream sent a malformed stream event", status=502, code="upstream_malformed") from None
    if not isinstance(event, dict):
        return None
    if event.get("type") == "error":
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        raise UpstreamError(f"upstream error during stream: {error.get('message') or 'error'}", status=502,
                            code=str(error.get("type") or "upstream_stream_error"))
    return event


CHAT_SSE = _SseFormat(_chat_chunk, b"[DONE]", lambda _chunk: False, "[DONE]")
MESSAGES_SSE = _SseFormat(_messages_event, None, lambda event: event.get("type") == "message_stop", "message_stop")
_MAX_SSE_LINE = 8 << 20  # a provider that never ends its line must not grow our buffer forever


async def _read_sse(response: aiohttp.ClientResponse, limit: int, fmt: _SseFormat = CHAT_SSE) -> AsyncIterator[list[Any]]:
    """The events of an SSE body, parsed by ``fmt``, one list per network read (an event split
    across reads waits for its end). At most ``limit`` bytes in all; an error event raises
    UpstreamError after the events read before it; a body that ends before the stream is
    complete raises ClientPayloadError."""
    pending = b""
    size = 0
    complete = False
    async for data in response.content.iter_any():
        size += len(data)
        if size > limit:
            raise _too_large(limit)
        lines = (pending + data).split(b"\n")
        pending = lines.pop()  # an incomplete line waits for the next read
        if len(pending) > _MAX_SSE_LINE:
            raise UpstreamError("upstream sent a stream line over 8 MiB", status=502, code="upstream_malformed")
        batch = []
        for raw_line in lines:
            payload = _sse_data(raw_line)
            if payload is None:
                continue  # blank lines end events; comments; "event:" repeats the data's type
            if payload == fmt.done:
                if batch:
                    yield batch
                return
            try:
                event = fmt.parse(payload)
            except UpstreamError:
                if batch:
                    yield batch
                raise
            if event is not None:
                complete = complete or fmt.is_last(event)
                batch.append(event)
        if batch:
            yield batch
    if complete or (fmt.done is not None and _sse_data(pending) == fmt.done):  # the end without a final newline
        return
    raise aiohttp.ClientPayloadError(f"stream ended without {fmt.missing_end}")


def _sse_data(raw_line: bytes) -> bytes | None:
    """The payload of one SSE ``data:`` line; None for any other line."""
    line = raw_line.strip()
    return line[5:].strip() if line.startswith(b"data:") else None


def _litellm_dict(result: Any) -> dict[str, Any]:
    data = result.model_dump() if hasattr(result, "model_dump") else dict(result)
    for private in ("_hidden_params", "_response_headers"):
        data.pop(private, None)
    return data


def _error_message(data: Any) -> str | None:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or "")
        if isinstance(error, str):
            return error
    return None


def _error_code(data: Any) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
        if code is None and data.get("type") == "error":
            code = data["error"].get("type")  # Anthropic's shape: the error type is its code
        return str(code) if code is not None else None
    return None
