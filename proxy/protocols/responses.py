"""Parse an OpenAI Responses API request into the pipeline's canonical chat body.

The pipeline works on Chat Completions bodies (messages with role, content, tool_calls and
tool messages). This module translates a ``POST /v1/responses`` body into one, from an
allow-list of the fields it knows: an unknown field is refused with a 400 naming it, so
nothing a client adds reaches the upstream untranslated. Rendering the result back is
``responses_render``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.errors import BadRequest
from proxy.protocols import responses_compact
from proxy.litellm_params import is_litellm_param

# Fields a Responses request may carry. Accepted-and-ignored ones are listed with why.
_TRANSLATED = {
    "model", "input", "instructions", "previous_response_id", "store", "stream", "tools", "tool_choice",
    "parallel_tool_calls", "text", "max_output_tokens", "temperature", "top_p", "reasoning", "metadata", "user",
}
_IGNORED = {
    "include",  # only reasoning.encrypted_content / logprobs style extras; nothing to include from a chat upstream
    "truncation",  # the proxy's own context management fits the budget
    "prompt_cache_key",  # a routing hint of OpenAI's; Codex sets it to its session id (the session-id header names the session)
    "prompt_cache_retention", "service_tier", "safety_identifier", "stream_options", "max_tool_calls",
    "top_logprobs", "context_management", "client_metadata", "background", "image", "prompt_cache_options",
}
KNOWN_FIELDS = _TRANSLATED | _IGNORED

# Built-in tools OpenAI runs server-side; a chat-completions upstream cannot.
HOSTED_TOOLS = {
    "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "file_search",
    "code_interpreter", "image_generation", "computer_use_preview", "computer", "mcp", "local_shell", "shell",
    "apply_patch", "custom", "tool_search", "programmatic_tool_calling",
}
ROLES = {"user", "assistant", "system", "developer"}
NAMESPACE_SEPARATOR = "__"  # chat function names allow [A-Za-z0-9_-]: "ns__name" carries a namespace


@dataclass
class ResponsesRequest:
    """A parsed Responses request: the canonical chat body plus what the Responses edge keeps."""

    chat: dict[str, Any]  # canonical chat body: model, messages (this request's input), tools...
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    instructions: str | None = None
    input_items: list[dict[str, Any]] = field(default_factory=list)  # the input as items, for input_items
    dropped_tools: list[str] = field(default_factory=list)  # hosted tools left out of the upstream request
    namespaces: dict[str, tuple[str, str]] = field(default_factory=dict)  # chat name → (namespace, name)
    echo: dict[str, Any] = field(default_factory=dict)  # request fields a Response object repeats


def parse(body: Any, hosted_tools: str = "drop") -> ResponsesRequest:
    """Translate a Responses request; raise BadRequest naming the offending field.

    ``hosted_tools`` is the tenant's policy for built-in tools the upstream cannot run:
    ``drop`` leaves them out (the caller reports them), ``refuse`` answers 400 naming the tool.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    unknown = sorted(k for k in body if k not in KNOWN_FIELDS)
    if unknown and is_litellm_param(unknown[0]):  # routing, credentials, mocks: the proxy's, never a client's
        raise _bad(f"'{unknown[0]}' cannot be set by clients: the upstream is configured by the proxy", unknown[0], "forbidden_field")
    if unknown:
        raise _bad(f"unknown parameter '{unknown[0]}' for /v1/responses", unknown[0], "unknown_parameter")
    if body.get("background"):
        raise _bad("background responses are not supported by this proxy", "background", "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string", "model")
    request = ResponsesRequest(chat={"model": model})
    request.stream = _optional(body, "stream", bool) or False
    store = _optional(body, "store", bool)
    request.store = True if store is None else store
    request.previous_response_id = _optional(body, "previous_response_id", str)
    request.instructions = _optional(body, "instructions", str)

    items = _input_items(body.get("input"))
    request.input_items = items
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    messages += items_to_messages(items)
    if not messages and request.previous_response_id is None:
        raise _bad("'input' must hold at least one message", "input")
    request.chat["messages"] = messages

    tools, request.dropped_tools, request.namespaces = _tools(body.get("tools"), hosted_tools)
    if tools:
        request.chat["tools"] = tools
        parallel = _optional(body, "parallel_tool_calls", bool)
        if parallel is not None:
            request.chat["parallel_tool_calls"] = parallel
    choice = _tool_choice(body.get("tool_choice"), request.namespaces, bool(tools))
    if choice is not None:
        request.chat["tool_choice"] = choice
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        request.chat["response_format"] = response_format
    for source, target, kind in (("max_output_tokens", "max_completion_tokens", int), ("temperature", "temperature", (int, float)),
                                 ("top_p", "top_p", (int, float)), ("user", "user", str)):
        value = _optional(body, source, kind)
        if value is not None:
            request.chat[target] = value
    reasoning = _optional(body, "reasoning", dict)
    if reasoning and reasoning.get("effort") is not None:
        if not isinstance(reasoning["effort"], str):
            raise _bad("'reasoning.effort' must be a string", "reasoning.effort")
        request.chat["reasoning_effort"] = reasoning["effort"]
    metadata = _optional(body, "metadata", dict)
    if metadata:
        # Only the proxy's own keys travel in the chat body (the session stage reads and strips
        # them); the rest stays on the Response object, never sent to providers that reject it.
        own = {k: metadata[k] for k in ("session_id", "user_id") if k in metadata}
        if own:
            request.chat["metadata"] = own
    for key in ("include", "truncation", "prompt_cache_key"):
        if body.get(key) is not None:
            request.echo[key] = body[key]
    request.echo |= {
        "instructions": request.instructions, "metadata": metadata or {}, "temperature": body.get("temperature"),
        "top_p": body.get("top_p"), "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "tool_choice": body.get("tool_choice", "auto"),
        "tools": [t for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") not in HOSTED_TOOLS],
        "text": body.get("text") or {"format": {"type": "text"}}, "reasoning": reasoning,
        "previous_response_id": request.previous_response_id, "store": request.store,
    }
    return request


def _input_items(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise _bad("'input' must be a string or an array of items", "input")
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad(f"input[{index}] must be an object", f"input[{index}]")
        if "type" not in item and "role" in item:  # the Agents SDK sends messages without a type
            item = {"type": "message"} | item
        items.append(item)
    return items


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for Responses input items: consecutive assistant text and function calls
    become one assistant message with ``tool_calls``; outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None  # the assistant message function calls attach to

    def open_assistant() -> dict[str, Any]:
        nonlocal assistant
        if assistant is None:
            assistant = {"role": "assistant", "content": None}
            messages.append(assistant)
        return assistant

    for index, item in enumerate(items):
        kind = item.get("type")
        where = f"input[{index}]"
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise _bad(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
            if role == "assistant":
                target = open_assistant()
                text = _assistant_text(item.get("content"), where)
                target["content"] = (target["content"] or "") + text if text or target["content"] else target["content"]
                continue
            assistant = None
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
                raise _bad(f"{where}: a function_call needs string 'name', 'call_id' and 'arguments'", where)
            if isinstance(item.get("namespace"), str) and item["namespace"]:
                name = item["namespace"] + NAMESPACE_SEPARATOR + name
            target = open_assistant()
            target.setdefault("tool_calls", []).append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.call_id must be a string", f"{where}.call_id")
            assistant = None
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item.get("output"), where)})
        elif kind == "compaction":
            summary = responses_compact.decode(item.get("encrypted_content"))
            if summary is not None:  # the proxy's own compaction: its summary, as the assistant's
                assistant = None
                messages.append(responses_compact.summary_message(summary))
            # Anyone else's (OpenAI's are encrypted) cannot be read: like reasoning, not translated.
        elif kind == "reasoning":
            # Reasoning items (often encrypted, another model's) mean nothing to a chat upstream:
            # they stay in the stored input items and are not translated.
            continue
        else:
            raise _bad(f"{where}: input items of type '{kind}' are not supported by this proxy", f"{where}.type", "unsupported_item")
    return [m for m in messages if m["role"] != "assistant" or m.get("content") is not None or m.get("tool_calls")]


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(part.get("text"), str):
                raise _bad(f"{at}.text must be a string", f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise _bad(f"{at}: only input_image with an image_url (URL or data URL) is supported", f"{at}.image_url")
            image = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            file = {k: part[k] for k in ("file_data", "file_id", "filename") if isinstance(part.get(k), str)}
            if not file:
                raise _bad(f"{at}: input_file needs file_data or file_id", at)
            parts.append({"type": "file", "file": file})
        else:
            raise _bad(f"{at}: content parts of type '{kind}' are not supported", f"{at}.type", "unsupported_content")
    # A text-only message is sent as a plain string: the same body a chat client would send,
    # so the transcript records (and matches) it the same way.
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _assistant_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") in ("output_text", "input_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise _bad(f"{where}.content[{index}] must be an output_text or refusal part", f"{where}.content[{index}]")
    return "".join(texts)


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(p.get("text", "") for p in output if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text"))
    raise _bad(f"{where}.output must be a string or an array of content parts", f"{where}.output")


def _tools(value: Any, hosted_tools: str) -> tuple[list[dict[str, Any]], list[str], dict[str, tuple[str, str]]]:
    if value is None:
        return [], [], {}
    if not isinstance(value, list):
        raise _bad("'tools' must be an array", "tools")
    tools: list[dict[str, Any]] = []
    dropped: list[str] = []
    namespaces: dict[str, tuple[str, str]] = {}
    for index, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            tools.append(_function_tool(tool, f"tools[{index}]"))
        elif kind == "namespace":
            space = tool.get("name")
            if not isinstance(space, str) or not space or not isinstance(tool.get("tools"), list):
                raise _bad(f"tools[{index}]: a namespace needs a 'name' and 'tools'", f"tools[{index}]")
            for inner_index, inner in enumerate(tool["tools"]):
                at = f"tools[{index}].tools[{inner_index}]"
                if not isinstance(inner, dict) or inner.get("type") != "function":
                    raise _bad(f"{at}: a namespace groups function tools only", at)
                chat_tool = _function_tool(inner, at)
                function = chat_tool["function"]
                namespaces[space + NAMESPACE_SEPARATOR + function["name"]] = (space, function["name"])
                function["name"] = space + NAMESPACE_SEPARATOR + function["name"]
                if tool.get("description"):
                    function["description"] = f"[{space}: {tool['description']}] " + (function.get("description") or "")
                tools.append(chat_tool)
        elif kind in HOSTED_TOOLS:
            if hosted_tools == "refuse":
                raise _bad(f"tool '{kind}' is a hosted tool the upstream cannot run; this tenant refuses it", f"tools[{index}]", "unsupported_tool")
            dropped.append(kind)
        else:
            raise _bad(f"tools[{index}]: tools of type '{kind}' are not supported", f"tools[{index}].type", "unsupported_tool")
    return tools, dropped, namespaces


def _function_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name is required", f"{where}.name")
    function: dict[str, Any] = {"name": name}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if tool.get("parameters") is not None:
        if not isinstance(tool["parameters"], dict):
            raise _bad(f"{where}.parameters must be a JSON schema object", f"{where}.parameters")
        function["parameters"] = tool["parameters"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(value: Any, namespaces: dict[str, tuple[str, str]], have_tools: bool) -> Any:
    if value is None:
        return None
    if value in ("auto", "none", "required"):
        return value if have_tools else None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        name = value["name"]
        if isinstance(value.get("namespace"), str):
            name = value["namespace"] + NAMESPACE_SEPARATOR + name
        return {"type": "function", "function": {"name": name}}
    if isinstance(value, dict) and value.get("type") in HOSTED_TOOLS | {"allowed_tools"}:
        return "auto" if have_tools else None  # the hosted tool was dropped: let the model choose
    raise _bad("'tool_choice' must be auto, none, required or a function", "tool_choice")


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict):
        raise _bad("'text.format' must be an object", "text.format")
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _bad("'text.format' of type json_schema needs a 'name' and a 'schema' object", "text.format")
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("'text.format.type' must be text, json_object or json_schema", "text.format.type")


def _optional(body: dict[str, Any], key: str, kind: Any) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise _bad(f"'{key}' has the wrong type", key, "invalid_type")
    return value


def _bad(message: str, param: str, code: str = "invalid_value") -> BadRequest:
    return BadRequest(message, code=code, param=param)
