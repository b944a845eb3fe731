"""OpenAI Chat Completions, the canonical turn's own format: its upstream call and how its answer is read back.

The pipeline's canonical turn is a chat body, so this adapter translates nothing: it calls the
upstream's Chat Completions endpoint and reassembles a streamed answer into the messages to record.
Other protocols implement the same ``Exchange`` (``proxy/turn.py``) in their own modules.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from proxy.turn import Turn
from proxy.upstream import Upstream


class ChatExchange:
    """The upstream call of a turn in Chat Completions (the default ``Exchange``)."""

    async def complete(self, upstream: Upstream, turn: Turn) -> dict[str, Any]:
        return await upstream.complete(turn.route, turn.body, turn.tenant.upstream_timeout)

    def reply(self, response: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, dict[str, Any] | None, str | None]:
        choices = response.get("choices") or []
        assistant = [c.get("message") or {} for c in choices if isinstance(c, dict)]
        finish = choices[0].get("finish_reason") if choices else None
        return assistant, finish, response.get("usage"), response.get("model")

    def stream(self, upstream: Upstream, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        return upstream.stream(turn.route, turn.body, turn.tenant.upstream_timeout)

    def collector(self, keep_chunks: bool) -> StreamCollector:
        return StreamCollector(keep_chunks)


CHAT = ChatExchange()


class StreamCollector:
    """Reassembles streamed chunks into the messages the provider sent."""

    def __init__(self, keep_chunks: bool = False) -> None:
        self.chunks: list[dict[str, Any]] | None = [] if keep_chunks else None  # for idempotent replays
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if self.chunks is not None:
            self.chunks.append(chunk)
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            state = self.choices.setdefault(choice.get("index", 0), {"content": [], "tool_calls": {}, "finish": None})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                state["content"].append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = state["tool_calls"].setdefault(call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    slot["function"]["name"] += function["name"]
                if function.get("arguments"):
                    slot["function"]["arguments"] += function["arguments"]
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]

    def messages(self) -> list[dict[str, Any]]:
        result = []
        for index in sorted(self.choices):
            state = self.choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(state["content"]) or None}
            if state["tool_calls"]:
                message["tool_calls"] = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
            result.append(message)
        return result

    def finish_reason(self) -> str | None:
        return self.choices[0]["finish"] if 0 in self.choices else None
