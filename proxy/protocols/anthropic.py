"""The Anthropic Messages wire format: parse a request into the canonical turn, render it for an Anthropic upstream, read answers back.

The canonical turn is a chat-shaped body whose messages keep Anthropic content blocks verbatim
(``{"role": "user", "content": [blocks]}``), so thinking blocks keep their signatures and
``cache_control`` breakpoints stay where the client put them. The system prompt becomes leading
``system`` messages (the pipeline's stages read and extend it there); every other request field
rides along untouched in ``params``. Pure functions: no I/O, no aiohttp.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Iterable

import orjson

from proxy.errors import BadRequest, ProxyError
from proxy.litellm_params import is_litellm_param

log = logging.getLogger("agent_state_proxy.protocols")

PROTOCOL = "anthropic"
ROLES = ("user", "assistant", "system")  # system: Claude Code's mid-conversation-system beta
# The Messages API's own request fields (the anthropic SDK's MessageCreateParams). Another field
# passes through to an Anthropic upstream as JSON (a new field or beta the proxy does not know),
# unless litellm would read it as a call parameter: those choose upstreams and keys, never a client.
PROTOCOL_FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "tools",
    "tool_choice", "thinking", "metadata", "stream", "service_tier", "container", "mcp_servers",
    "context_management", "output_config", "output_format", "inference_geo",
})
# Fields the canonical body holds itself; every other client field goes to ``params``.
_OWN_FIELDS = ("model", "messages", "system", "stream", "tools")
INTERRUPTED_TOOL = "The tool call was interrupted: no result was recorded (the agent stopped before it finished)."

# Error types of Anthropic's error shape, by HTTP status.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                409: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
ERROR_TYPES = frozenset(_ERROR_TYPES.values()) | {"api_error", "overloaded_error"}


# -- requests --------------------------------------------------------------------------------

def parse_request(raw: Any, *, count_only: bool = False) -> dict[str, Any]:
    """Check a Messages request and return its canonical body; BadRequest names the field at fault.

    ``count_only``: a /v1/messages/count_tokens body, which has no ``max_tokens``.
    """
    if not isinstance(raw, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    forbidden = sorted(k for k in raw if k not in PROTOCOL_FIELDS and is_litellm_param(k))
    if forbidden:
        raise BadRequest(f"'{forbidden[0]}' cannot be set by clients: the upstream is configured by the proxy", code="forbidden_field")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required (a non-empty string)", code="invalid_model")
    if not count_only:
        max_tokens = raw.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens: Field required (an integer ≥ 1)", code="invalid_max_tokens")
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: Field required (a non-empty array)", code="invalid_messages")
    for index, message in enumerate(messages):
        _check_message(message, f"messages.{index}")
    system = raw.get("system")
    if system is not None:
        _check_content(system, "system", allow_empty=True)
    _check_types(raw)
    canonical: dict[str, Any] = {"model": model, "messages": [], "stream": bool(raw.get("stream")), "protocol": PROTOCOL}
    if system:
        canonical["messages"].append({"role": "system", "content": system})
    canonical["messages"] += messages
    if raw.get("tools"):
        canonical["tools"] = raw["tools"]
    params = {k: v for k, v in raw.items() if k not in _OWN_FIELDS}
    metadata = params.get("metadata")
    if isinstance(metadata, dict) and "session_id" in metadata:
        # The proxy's own session field (sessions.identify reads it); Anthropic rejects it.
        rest = {k: v for k, v in metadata.items() if k != "session_id"}
        if rest:
            params["metadata"] = rest
        else:
            params.pop("metadata")
    canonical["params"] = params
    return canonical


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise BadRequest(f"{where}: must be an object", code="invalid_messages")
    if message.get("role") not in ROLES:
        raise BadRequest(f"{where}.role: must be one of {', '.join(ROLES)}", code="invalid_messages")
    if "content" not in message:
        raise BadRequest(f"{where}.content: Field required", code="invalid_messages")
    _check_content(message["content"], f"{where}.content")


def _check_content(content: Any, where: str, allow_empty: bool = False) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list) or (not content and not allow_empty):
        raise BadRequest(f"{where}: must be a string or a non-empty array of content blocks", code="invalid_messages")
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{where}.{index}: must be a content block object with a string 'type'", code="invalid_messages")
        kind = block["type"]
        if kind == "text" and not isinstance(block.get("text"), str):
            raise BadRequest(f"{where}.{index}.text: Field required", code="invalid_messages")
        if kind == "tool_use" and not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str) and isinstance(block.get("input"), dict)):
            raise BadRequest(f"{where}.{index}: a tool_use block needs 'id', 'name' and an object 'input'", code="invalid_messages")
        if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
            raise BadRequest(f"{where}.{index}.tool_use_id: Field required", code="invalid_messages")
        if kind in ("image", "document") and not isinstance(block.get("source"), dict):
            raise BadRequest(f"{where}.{index}.source: Field required", code="invalid_messages")


def _check_types(raw: dict[str, Any]) -> None:
    checks = (
        ("stream", (bool,), "a boolean"), ("tools", (list,), "an array"), ("stop_sequences", (list,), "an array of strings"),
        ("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"), ("top_k", (int,), "an integer"),
        ("metadata", (dict,), "an object"), ("tool_choice", (dict,), "an object"), ("thinking", (dict,), "an object"),
    )
    for key, kinds, label in checks:
        value = raw.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise BadRequest(f"{key}: must be {label}", code="invalid_type")
    for index, tool in enumerate(raw.get("tools") or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise BadRequest(f"tools.{index}.name: Field required", code="invalid_tools")
    if any(not isinstance(s, str) for s in raw.get("stop_sequences") or ()):
        raise BadRequest("stop_sequences: must be an array of strings", code="invalid_type")


def upstream_request(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The Messages request for an Anthropic upstream (without ``model``: the route sets it), and
    how many unpaired tool calls were repaired."""
    system, messages = split_system(body["messages"])
    messages, repaired = repair_tool_pairs(to_anthropic_messages(messages))
    request = dict(body.get("params") or {})
    request["messages"] = messages
    if system is not None:
        request["system"] = system
    if body.get("tools"):
        request["tools"] = body["tools"]
    if body.get("stream"):
        request["stream"] = True
    return request, repaired


