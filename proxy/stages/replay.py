"""The replay stage: a request retried under its Idempotency-Key is answered from its record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import ProxyError
from proxy.storage.base import Store

IDEMPOTENCY_KIND = "idempotency"


@dataclass(frozen=True)
class Idempotency:
    """A request's Idempotency-Key (hashed), its body's fingerprint, and the recorded answer
    when the key was used before (None: a first attempt)."""

    key: str
    fingerprint: str
    recorded: dict[str, Any] | None


def request_fingerprint(body: dict[str, Any]) -> str:
    """The request as a hash, key order ignored: a retry under one Idempotency-Key must match it."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def find(store: Store, tenant: str, session_id: str, idempotency_key: str | None, body: dict[str, Any]) -> Idempotency | None:
    """None without a key; else the key's record, refused (422) when it came with another body."""
    if not idempotency_key:
        return None
    key = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    fingerprint = request_fingerprint(body)
    recorded = await store.get_record(tenant, IDEMPOTENCY_KIND, key, session_id)
    if recorded is not None and recorded.get("fingerprint", fingerprint) != fingerprint:
        raise ProxyError("this Idempotency-Key was used with a different request body; use a new key",
                         status=422, type="invalid_request_error", code="idempotency_key_reused")
    return Idempotency(key, fingerprint, recorded)
