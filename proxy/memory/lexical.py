"""Lexical retrieval: a tokenizer and an incremental in-memory BM25 index over memory slots.

Postings are growable numpy arrays per term, so a query costs a few vectorised operations per
query term whatever the number of memories. Removed slots stay in the postings until the index
is rebuilt (at start-up); callers mask them out, and document frequencies are counted over what
the mask lets through. So the index keeps no per-memory list of terms (15 MB at 100k memories).
"""

from __future__ import annotations

import math
import re
import sys
from typing import Callable, Iterable

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")

# Function words that carry no topic: dropping them keeps postings short and scores focused.
STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being
below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down
during each few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here
here's hers herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its
itself let's me more most mustn't my myself no nor not of off on once only or other ought our ours
ourselves out over own same shan't she she'd she'll she's should shouldn't so some such than that
that's the their theirs them themselves then there there's these they they'd they'll they're they've
this those through to too under until up very was wasn't we we'd we'll we're we've were weren't what
what's when when's where where's which while who who's whom why why's will with won't would wouldn't
you you'd you'll you're you've your yours yourself yourselves just also really yeah oh hey hi ok okay
get got s t ll re ve d m o y
""".split())


# Small talk: a message made only of these (and stop words) asks nothing worth recalling.
PHATIC = frozenset("""
hello hi hey hiya howdy yo thanks thank thx ty cheers bye goodbye later ok okay k sure yes yep yeah no
nope cool great nice awesome perfect good fine lol haha morning evening night welcome please sorry
right alright got it glad wow gotcha np thankyou
""".split())


def has_content(text: str) -> bool:
    """Whether ``text`` has a term beyond stop words and small talk (else recall is skipped)."""
    phatic = _phatic_terms()
    return any(term not in phatic for term in tokenize(text))


def _phatic_terms() -> frozenset[str]:
    global _PHATIC_TERMS
    if _PHATIC_TERMS is None:
        _PHATIC_TERMS = PHATIC | {stem(word) for word in PHATIC}
    return _PHATIC_TERMS


_PHATIC_TERMS: frozenset[str] | None = None


def stem(word: str) -> str:
    """A light suffix stripper (plurals, -ing, -ed, -ly): enough to match 'painted' with 'paint'."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            if len(base) >= 4 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # running -> run, planned -> plan
            elif base.endswith(("at", "iz", "bl")):
                base += "e"  # created -> create
            return base
    if word.endswith("ly") and len(word) > 5:
        return word[:-2]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased, stop-worded, stemmed terms of ``text`` (possessives dropped)."""
    terms = []
    for raw in _WORD.findall(text.lower()):
        raw = raw.replace("’", "'")
        if raw.endswith("'s"):
            raw = raw[:-2]
        if raw in STOPWORDS or not raw:
            continue
        word = raw.replace("'", "")
        if word in STOPWORDS:
            continue
        terms.append(stem(word))
    return terms


class _Postings:
    __slots__ = ("slots", "tfs", "n")

    def __init__(self) -> None:
        self.slots = np.empty(4, dtype=np.int32)
        self.tfs = np.empty(4, dtype=np.float32)
        self.n = 0

    def append(self, slot: int, tf: float) -> None:
        if self.n == len(self.slots):
            self.slots = np.resize(self.slots, self.n * 2)
            self.tfs = np.resize(self.tfs, self.n * 2)
        self.slots[self.n] = slot
        self.tfs[self.n] = tf
        self.n += 1


class BM25:
    """Okapi BM25 over slots; ``add``/``remove`` are incremental, ``search`` is vectorised."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._postings: dict[str, _Postings] = {}
        self._length = np.zeros(1024, dtype=np.float32)
        self._present = np.zeros(1024, dtype=bool)
        self._total = 0.0
        self.docs = 0

    def add(self, slot: int, terms: Iterable[str]) -> None:
        """Index a new slot. Slots are never reused: a removed one stays in the postings."""
        if slot < len(self._present) and self._present[slot]:
            raise ValueError(f"slot {slot} is already indexed")
        counts: dict[str, int] = {}
        for term in terms:
            term = sys.intern(term)  # one string per distinct term, not per occurrence (~25 MB at 100k)
            counts[term] = counts.get(term, 0) + 1
        if slot >= len(self._length):
            size = max(slot + 1, len(self._length) * 2)
            self._length = np.concatenate([self._length, np.zeros(size - len(self._length), dtype=np.float32)])
            self._present = np.concatenate([self._present, np.zeros(size - len(self._present), dtype=bool)])
        length = float(sum(counts.values()))
        self._length[slot], self._present[slot] = length, True
        self._total += length
        self.docs += 1
        for term, tf in counts.items():
            postings = self._postings.get(term)
            if postings is None:
                postings = self._postings[term] = _Postings()
            postings.append(slot, tf)

    def remove(self, slot: int) -> None:
        if slot >= len(self._present) or not self._present[slot]:
            return
        self._present[slot] = False
        self._total -= float(self._length[slot])
        self.docs -= 1
        # Postings keep the slot; searches mask removed slots out. Rebuilt at start-up.

    def __len__(self) -> int:
        return self.docs

    def search(self, terms: Iterable[str], admit: Callable[[np.ndarray], np.ndarray], limit: int,
               docs: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Top ``limit`` slots (and scores) admitted by ``admit(slots) -> bool mask``, best first,
        and the score of an ideal match (every query term, for normalising).

        Document frequencies are counted within what ``admit`` lets through, out of ``docs``
        documents (the scope's size): a user's vocabulary is weighed against the user's own
        memories, not against every other user's of the tenant.
        """
        empty = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), 0.0
        if self.docs <= 0:
            return empty
        total = max(docs if docs is not None else self.docs, 1)
        avg = max(self._total / self.docs, 1e-6)
        scores: np.ndarray | None = None
        ideal = 0.0
        for term in set(terms):
            postings = self._postings.get(term)
            if postings is None:
                continue
            slots = postings.slots[: postings.n]
            keep = admit(slots)
            df = int(np.count_nonzero(keep))
            if df == 0:
                continue
            slots, tf = slots[keep], postings.tfs[: postings.n][keep]
            idf = math.log(1.0 + max(total - df + 0.5, 0.5) / (df + 0.5))
            ideal += idf * (self.k1 + 1.0)
            norm = tf + self.k1 * (1.0 - self.b + self.b * self._length[slots] / avg)
            if scores is None:
                scores = np.zeros(len(self._length), dtype=np.float32)
            scores[slots] += (idf * (self.k1 + 1.0)) * tf / norm
        if scores is None:
            return empty
        found = np.flatnonzero(scores)
        if len(found) > limit:
            part = np.argpartition(-scores[found], limit - 1)[:limit]
            found = found[part]
        order = np.argsort(-scores[found], kind="stable")
        found = found[order]
        return found, scores[found], ideal
