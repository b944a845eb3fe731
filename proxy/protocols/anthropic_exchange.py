"""Anthropic Messages as an ``Exchange``: a Messages turn's upstream call and how its answer is read back.

An Anthropic upstream (a route whose model is ``anthropic/…``) gets the request in its own
protocol, blocks and unknown fields as the client sent them; any other upstream gets it
translated to Chat Completions (``anthropic_chat.py``) and its answer translated back.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from proxy.protocols import anthropic, anthropic_chat
from proxy.turn import Turn
from proxy.upstream import Upstream, speaks_anthropic

if TYPE_CHECKING:
    from proxy.config import ResolvedModel

_FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")  # passed unchanged to an Anthropic upstream


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The protocol headers an Anthropic upstream gets from the client (betas may come as several lines)."""
    getall = getattr(headers, "getall", None)
    found = {}
    for name in _FORWARDED_HEADERS:
        values = getall(name, []) if getall is not None else ([headers[name]] if name in headers else [])
        if values:
            found[name] = ",".join(values)
    return found


class MessagesExchange:
    """The upstream call of one Messages turn: native to an Anthropic upstream, translated otherwise."""

    def __init__(self, route: ResolvedModel, headers: Mapping[str, str]) -> None:
        self.native = speaks_anthropic(route)
        self.headers = forwarded_headers(headers)

    def _native_request(self, turn: Turn) -> dict[str, Any]:
        request, repaired = anthropic.upstream_request(turn.body)
        if repaired:
            turn.headers["X-Tool-Calls-Repaired"] = str(repaired)
        return request

    async def complete(self, upstream: Upstream, turn: Turn) -> dict[str, Any]:
        timeout = turn.tenant.upstream_timeout
        if self.native:
            return await upstream.anthropic(turn.route, self._native_request(turn), self.headers, timeout)
        response = await upstream.complete(turn.route, anthropic_chat.chat_request(turn.body), timeout)
        return anthropic_chat.message_from_chat(response, turn.route.requested)

    def reply(self, response: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, dict[str, Any] | None, str | None]:
        return [anthropic.recorded_message(response)], response.get("stop_reason"), anthropic.pipeline_usage(response.get("usage")), response.get("model")

    async def stream(self, upstream: Upstream, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        timeout = turn.tenant.upstream_timeout
        if self.native:
            events = upstream.anthropic_stream(turn.route, self._native_request(turn), self.headers, timeout)
            async with contextlib.aclosing(events) as batches:
                async for batch in batches:
                    yield batch
            return
        translator = anthropic_chat.ChatStreamTranslator(turn.route.requested)
        chunks = upstream.stream(turn.route, anthropic_chat.chat_request(turn.body), timeout)
        async with contextlib.aclosing(chunks) as batches:
            async for batch in batches:
                translated = [event for chunk in batch for event in translator.feed(chunk)]
                if translated:
                    yield translated
        yield translator.finish()

    def collector(self, keep_chunks: bool) -> anthropic.EventCollector:
        return anthropic.EventCollector(keep_chunks)
