"""Raw HTTP abuse: malformed requests and bodies that never end get OpenAI-shaped errors, quietly."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Iterator

import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import ProxyThread, local_config, start_thread


@pytest.fixture
def hardened(tmp_path: Path, upstream: FakeUpstream) -> Iterator[ProxyThread]:
    path = local_config(tmp_path, upstream.base_url, {"server": {"body_read_timeout_seconds": 1}})
    with start_thread(path) as running:
        yield running


def exchange(proxy: ProxyThread, raw: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes or the response body is complete."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(raw)
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
            head, _, body = received.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return int(lines[0].split()[1]), headers, body


MALFORMED = {
    "request line too long": b"GET /" + b"A" * 20000 + b"SECRETPATH HTTP/1.1\r\nHost: x\r\n\r\n",
    "header too long": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"B" * 20000 + b"SECRETVALUE\r\n\r\n",
    "control character in a header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: abc\x01SECRETVALUE\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01SECRETVALUE garbage\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_gets_an_openai_error_without_echo_or_traceback(hardened: ProxyThread, raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        status, headers, body = exchange(hardened, raw)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http_request" and error["message"]
    assert b"SECRET" not in body
    parser_records = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(parser_records) == 1 and parser_records[0].levelno <= logging.WARNING
    assert not any(r.exc_info for r in caplog.records), "a parser error must not log a traceback"
    assert "SECRET" not in caplog.text
    # The proxy still serves.
    assert exchange(hardened, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200


def test_a_chunked_body_that_never_ends_gets_408(hardened: ProxyThread, upstream: FakeUpstream) -> None:
    start = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n" b"5\r\n{\"mod\r\n")  # ...and the last chunk never comes
    status, headers, body = exchange(hardened, start)
    assert status == 408
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert upstream.chat_requests == []


@pytest.mark.parametrize("framing", [
    b"Content-Encoding: gzip\r\nContent-Length: 16\r\n\r\nSECRETnot-gzip!!",
    b"Content-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nSECRETnot-zlib!!\r\n0\r\n\r\n",
], ids=["gzip", "deflate-chunked"])
def test_a_body_that_contradicts_its_encoding_is_a_400(hardened: ProxyThread, framing: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        status, headers, body = exchange(hardened, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + framing)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_body" and b"SECRET" not in body
    assert not any(r.exc_info for r in caplog.records) and "SECRET" not in caplog.text


def test_a_slow_but_complete_body_within_the_timeout_is_served(hardened: ProxyThread) -> None:
    payload = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    status, _, body = exchange(hardened, raw)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "echo: hi"


def test_repository_config_spells_out_the_embedded_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.config import load_config
    from tests.harness import REPO

    monkeypatch.delenv("ASP_UPSTREAM_BASE", raising=False)
    from_files, embedded = load_config(REPO / "config" / "proxy.yaml"), load_config(None)
    assert from_files.body_read_timeout == embedded.body_read_timeout == 30
    assert from_files.operator_key_hashes == embedded.operator_key_hashes == frozenset()
    assert from_files.tenants["default"].max_response_bytes == embedded.tenants["default"].max_response_bytes == 32 << 20
    assert from_files.tenants["default"].quotas == embedded.tenants["default"].quotas


def test_serve_answers_parser_errors_in_json_too(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The real `agent-state-proxy serve` process, not only the test harness, uses the JSON error protocol."""
    from tests.harness import ProxyProcess

    path = local_config(tmp_path, upstream.base_url, {"server": {"body_read_timeout_seconds": 1}})
    process = ProxyProcess(path).start()
    try:
        status, headers, body = exchange(process, MALFORMED["control character in a header"])
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_http_request"
        hung = exchange(process, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert hung[0] == 408
    finally:
        assert process.stop() == 0  # SIGTERM still drains and exits cleanly
    log = process.log()
    assert log.count("malformed HTTP request from 127.0.0.1") == 1
    assert "Traceback" not in log and "SECRET" not in log
