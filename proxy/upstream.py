"""Calls to the model provider: litellm for any provider, a direct aiohttp path for OpenAI-compatible ones.

Every provider failure leaves this module as an UpstreamError (secrets redacted); nothing
above it sees aiohttp or litellm exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, AsyncIterator, Iterator

import aiohttp
import orjson

from proxy.config import ResolvedModel
from proxy.errors import UpstreamError, redact, upstream_status


class Upstream:
    """One pooled HTTP client for the direct path; litellm imported only when first needed."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets = secrets
        self._http: aiohttp.ClientSession | None = None
        self._litellm: Any = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=128, keepalive_timeout=30)
        self._http = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode())

    async def close(self) -> None:
        if self._http is not None:
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
                async with self._post(route, "/chat/completions", body, timeout) as response:
                    return await self._json_or_raise(response)
        litellm = await self._import_litellm()
        with self._translate(timeout):
            result = await litellm.acompletion(**self._litellm_args(route, body, timeout))
            return _litellm_dict(result)

    async def stream(self, route: ResolvedModel, body: dict[str, Any], timeout: float) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield the provider's chunks as dicts, in batches: all the chunks that arrived together
        (one network read), so the relay writes them with one send; raises UpstreamError before
        or during the stream."""
        if route.direct:
            with self._translate(timeout):
                async with self._post(route, "/chat/completions", body, timeout) as response:
                    if response.status != 200:
                        await self._json_or_raise(response)
                    async for batch in _read_sse(response):
                        yield batch
            return
        litellm = await self._import_litellm()
        with self._translate(timeout):
            result = await litellm.acompletion(**self._litellm_args(route, body, timeout))
            async for chunk in result:
                yield [_litellm_dict(chunk)]

    # -- embeddings --------------------------------------------------------------------------

    async def embeddings(self, route: ResolvedModel, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if route.direct:
            with self._translate(timeout):
                async with self._post(route, "/embeddings", body, timeout) as response:
                    return await self._json_or_raise(response)
        litellm = await self._import_litellm()
        args = {k: v for k, v in body.items() if k != "model"}
        with self._translate(timeout):
            result = await litellm.aembedding(
                model=route.model, api_base=route.api_base, api_key=route.api_key, timeout=timeout, **args
            )
            return _litellm_dict(result)

    # -- plumbing ----------------------------------------------------------------------------

    def _post(self, route: ResolvedModel, path: str, body: dict[str, Any], timeout: float):
        assert self._http is not None, "Upstream.start() was not awaited"
        headers = {"Content-Type": "application/json"}
        if route.api_key:
            headers["Authorization"] = f"Bearer {route.api_key}"
        payload = orjson.dumps(body | {"model": route.upstream_model})
        return self._http.post(
            f"{route.api_base}{path}",
            data=payload,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10)),
        )

    async def _json_or_raise(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        raw = await response.read()
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
            )
        return data

    @contextlib.contextmanager
    def _translate(self, timeout: float) -> Iterator[None]:
        """Turn aiohttp/litellm failures into UpstreamError, once, here."""
        try:
            yield
        except UpstreamError:
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
            ) from exc

    def _litellm_errors(self) -> tuple[type[BaseException], ...]:
        import openai

        return (self._litellm.exceptions.APIError, openai.APIError, self._litellm.exceptions.OpenAIError)

    def _litellm_args(self, route: ResolvedModel, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        args = {k: v for k, v in body.items() if k not in ("model", "metadata")}
        args.update(route.params)
        args.update(model=route.model, api_base=route.api_base, api_key=route.api_key, timeout=timeout, num_retries=0)
        return args

    async def _import_litellm(self) -> Any:
        if self._litellm is None:
            self._litellm = await asyncio.to_thread(import_litellm)
        return self._litellm


def import_litellm() -> Any:
    """Import litellm without its start-up download of the model cost map."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.drop_params = False
    return litellm


async def _read_sse(response: aiohttp.ClientResponse) -> AsyncIterator[list[dict[str, Any]]]:
    """The ``data:`` events of an SSE body, parsed, one list per network read."""
    pending = b""
    async for data in response.content.iter_any():
        lines = (pending + data).split(b"\n")
        pending = lines.pop()  # an incomplete line waits for the next read
        if len(pending) > _MAX_SSE_LINE:
            raise UpstreamError("upstream sent a stream line over 8 MiB", status=502, code="upstream_malformed")
        batch = []
        for raw_line in lines:
            chunk = _sse_event(raw_line)
            if chunk is _DONE:
                if batch:
                    yield batch
                return
            if chunk is not None:
                batch.append(chunk)
        if batch:
            yield batch
    line = pending.strip()
    if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":  # without a final newline
        return
    raise aiohttp.ClientPayloadError("stream ended without [DONE]")


_DONE: Any = object()
_MAX_SSE_LINE = 8 << 20  # a provider that never ends its line must not grow our buffer forever


def _sse_event(raw_line: bytes) -> dict[str, Any] | None:
    """The chunk of one SSE line; None for blank lines, comments and other fields; _DONE at the end."""
    line = raw_line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return _DONE
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream sent a malformed stream chunk", status=502, code="upstream_malformed") from None
    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
        raise UpstreamError(
            f"upstream error during stream: {_error_message(chunk)}", status=502, code="upstream_stream_error"
        )
    return chunk


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
        return str(code) if code is not None else None
    return None
