"""The allow-list of request fields each client protocol defines, with a type check per field.

What reaches a provider is built from this list and nothing else (issue #20): a field a client
sends is forwarded only when the protocol defines it here, or when the tenant names it in
``passthrough_fields`` (a provider extension it chose to allow). Everything else is refused with a
400 naming the field — litellm's own parameters (``fallbacks``, ``api_base``, ``mock_response``,
...) with a message that says why. Types are checked here, before anything hashes, counts or
encodes the body, so a wrong type is a 400 with ``param`` set and never a 500 further in.

Each protocol is one ``Protocol`` value; an adapter for another client protocol (Responses,
Messages) adds its own next to ``CHAT_COMPLETIONS`` and ``EMBEDDINGS``. The field names follow
openai-python's ``types/chat/completion_create_params.py`` and ``types/embedding_create_params.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from proxy.errors import BadRequest
from proxy.litellm_params import is_litellm_param

# A check receives a non-null value and the param path it came from; it raises BadRequest.
Check = Callable[[Any, str], None]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _fail(param: str, rule: str) -> BadRequest:
    return BadRequest(f"'{param}' {rule}", code="invalid_type", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def string(value: Any, param: str) -> None:
    if not isinstance(value, str):
        raise _fail(param, "must be a string")


def boolean(value: Any, param: str) -> None:
    if not isinstance(value, bool):
        raise _fail(param, "must be a boolean")


def obj(value: Any, param: str) -> None:
    if not isinstance(value, dict):
        raise _fail(param, "must be an object")


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any, param: str) -> None:
        if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            raise _fail(param, f"must be an integer{_range(low, high)}")
    return check


def number(low: float | None = None, high: float | None = None) -> Check:
    def check(value: Any, param: str) -> None:
        if not _is_number(value) or (low is not None and value < low) or (high is not None and value > high):
            raise _fail(param, f"must be a number{_range(low, high)}")
    return check


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" between {low:g} and {high:g}"
    if low is not None:
        return f" of at least {low:g}"
    return ""


def string_or_object(value: Any, param: str) -> None:
    if not isinstance(value, (str, dict)):
        raise _fail(param, "must be a string or an object")


def strings(value: Any, param: str) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(param, "must be an array of strings")


def stop(value: Any, param: str) -> None:
    if not isinstance(value, str):
        strings(value, param)


def number_map(value: Any, param: str) -> None:
    if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
        raise _fail(param, "must be an object mapping token ids to numbers")


def stream_options(value: Any, param: str) -> None:
    obj(value, param)
    for key in ("include_usage", "include_obfuscation"):
        if value.get(key) is not None:
            boolean(value[key], f"{param}.{key}")


def response_format(value: Any, param: str) -> None:
    obj(value, param)
    string(value.get("type"), f"{param}.type")


def _named_function(value: Any, param: str) -> None:
    obj(value, param)
    string(value.get("name"), f"{param}.name")
    if value.get("description") is not None:
        string(value["description"], f"{param}.description")
    if value.get("parameters") is not None:
        obj(value["parameters"], f"{param}.parameters")


def tools(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _fail(param, "must be an array of tool objects")
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        obj(tool, where)
        string(tool.get("type", "function"), f"{where}.type")
        if tool.get("type", "function") == "function":
            _named_function(tool.get("function"), f"{where}.function")


def functions(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _fail(param, "must be an array of function objects")
    for index, function in enumerate(value):
        _named_function(function, f"{param}[{index}]")


def metadata(value: Any, param: str) -> None:
    """OpenAI's metadata: string keys and values. The proxy reads session_id and user_id from it
    (and strips them before forwarding), so they must be strings like every other value."""
    obj(value, param)
    for key, item in value.items():
        if not isinstance(item, str):
            raise _fail(f"{param}.{key}", "must be a string")


# -- messages --------------------------------------------------------------------------------

def messages(value: Any, param: str) -> None:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"'{param}' is required and must be a non-empty array", code="invalid_messages", param=param)
    for index, message in enumerate(value):
        _message(message, index)


_ROLES = frozenset(ROLES)


def _message(message: Any, index: int) -> None:
    """One message; the param path is only spelled out on failure (this runs per message)."""
    if type(message) is not dict:
        raise _invalid(f"messages[{index}]", "must be an object")
    role = message.get("role")
    if type(role) is not str or role not in _ROLES:
        raise _invalid(f"messages[{index}].role", f"must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if type(content) is not str:
        if content is None:
            if role in ("system", "developer", "user"):
                raise _invalid(f"messages[{index}].content", f"is required for {role} messages")
        elif type(content) is list:
            _content_parts(content, f"messages[{index}].content")
        else:
            raise _invalid(f"messages[{index}].content", "must be a string or an array of content parts")
    if len(message) > 2:  # role and content are all most messages hold
        for key, value in message.items():
            check = _MESSAGE_FIELDS.get(key)
            if check is not None and value is not None:
                check(value, f"messages[{index}].{key}")
    if role == "tool" and type(message.get("tool_call_id")) is not str:
        raise _invalid(f"messages[{index}].tool_call_id", "is required for tool messages and must be a string")


def _message_string(value: Any, where: str) -> None:
    if type(value) is not str:
        raise _invalid(where, "must be a string")


def _message_object(value: Any, where: str) -> None:
    if type(value) is not dict:
        raise _invalid(where, "must be an object")


def _content_parts(parts: list[Any], where: str) -> None:
    if not parts:
        raise _invalid(where, "must be a string or a non-empty array of content parts")
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise _invalid(at, "must be a content part object")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _invalid(f"{at}.type", "must be a string")
        if kind in ("text", "input_text") or "text" in part:
            if not isinstance(part.get("text"), str):
                raise _invalid(f"{at}.text", "must be a string")
        if kind == "image_url" and not isinstance(part.get("image_url"), (dict, str)):
            raise _invalid(f"{at}.image_url", "must be an object with a url")
        if kind in ("input_audio", "file") and not isinstance(part.get(kind), dict):
            raise _invalid(f"{at}.{kind}", "must be an object")
        if kind == "refusal" and not isinstance(part.get("refusal"), str):
            raise _invalid(f"{at}.refusal", "must be a string")


def _tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise _invalid(where, "must be an array of tool calls")
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise _invalid(at, "must be a tool call object")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise _invalid(f"{at}.id", "must be a string")
        kind = call.get("type", "function")
        if not isinstance(kind, str):
            raise _invalid(f"{at}.type", "must be a string")
        if kind == "function":
            _function_call(call.get("function"), f"{at}.function")
        elif not isinstance(call.get(kind), dict):
            raise _invalid(f"{at}.{kind}", "must be an object")


def _function_call(call: Any, where: str) -> None:
    if not isinstance(call, dict):
        raise _invalid(where, "must be an object with 'name' and 'arguments'")
    if not isinstance(call.get("name"), str):
        raise _invalid(f"{where}.name", "must be a string")
    if call.get("arguments") is not None and not isinstance(call["arguments"], str):
        raise _invalid(f"{where}.arguments", "must be a string (JSON-encoded arguments)")


def _invalid(param: str, rule: str) -> BadRequest:
    return BadRequest(f"'{param}' {rule}", code="invalid_messages", param=param)


# The optional fields of a message the proxy reads (hashing, counting, memory text) or a
# provider must get right; other keys of a message (cache hints, ...) travel as JSON.
_MESSAGE_FIELDS: dict[str, Check] = {
    "name": _message_string,
    "refusal": _message_string,
    "tool_call_id": _message_string,
    "tool_calls": _tool_calls,
    "function_call": _function_call,
    "audio": _message_object,
}


# -- embeddings ------------------------------------------------------------------------------

def embedding_input(value: Any, param: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value) or all(_is_int(item) for item in value):
            return
        if all(isinstance(item, list) and item and all(_is_int(t) for t in item) for item in value):
            return
    raise BadRequest(f"'{param}' must be a string, an array of strings, or an array of token arrays",
                     code="invalid_input", param=param)


# -- protocols -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    """One client protocol's request fields and how each is forwarded."""

    name: str
    fields: Mapping[str, Check]
    required: tuple[str, ...]
    # Protocol fields that mean something else to litellm (it reads ``metadata`` for its own
    # logging and callbacks): sent on the direct path, never given to litellm as a parameter.
    not_for_litellm: frozenset[str] = frozenset()


