"""The Responses SSE encoding: every rendered event on the wire, once, in order, as it was rendered."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from proxy.protocols import responses
from proxy.protocols.responses_render import StreamRenderer, sse

FIXTURES = Path(__file__).parent / "fixtures" / "responses"


def decode(buffer: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in buffer.decode().split("\n\n")[:-1]:
        kind, data = block.split("\n")
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_each_event_is_encoded_once_with_its_own_type_and_the_shared_snapshot_in_both() -> None:
    codex = json.loads((FIXTURES / "codex_request.json").read_text())["body"]
    parsed = responses.parse(codex)
    renderer = StreamRenderer("resp_" + "e" * 32, parsed.echo, "fake-model", 1700000000, parsed.namespaces)
    chunks = json.loads((FIXTURES / "chat_streams.json").read_text())["tool"]
    batches = [renderer.start()] + [renderer.feed(chunk) for chunk in chunks] + [renderer.finish()]
    wire = b"".join(sse(batch) for batch in batches)
    rendered = [event for batch in batches for event in batch]
    assert decode(wire) == [(event["type"], orjson.loads(orjson.dumps(event))) for event in rendered]
    created, in_progress = decode(wire)[:2]
    assert created[1]["response"] == in_progress[1]["response"] and created[1]["response"]["tools"] == parsed.echo["tools"]
    assert wire.count(b'"type":"response.created"') == 1 and wire.count(b"event: response.in_progress\n") == 1
    # An idempotent replay sends the whole stream as one buffer: the snapshot and the final
    # response (different objects) in one encoding.
    assert decode(sse(rendered)) == decode(wire)
