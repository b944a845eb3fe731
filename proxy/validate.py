"""Validation of client request bodies at the edge, before anything is hashed, counted, stored or forwarded.

Every rule here answers a bad request with an OpenAI-shaped 400 (413 for size limits) that names
the field in ``param``: JSON nesting (``check_depth``, for every route), the per-tenant size
limits, and the protocol's allow-list of fields with their types (proxy/protocol_fields.py).
"""

from __future__ import annotations

from typing import Any, Collection

from proxy import protocol_fields
from proxy.config import RequestLimits
from proxy.errors import BadRequest, PayloadTooLarge

# orjson reads 1,024 levels of nesting but writes only 254: a deeper value is accepted and then
# cannot be stored or forwarded (issue #30). No OpenAI request needs more than a few levels beyond
# a tool's JSON schema; 64 leaves room for deep schemas and stays far below the encoder's limit.
MAX_DEPTH = 64
MAX_IDEMPOTENCY_KEY = 255


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` levels; ``param`` names the top-level field."""
    if type(value) is not dict and type(value) is not list:
        return
    fields = value.items() if type(value) is dict else enumerate(value)
    for field, child in fields:
        # Level by level (no recursion: a deep body must not exhaust Python's stack either),
        # keeping only containers; plain loops, as measured fastest (bench/validate_bench.py).
        level, depth = [child], 2
        while level:
            if depth > limit:
                raise BadRequest(f"request body is nested deeper than {limit} levels (in '{field}')",
                                 code="nesting_too_deep", param=str(field) if type(value) is dict else None)
            below: list[Any] = []
            keep = below.append
            for node in level:
                kind = type(node)
                if kind is not dict and kind is not list:
                    continue
                for item in node.values() if kind is dict else node:
                    if type(item) is dict or type(item) is list:
                        keep(item)
            level, depth = below, depth + 1


def chat_body(body: Any, limits: RequestLimits = RequestLimits(), passthrough: Collection[str] = ()) -> dict[str, Any]:
    """Check a chat completion request; raise BadRequest/PayloadTooLarge naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    message_count(body, limits.max_messages)
    messages = body.get("messages")
    protocol_fields.check(body, protocol_fields.CHAT_COMPLETIONS, passthrough)
    _check_sizes(messages, limits)
    return body


def request_limits(body: dict[str, Any], limits: RequestLimits) -> None:
    """The tenant's ``limits`` for another protocol's canonical body (Anthropic Messages): the
    same 413s as a chat request, checked before anything walks the messages."""
    message_count(body, limits.max_messages)
    if isinstance(body.get("messages"), list):
        _check_sizes(body["messages"], limits)


def message_count(body: Any, max_messages: int) -> None:
    """413 when a chat body holds more than ``max_messages`` messages. Counted before anything
    walks the messages, so an oversized request costs nothing more; also checked right after the
    parse (server/http.read_json), off the event loop for a large body."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list) and len(messages) > max_messages:
        raise too_many_messages(len(messages), max_messages)


def too_many_messages(count: int, max_messages: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"'messages' holds {count} messages; this proxy accepts at most {max_messages} per request",
                           code="too_many_messages", param="messages")


def embeddings_body(body: Any, passthrough: Collection[str] = ()) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    protocol_fields.check(body, protocol_fields.EMBEDDINGS, passthrough)
    return body


def idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header, or a 400 when it is not printable UTF-8 of a sane length."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # aiohttp keeps undecodable header bytes as surrogates
        value = ""
    if not value or len(value) > MAX_IDEMPOTENCY_KEY or not value.isprintable():
        raise BadRequest(f"the Idempotency-Key header must be 1-{MAX_IDEMPOTENCY_KEY} printable UTF-8 characters",
                         code="invalid_idempotency_key", param="Idempotency-Key")
    return value


def _check_sizes(messages: list[dict[str, Any]], limits: RequestLimits) -> None:
    total = 0
    for index, message in enumerate(messages):
        content = message.get("content")
        # The common message (role and string content only) is measured without a call.
        size = len(content) if type(content) is str and len(message) == 2 else _text_size(message)
        if size > limits.max_message_chars:
            raise PayloadTooLarge(
                f"messages[{index}] holds {size} characters of text; the limit is {limits.max_message_chars} per message",
                code="message_too_large", param=f"messages[{index}]",
            )
        total += size
        if total > limits.max_total_chars:
            raise PayloadTooLarge(
                f"the request's messages hold more than {limits.max_total_chars} characters of text",
                code="request_too_large", param="messages",
            )


def _text_size(message: dict[str, Any]) -> int:
    """Characters of text in one (already type-checked) message."""
    content = message.get("content")
    size = len(content) if isinstance(content, str) else 0
    if isinstance(content, list):
        size += sum(len(part["text"]) for part in content if isinstance(part.get("text"), str))
    for call in message.get("tool_calls") or ():
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            size += len(function["arguments"])
    return size