CHAT_COMPLETIONS = Protocol(
    name="chat.completions",
    fields={
        "model": string,
        "messages": messages,
        "audio": obj,
        "frequency_penalty": number(-2, 2),
        "function_call": string_or_object,
        "functions": functions,
        "logit_bias": number_map,
        "logprobs": boolean,
        "max_completion_tokens": integer(0),
        "max_tokens": integer(0),
        "metadata": metadata,
        "modalities": strings,
        "moderation": obj,
        "n": integer(1, 128),
        "parallel_tool_calls": boolean,
        "prediction": obj,
        "presence_penalty": number(-2, 2),
        "prompt_cache_key": string,
        "prompt_cache_options": obj,
        "prompt_cache_retention": string,
        "reasoning_effort": string,
        "response_format": response_format,
        "safety_identifier": string,
        "seed": integer(),
        "service_tier": string,
        "stop": stop,
        "store": boolean,
        "stream": boolean,
        "stream_options": stream_options,
        "temperature": number(0, 2),
        "tool_choice": string_or_object,
        "tools": tools,
        "top_logprobs": integer(0, 20),
        "top_p": number(0, 1),
        "user": string,
        "verbosity": string,
        "web_search_options": obj,
    },
    required=("model", "messages"),
    not_for_litellm=frozenset({"metadata"}),
)

