"""The SSE reader: events split anywhere across network reads come out whole, in order."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamError
from proxy.upstream import _read_sse


class _Body:
    """Stands in for ClientResponse: only ``content.iter_any()`` is read."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.content = self
        self._pieces = pieces

    async def iter_any(self):
        for piece in self._pieces:
            yield piece


def _read(pieces: list[bytes]) -> list[list[dict]]:
    async def collect():
        return [batch async for batch in _read_sse(_Body(pieces), 1 << 30)]
    return asyncio.run(collect())


CHUNKS = [{"id": "c", "choices": [{"index": 0, "delta": {"content": f"tok{i} \u00e9\n"}}]} for i in range(12)]
STREAM = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in CHUNKS) + b": keep-alive\n\ndata: [DONE]\n\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=30, unique=True))
def test_events_split_across_reads_arrive_whole_and_in_order(cuts: list[int]) -> None:
    bounds = [0] + sorted(cuts) + [len(STREAM)]
    batches = _read([STREAM[a:b] for a, b in zip(bounds, bounds[1:])])
    assert all(batches)  # no empty batch is yielded
    assert [c for batch in batches for c in batch] == CHUNKS


def test_events_read_together_come_as_one_batch() -> None:
    assert _read([STREAM]) == [CHUNKS]


def test_crlf_framing_and_done_without_final_newline() -> None:
    body = b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in CHUNKS[:2]) + b"data: [DONE]"
    assert [c for batch in _read([body]) for c in batch] == CHUNKS[:2]


def test_a_stream_cut_before_done_is_an_error() -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        _read([STREAM[: len(STREAM) // 2]])


def test_malformed_and_error_events_raise_upstream_errors() -> None:
    with pytest.raises(UpstreamError, match="malformed"):
        _read([b"data: {not json\n\n"])
    with pytest.raises(UpstreamError, match="overloaded"):
        _read([b'data: {"error": {"message": "overloaded"}}\n\n'])


def test_a_line_that_never_ends_is_refused_not_buffered_forever() -> None:
    with pytest.raises(UpstreamError, match="over 8 MiB"):
        _read([b"data: " + b"x" * (1 << 20)] * 9)
