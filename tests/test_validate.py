"""Request validation at the edge (proxy/validate.py): every bad body is a 400 or 413 naming the
field at fault, and a good body comes back as it was sent."""

from __future__ import annotations

import pytest

from proxy import validate
from proxy.config import RequestLimits
from proxy.errors import BadRequest, PayloadTooLarge

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def nested(depth: int) -> object:
    """A value ``depth`` levels deep counting the outermost container: [[[...]]]."""
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_a_good_chat_body_is_returned_unchanged() -> None:
    body = {"model": "m", "messages": MESSAGES, "temperature": 0.2, "stream": True}
    assert validate.chat_body(body) is body
    assert body == {"model": "m", "messages": MESSAGES, "temperature": 0.2, "stream": True}


@pytest.mark.parametrize("body", [[], "text", None, 3])
def test_a_body_that_is_not_an_object_is_a_400(body: object) -> None:
    for check in (validate.chat_body, validate.embeddings_body):
        with pytest.raises(BadRequest) as caught:
            check(body)
        assert caught.value.code == "invalid_body" and caught.value.status == 400


def test_an_unknown_field_is_refused_unless_the_tenant_passes_it_through() -> None:
    body = {"model": "m", "messages": MESSAGES, "vendor_knob": 1}
    with pytest.raises(BadRequest) as caught:
        validate.chat_body(body)
    assert caught.value.param == "vendor_knob"
    assert validate.chat_body(body, passthrough={"vendor_knob"}) is body


def test_a_field_of_the_wrong_type_names_itself() -> None:
    with pytest.raises(BadRequest) as caught:
        validate.chat_body({"model": "m", "messages": MESSAGES, "temperature": "hot"})
    assert caught.value.param == "temperature"


def test_embeddings_bodies_have_their_own_allow_list() -> None:
    assert validate.embeddings_body({"model": "e", "input": "text"}) == {"model": "e", "input": "text"}
    with pytest.raises(BadRequest) as caught:
        validate.embeddings_body({"model": "e", "input": "text", "messages": MESSAGES})
    assert caught.value.param == "messages"


def test_nesting_up_to_the_limit_passes_and_one_level_more_names_the_top_field() -> None:
    validate.check_depth({"tools": nested(validate.MAX_DEPTH - 1)})
    with pytest.raises(BadRequest) as caught:
        validate.check_depth({"ok": 1, "tools": nested(validate.MAX_DEPTH)})
    assert (caught.value.code, caught.value.param) == ("nesting_too_deep", "tools")
    # In a top-level list there is no field name to give.
    with pytest.raises(BadRequest) as caught:
        validate.check_depth([nested(5)], limit=4)
    assert caught.value.param is None


def test_a_body_far_deeper_than_the_stack_is_refused_without_recursion() -> None:
    with pytest.raises(BadRequest):
        validate.check_depth({"a": nested(100_000)})


def test_too_many_messages_is_a_413_before_anything_else_is_checked() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x", "bogus": object()}] * 5}
    with pytest.raises(PayloadTooLarge) as caught:
        validate.chat_body(body, RequestLimits(max_messages=4))
    assert (caught.value.status, caught.value.code, caught.value.param) == (413, "too_many_messages", "messages")
    assert "5 messages" in caught.value.message and "at most 4" in caught.value.message


def test_one_message_over_its_size_limit_is_named_by_index() -> None:
    limits = RequestLimits(max_message_chars=10, max_total_chars=1000)
    messages = [{"role": "user", "content": "short"}, {"role": "user", "content": [{"type": "text", "text": "x" * 11}]}]
    with pytest.raises(PayloadTooLarge) as caught:
        validate.chat_body({"model": "m", "messages": messages}, limits)
    assert (caught.value.code, caught.value.param) == ("message_too_large", "messages[1]")


def test_tool_call_arguments_count_as_text() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "y" * 20}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(PayloadTooLarge):
        validate.chat_body({"model": "m", "messages": messages}, RequestLimits(max_message_chars=10))
    validate.chat_body({"model": "m", "messages": messages}, RequestLimits(max_message_chars=20))


def test_the_total_of_all_messages_has_its_own_limit() -> None:
    limits = RequestLimits(max_message_chars=10, max_total_chars=25)
    messages = [{"role": "user", "content": "x" * 10}] * 2
    validate.chat_body({"model": "m", "messages": messages}, limits)
    with pytest.raises(PayloadTooLarge) as caught:
        validate.chat_body({"model": "m", "messages": messages * 2}, limits)
    assert (caught.value.code, caught.value.param) == ("request_too_large", "messages")


def test_request_limits_apply_to_another_protocols_canonical_body() -> None:
    limits = RequestLimits(max_messages=2, max_message_chars=5)
    validate.request_limits({"messages": [{"role": "user", "content": "hi"}]}, limits)
    with pytest.raises(PayloadTooLarge):
        validate.request_limits({"messages": [{"role": "user", "content": "hi"}] * 3}, limits)
    with pytest.raises(PayloadTooLarge):
        validate.request_limits({"messages": [{"role": "user", "content": "too long"}]}, limits)
    validate.request_limits({"system": "no messages at all"}, limits)


@pytest.mark.parametrize("key", ["a", "req-123_ABC", "x" * validate.MAX_IDEMPOTENCY_KEY, "clé-é"])
def test_a_printable_idempotency_key_is_kept(key: str) -> None:
    assert validate.idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * (validate.MAX_IDEMPOTENCY_KEY + 1), "tab\there", "new\nline", "bad\udcff"])
def test_a_bad_idempotency_key_is_a_400_naming_the_header(key: str) -> None:
    with pytest.raises(BadRequest) as caught:
        validate.idempotency_key(key)
    assert (caught.value.code, caught.value.param) == ("invalid_idempotency_key", "Idempotency-Key")


def test_no_idempotency_key_is_none() -> None:
    assert validate.idempotency_key(None) is None