def split_system(messages: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The top-level ``system`` (from the leading system messages) and the rest of the messages."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") in ("system", "developer"):
        lead += 1
    if lead == 0:
        return None, messages
    if lead == 1:  # the common case: the client's own system prompt, as it sent it
        return messages[0].get("content"), messages[lead:]
    blocks: list[Any] = []
    for message in messages[:lead]:
        blocks += as_blocks(message.get("content"))
    return blocks, messages[lead:]


def as_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return list(content)
    return [{"type": "text", "text": content}] if content else []


def to_anthropic_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in Anthropic shape; turns recorded through Chat Completions (tool_calls, tool
    messages, image_url parts) are converted, Anthropic ones pass unchanged."""
    result: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": message.get("tool_call_id"), "content": _text(message.get("content"))}
            if result and result[-1]["role"] == "user" and isinstance(result[-1]["content"], list) and _is_tool_results(result[-1]["content"]):
                result[-1] = {"role": "user", "content": result[-1]["content"] + [block]}
            else:
                result.append({"role": "user", "content": [block]})
            continue
        if role == "assistant" and message.get("tool_calls"):
            blocks = as_blocks(_from_chat_parts(message.get("content")))
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": _json_object(function.get("arguments"))})
            result.append({"role": "assistant", "content": blocks})
            continue
        if role == "developer":
            role = "system"
        content = _from_chat_parts(message.get("content"))
        if role == "assistant" and not content:
            continue  # Anthropic refuses an empty assistant turn
        if set(message) == {"role", "content"} and message.get("content") is content and message.get("role") == role:
            result.append(message)  # already Anthropic's: the very object the client sent
        else:
            result.append({"role": role, "content": content if content is not None else ""})
    return result


def _is_tool_results(blocks: list[Any]) -> bool:
    return all(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks)


def _from_chat_parts(content: Any) -> Any:
    """Chat Completions content parts in Anthropic blocks (text is the same; images differ)."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
        return content
    blocks = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url") or ""
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            blocks.append(part)
    return blocks


