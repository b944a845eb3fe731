"""Encoding of stored records: a format-version byte, a checksum, then orjson.

Format 2 (written now): ``b"\\x02"`` + CRC-32 of the JSON bytes (4 bytes, big-endian) + JSON.
Format 1 (written before checksums existed): ``b"\\x01"`` + JSON; still decoded, unchecked.
The checksum catches bytes changed on disk that still decode (one letter of a message): such a
record fails like an undecodable one and is quarantined by the store. Its cost is measured by
bench/integrity_bench.py (docs/PERSISTENCE.md).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import orjson

FORMAT_VERSION = 2
_UNCHECKED = 1  # records written before checksums: still readable
_HEADER = 5  # version byte + CRC-32
_pack_header = struct.Struct(">BI").pack
# The deepest nesting (of arrays and objects) a stored record may have. orjson reads 1,024
# levels but writes only 255, and what is stored is later wrapped again (a message into a
# request body, a memory into a list response): a bound well below the encoder's keeps every
# stored value sendable.
MAX_DEPTH = 128
_ENCODER_DEPTH = 255  # orjson's own limit when writing


class CorruptRecord(Exception):
    """Stored bytes that cannot be decoded into a record, or whose checksum does not match."""


class Unstorable(ValueError):
    """A value that can never be stored, read back and sent on: the writer's fault, not the disk's."""


def encode(record: Any) -> bytes:
    """A dict, or a dataclass (Message, Session): orjson writes its fields directly, much faster
    than building the dict with dataclasses.asdict first, and the same bytes.

    Raises Unstorable for a value that cannot be encoded or nests deeper than MAX_DEPTH."""
    try:
        payload = orjson.dumps(record)
    except orjson.JSONEncodeError as exc:
        raise Unstorable(_reason(exc)) from None
    if _may_be_deep(payload) and too_deep(record):
        raise Unstorable(f"nested deeper than {MAX_DEPTH} levels")
    return _pack_header(FORMAT_VERSION, zlib.crc32(payload)) + payload


def decode(raw: bytes) -> dict[str, Any]:
    """Decode bytes written by :func:`encode`; any other input raises only CorruptRecord."""
    if not raw:
        raise CorruptRecord("empty record")
    version = raw[0]
    if version == FORMAT_VERSION:
        if len(raw) < _HEADER:
            raise CorruptRecord("record shorter than its header")
        payload = memoryview(raw)[_HEADER:]
        if zlib.crc32(payload) != int.from_bytes(raw[1:_HEADER], "big"):
            raise CorruptRecord("checksum mismatch: the stored bytes were changed")
    elif version == _UNCHECKED:
        payload = memoryview(raw)[1:]
    else:
        raise CorruptRecord(f"unknown format version {raw[:1]!r}")
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(str(exc)) from exc
    if not isinstance(value, dict):
        raise CorruptRecord("record is not an object")
    if _may_be_deep(raw) and too_deep(value):  # stored before the bound: it could never be sent on
        raise CorruptRecord(f"record nested deeper than {MAX_DEPTH} levels")
    return value


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests arrays/objects deeper than ``limit`` (at most 254): asked of
    orjson itself, with ``value`` wrapped so that the encoder's own limit falls at ``limit``."""
    wrapped = value
    for _ in range(_ENCODER_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError as exc:
        return "Recursion limit" in str(exc)
    return False


def _may_be_deep(data: bytes) -> bool:
    return data.count(b"[") + data.count(b"{") > MAX_DEPTH  # fewer brackets cannot nest that deep


def _reason(exc: orjson.JSONEncodeError) -> str:
    text = str(exc)
    return f"nested deeper than {MAX_DEPTH} levels" if "Recursion limit" in text else text