EMBEDDINGS = Protocol(
    name="embeddings",
    fields={
        "model": string,
        "input": embedding_input,
        "dimensions": integer(1),
        "encoding_format": string,
        "user": string,
    },
    required=("model", "input"),
)


def check(body: dict[str, Any], protocol: Protocol, passthrough: Collection[str] = ()) -> None:
    """Refuse a body with a field the protocol does not define (and the tenant does not pass
    through) or with a value of the wrong type; the 400 names the field in ``param``."""
    for name in protocol.required:
        if body.get(name) is None:
            code = "invalid_model" if name == "model" else f"invalid_{name}"
            raise BadRequest(f"'{name}' is required", code=code, param=name)
    if not isinstance(body["model"], str) or not body["model"]:
        raise BadRequest("'model' is required and must be a non-empty string", code="invalid_model", param="model")
    for name, value in body.items():
        checker = protocol.fields.get(name)
        if checker is not None:
            if value is not None:  # null means the default, as OpenAI's API reads it
                checker(value, name)
        elif name not in passthrough:
            raise unknown_field(name)


def unknown_field(name: str) -> BadRequest:
    if is_litellm_param(name):
        return BadRequest(
            f"'{name}' cannot be set by clients: the upstream, its credentials, retries and fallbacks "
            "come from the proxy's configuration",
            code="forbidden_field", param=name,
        )
    return BadRequest(
        f"Unrecognized request argument supplied: {name} (a provider extension must be listed in the "
        "tenant's passthrough_fields)",
        code="unknown_field", param=name,
    )


def split(body: Mapping[str, Any], protocol: Protocol, passthrough: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the protocol's fields, the tenant's passthrough extensions) of a body bound upstream.

    The upstream payload is built from these two and nothing else; a field in neither raises,
    so a caller that skipped ``check`` still cannot forward what the allow-list does not name.
    """
    fields: dict[str, Any] = {}
    extensions: dict[str, Any] = {}
    for name, value in body.items():
        if name in protocol.fields:
            fields[name] = value
        elif name in passthrough:
            extensions[name] = value
        else:
            raise unknown_field(name)
    return fields, extensions
