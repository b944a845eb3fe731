"""The words lexical retrieval matches on, as 48-bit hashes, for many texts in one numpy pass.

``terms`` is the definition: lowercase, words of 3+ characters from ``[a-z0-9'_-]`` that
start with a letter or digit, stop words left out. ``hash_terms`` computes each text's
distinct terms as hashes without making a Python string per word: a session's older
exchanges (~500 texts, ~350 KB, in a 1,000-message session) take ~8 ms this way against
11-19 ms word by word, which is what a request pays when its session's cached view is gone.
``term_hash`` is the same hash of one term.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9][a-z0-9'_-]{2,}")
STOP_WORDS = frozenset(
    "the and for are but not you your yours with this that have has had was were will would can could "
    "should what when where which who whom why how all any both each few more most other some such than "
    "too very just don't i'm it's its our ours they them their there here been being into from about "
    "also then once only own same out off over under again further yes okay well really like get got "
    "let's she her him his hers said say says".split()
)


def terms(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS)


def _byte_table(characters: str) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(characters.encode())] = True
    return table


_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_STARTS = _byte_table(_ALNUM)  # bytes a word can start with
_INSIDE = _byte_table(_ALNUM + "'_-")  # bytes a word is made of
# A word's hash mixes its length and its bytes 8 at a time (splitmix64's mixer). Past 256
# bytes only the length still counts: only "words" no prose has (blobs) share a hash that
# way, and a collision merely merges two terms in a ranking.
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_HASHED_BYTES = 256
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)  # the low k bytes
_EMPTY = np.zeros(0, dtype=np.int64)
# Hashes keep 48 bits, so a text's number (16 bits) and a hash sort as one uint64. Two of a
# session's ~10^4 distinct words share a hash with probability ~10^-7.
_HASH_BITS = np.uint64(48)
_HASH_MASK = np.uint64((1 << 48) - 1)
_MAX_TEXTS = 1 << 16


def _mix(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h & _HASH_MASK


def _word_hashes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, hash) of every word in ``data``: lowercased UTF-8 that begins and ends
    with a non-word byte. A word is a run of word bytes from its first letter or digit on,
    3+ bytes long: what ``_WORD.findall`` finds (a non-ASCII character's bytes are all >=
    0x80, never word bytes)."""
    edges = np.diff(_INSIDE[data].view(np.int8))
    begin = np.flatnonzero(edges == 1) + 1
    end = np.flatnonzero(edges == -1) + 1
    junk = ~_STARTS[data[begin]]
    if junk.any():  # runs that start with ' _ or -: the word starts at their first letter or digit
        starts = np.append(np.flatnonzero(_STARTS[data]), data.size)
        begin[junk] = np.minimum(starts[np.searchsorted(starts, begin[junk])], end[junk])
    keep = end - begin >= 3
    begin, length = begin[keep], (end - begin)[keep]
    if not begin.size:
        return begin, _EMPTY
    # Every word's bytes as 8-byte little-endian chunks read in place, masked to the word.
    padded = np.concatenate((data, np.zeros(8, dtype=np.uint8)))
    chunks = np.lib.stride_tricks.as_strided(padded, shape=(data.size, 8), strides=(1, 1), writeable=False)
    h = _mix(length.astype(np.uint64))
    active = np.arange(begin.size)
    for offset in range(0, _HASHED_BYTES, 8):
        if offset:
            active = active[length[active] > offset]
            if not active.size:
                break
        at = begin[active] + offset
        chunk = np.ascontiguousarray(chunks[at]).view(np.uint64).ravel()
        chunk &= _MASKS[np.minimum(length[active] - offset, 8)]
        h[active] = _mix(h[active] ^ chunk)
    return begin, h.view(np.int64)


def _stop_hashes() -> np.ndarray:
    words = sorted(STOP_WORDS)
    _, hashes = _word_hashes(np.frombuffer(" ".join(["", *words, ""]).encode(), dtype=np.uint8))
    assert hashes.size == len(words)
    return np.sort(hashes)


_STOP_HASHES = _stop_hashes()


def hash_terms(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct terms of each text as int64 hashes: (all of them, text after text, each
    text's sorted ascending; how many each text has). Matches ``terms`` through ``term_hash``."""
    count = len(texts)
    if not count:
        return _EMPTY, _EMPTY
    if count > _MAX_TEXTS:  # the text's number takes the top 16 bits of a sort key
        parts = [hash_terms(texts[i:i + _MAX_TEXTS]) for i in range(0, count, _MAX_TEXTS)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    encoded = [text.lower().encode("utf-8", "replace") for text in texts]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=count) + 1) + 1
    data = np.frombuffer(b"\n".join([b"", *encoded, b""]), dtype=np.uint8)  # "\n" around every text
    begin, h = _word_hashes(data)
    if not h.size:
        return _EMPTY, np.zeros(count, dtype=np.int64)
    owner = np.searchsorted(ends, begin, side="right").astype(np.uint64)
    stop = _STOP_HASHES[np.minimum(np.searchsorted(_STOP_HASHES, h), _STOP_HASHES.size - 1)] == h
    # One sort of (text, hash) packed in 64 bits: texts in order, each one's hashes ascending.
    keys = np.sort((owner[~stop] << _HASH_BITS) | h[~stop].view(np.uint64))
    distinct = np.ones(keys.size, dtype=bool)
    distinct[1:] = keys[1:] != keys[:-1]
    keys = keys[distinct]
    sizes = np.bincount((keys >> _HASH_BITS).astype(np.int64), minlength=count)
    return (keys & _HASH_MASK).view(np.int64), sizes


def term_hash(term: str) -> int:
    """``hash_terms``' hash of one term (a member of ``terms(...)``)."""
    _, h = _word_hashes(np.frombuffer(b" " + term.encode() + b" ", dtype=np.uint8))
    return int(h[0])


_KNOWN: dict[str, int] = {}  # term -> hash, for one text at a time (a request's query)
_KNOWN_MAX = 1 << 16


def query_hashes(text: str) -> np.ndarray:
    """``hash_terms([text])[0]`` for one short text, mostly from remembered terms: ~10 µs for a
    request's query against ~75 µs for a numpy pass over a single text."""
    words = terms(text)
    missing = [word for word in words if word not in _KNOWN]
    if missing:
        if len(_KNOWN) + len(missing) > _KNOWN_MAX:
            _KNOWN.clear()
        hashes, _ = hash_terms(missing)  # one term per text: one hash each, in order
        _KNOWN.update(zip(missing, hashes.tolist()))
    return np.sort(np.fromiter(map(_KNOWN.__getitem__, words), dtype=np.int64, count=len(words)))
