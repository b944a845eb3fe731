"""Validation of client request bodies, before anything is stored or forwarded."""

from __future__ import annotations

from typing import Any

from proxy.errors import BadRequest

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Fields litellm would honour to change where or as whom a request goes: never from clients.
FORBIDDEN_FIELDS = {
    "api_base", "base_url", "api_key", "api_version", "custom_llm_provider", "organization",
    "extra_headers", "headers", "litellm_params", "aws_access_key_id", "aws_secret_access_key",
    "vertex_credentials", "azure_ad_token", "mock_response", "user_api_key",
}


def chat_body(body: Any) -> dict[str, Any]:
    """Check a chat completion request; raise BadRequest naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    _check_forbidden(body)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("'model' is required and must be a non-empty string", code="invalid_model", )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty array", code="invalid_messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object", code="invalid_messages")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}", code="invalid_messages")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{index}].content must be a string or an array", code="invalid_messages")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise BadRequest(f"messages[{index}].tool_call_id is required for tool messages", code="invalid_messages")
    for key, kind, label in (("stream", bool, "a boolean"), ("n", int, "an integer"), ("tools", list, "an array")):
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise BadRequest(f"'{key}' must be {label}", code="invalid_type")
    if body.get("n") is not None and not 1 <= body["n"] <= 128:
        raise BadRequest("'n' must be between 1 and 128", code="invalid_value")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", code="invalid_type")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object", code="invalid_type")
    return body


def embeddings_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    _check_forbidden(body)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("'model' is required and must be a non-empty string", code="invalid_model")
    value = body.get("input")
    if not (isinstance(value, str) or (isinstance(value, list) and value)):
        raise BadRequest("'input' must be a string or a non-empty array", code="invalid_input")
    return body


def _check_forbidden(body: dict[str, Any]) -> None:
    forbidden = sorted(FORBIDDEN_FIELDS & body.keys())
    if forbidden:
        raise BadRequest(
            f"'{forbidden[0]}' cannot be set by clients: the upstream is configured by the proxy",
            code="forbidden_field",
        )