def repair_tool_pairs(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Make every tool_use answered by a tool_result in the next user turn, and every tool_result
    answer a tool_use, as the API demands: a history whose agent stopped mid-tool (or whose
    middle the context stage cut) gets an error result instead of a request the provider refuses."""
    pending = list(messages)
    result: list[dict[str, Any]] = []
    repaired = 0
    for index in range(len(pending)):
        message = pending[index]
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            previous = next((m for m in reversed(result) if m.get("role") != "system"), None)
            asked = _tool_ids(previous) if previous is not None and previous.get("role") == "assistant" else set()
            kept = [b for b in message["content"] if not (isinstance(b, dict) and b.get("type") == "tool_result" and b.get("tool_use_id") not in asked)]
            if len(kept) != len(message["content"]):
                repaired += len(message["content"]) - len(kept)
                log.warning("dropped %d tool result(s) that answer no tool call", len(message["content"]) - len(kept))
                if not kept:
                    continue
                message = message | {"content": kept}
        result.append(message)
        order = _tool_id_order(message) if message.get("role") == "assistant" else []
        if not order:
            continue
        following = next((i for i in range(index + 1, len(pending)) if pending[i].get("role") != "system"), None)
        answered = _answered(pending[following]) if following is not None else set()
        missing = [i for i in order if i not in answered]
        if not missing:
            continue
        repaired += len(missing)
        log.warning("repaired %d unanswered tool call(s) %s with an error result", len(missing), missing)
        filler = [{"type": "tool_result", "tool_use_id": i, "content": INTERRUPTED_TOOL, "is_error": True} for i in missing]
        if following is not None and following == index + 1 and pending[following].get("role") == "user":
            pending[following] = pending[following] | {"content": filler + as_blocks(pending[following].get("content"))}
        else:
            result.append({"role": "user", "content": filler})
    return result, repaired


def _tool_id_order(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [b["id"] for b in content if isinstance(b, dict) and b.get("type") == "tool_use" and isinstance(b.get("id"), str)]


def _tool_ids(message: dict[str, Any]) -> set[str]:
    return set(_tool_id_order(message))


def _answered(message: dict[str, Any] | None) -> set[str]:
    if message is None or message.get("role") != "user" or not isinstance(message.get("content"), list):
        return set()
    return {b.get("tool_use_id") for b in message["content"] if isinstance(b, dict) and b.get("type") == "tool_result"}


def _json_object(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def _text(content: Any) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else str(content)


# -- answers ---------------------------------------------------------------------------------

def recorded_message(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant turn to record from an Anthropic message: the blocks the client will resend."""
    return {"role": "assistant", "content": list(message.get("content") or [])}


def pipeline_usage(usage: Any) -> dict[str, int] | None:
    """Anthropic usage in the pipeline's terms (prompt = every input token, cached or not)."""
    if not isinstance(usage, dict):
        return None
    prompt = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": int(usage.get("output_tokens") or 0)}


class EventCollector:
    """Rebuilds the assistant message from Messages stream events, for the record.

    Thinking text and signature are concatenated exactly as streamed, so the recorded block is
    the one the client's SDK assembled and will send back.
    """

    def __init__(self, keep_chunks: bool = False) -> None:
        self.chunks: list[dict[str, Any]] | None = [] if keep_chunks else None
        self.blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, list[str]] = {}
        self.stop_reason: str | None = None
        self.raw_usage: dict[str, Any] = {}
        self.model: str | None = None

    def add(self, event: dict[str, Any]) -> None:
        if self.chunks is not None:
            self.chunks.append(event)
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.model = message.get("model") or self.model
            self.raw_usage.update({k: v for k, v in (message.get("usage") or {}).items() if v is not None})
        elif kind == "content_block_start":
            block = dict(event.get("content_block") or {})
            if block.get("type") == "tool_use":
                self._json[event.get("index", 0)] = []
            self.blocks[event.get("index", 0)] = block
        elif kind == "content_block_delta":
            self._delta(self.blocks.setdefault(event.get("index", 0), {"type": "text", "text": ""}), event.get("index", 0), event.get("delta") or {})
        elif kind == "content_block_stop":
            index = event.get("index", 0)
            if index in self._json and index in self.blocks:
                text = "".join(self._json.pop(index))
                self.blocks[index]["input"] = _json_object(text) if text else (self.blocks[index].get("input") or {})
        elif kind == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            self.raw_usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})

    def _delta(self, block: dict[str, Any], index: int, delta: dict[str, Any]) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta.get("text", "")
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
        elif kind == "signature_delta":
            block["signature"] = block.get("signature", "") + delta.get("signature", "")
        elif kind == "input_json_delta":
            self._json.setdefault(index, []).append(delta.get("partial_json", ""))
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta.get("citation"))

    def messages(self) -> list[dict[str, Any]]:
        if not self.blocks:
            return []
        return [{"role": "assistant", "content": [self.blocks[i] for i in sorted(self.blocks)]}]

    def finish_reason(self) -> str | None:
        return self.stop_reason

    @property
    def usage(self) -> dict[str, int] | None:
        return pipeline_usage(self.raw_usage) if self.raw_usage else None


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


# -- the wire --------------------------------------------------------------------------------

def sse(events: Iterable[dict[str, Any]]) -> bytes:
    """Events as Anthropic's SSE: ``event: <type>`` then its data, unknown types included."""
    return b"".join(b"event: " + str(e.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


def error_body(error: ProxyError) -> dict[str, Any]:
    """A proxy error in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = error.code if error.code in ERROR_TYPES else _ERROR_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}
