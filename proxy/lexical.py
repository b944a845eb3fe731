"""Lexical retrieval, one stack for the whole proxy: the tokenizer (words, stop words, a light
stemmer), term ids, the BM25 weighting, and an incremental BM25 index over slots.

Long-term memory keeps a ``BM25`` index per tenant; the context stage ranks a session's older
turns with ``term_ids``/``query_ids`` and the same weighting (``term_weights``, ``length_norm``).

Postings are growable numpy arrays per term, so a query costs a few dozen vectorised operations
over the postings of all its terms at once, whatever the number of memories or terms. Removed
slots stay in the postings until the index is rebuilt (at start-up); callers mask them out, and
document frequencies are counted over what the mask lets through. So the index keeps no
per-memory list of terms (15 MB at 100k memories).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import sys
from typing import Callable, Iterable, Sequence

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
    return [term for raw in _WORD.findall(text.lower()) if (term := _term(raw)) is not None]


@functools.lru_cache(maxsize=32768)
def _term(raw: str) -> str | None:
    """The term of one lower-cased word, None for a stop word. Cached: a conversation repeats
    its vocabulary, and stemming was ~80 % of indexing a memory (0.2 ms for 160 words)."""
    raw = raw.replace("’", "'")
    if raw.endswith("'s"):
        raw = raw[:-2]
    if raw in STOPWORDS or not raw:
        return None
    word = raw.replace("'", "")
    if word in STOPWORDS:
        return None
    return sys.intern(stem(word))


def term_weights(df: Iterable[int], docs: int, k1: float) -> list[float]:
    """BM25's idf of each term times (k1 + 1), from its document frequency among ``docs``
    documents (0 for a term no document has). Python floats, term by term: the same values
    whatever the batch."""
    return [math.log(1.0 + max(docs - d + 0.5, 0.5) / (d + 0.5)) * (k1 + 1.0) if d else 0.0 for d in df]


def length_norm(lengths: np.ndarray, avg: float, k1: float, b: float) -> np.ndarray:
    """``k1 * (1 - b + b * length / avg)`` of each entry, in place (float32): a term's score is
    then ``weight * tf / (norm + tf)``."""
    lengths *= b
    lengths /= avg
    lengths += 1.0 - b
    lengths *= k1
    return lengths


def term_ids(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct terms of each text as int64 ids: (all of them, text after text, each text's
    ascending; how many each text has). Ids are the terms' hashes: stable within the process,
    which is as long as anything keeps them."""
    rows = [sorted(_ids(text)) for text in texts]
    sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(sizes.sum())), sizes


def query_ids(text: str) -> np.ndarray:
    """``term_ids([text])[0]``: one text's distinct term ids, ascending."""
    return np.array(sorted(_ids(text)), dtype=np.int64)


_WORD_IDS: dict[str, int] = {}  # lower-cased word -> its term's id (0: a stop word)
_WORD_IDS_MAX = 1 << 17


def _ids(text: str) -> set[int]:
    words = set(_WORD.findall(text.lower()))
    missing = words.difference(_WORD_IDS)
    if missing:
        if len(_WORD_IDS) + len(missing) > _WORD_IDS_MAX:
            _WORD_IDS.clear()
            missing = words
        for word in missing:
            term = _term(word)
            _WORD_IDS[word] = 0 if term is None else hash(term)
    ids = set(map(_WORD_IDS.__getitem__, words))
    ids.discard(0)
    return ids


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

    sample = 2048  # scores sampled for a top-``limit`` threshold (``_top``)

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._postings: dict[str, _Postings] = {}
        self._length = np.zeros(1024, dtype=np.float32)
        self._present = np.zeros(1024, dtype=bool)
        self._total = 0.0
        self._end = 0  # 1 + the highest slot ever indexed
        self.docs = 0

    def add(self, slot: int, terms: Iterable[str]) -> None:
        """Index a new slot. Slots are never reused: a removed one stays in the postings."""
        if slot < len(self._present) and self._present[slot]:
            raise ValueError(f"slot {slot} is already indexed")
        counts: dict[str, int] = {}
        for term in terms:
            term = sys.intern(term)  # one string per distinct term, not per occurrence
            counts[term] = counts.get(term, 0) + 1
        if slot >= len(self._length):
            size = max(slot + 1, len(self._length) * 2)
            self._length = np.concatenate([self._length, np.zeros(size - len(self._length), dtype=np.float32)])
            self._present = np.concatenate([self._present, np.zeros(size - len(self._present), dtype=bool)])
        length = float(sum(counts.values()))
        self._length[slot], self._present[slot] = length, True
        self._end = max(self._end, slot + 1)
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
        """Top ``limit`` slots (and scores) admitted by ``admit(slots) -> bool mask``, best first
        (equal scores by slot), and the score of an ideal match (every query term, for normalising).

        Document frequencies are counted within what ``admit`` lets through, out of ``docs``
        documents (the scope's size): a user's vocabulary is weighed against the user's own
        memories, not against every other user's of the tenant.

        One pass over the postings of all the query's terms at once (``admit`` is called once):
        a few dozen numpy calls per query however many terms it has.
        """
        empty = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), 0.0
        if self.docs <= 0:
            return empty
        postings = [p for p in map(self._postings.get, set(terms)) if p is not None]
        if not postings:
            return empty
        # Entries in term order, each term's in slot order (int64: admit's gathers need no cast).
        counts = [p.n for p in postings]
        slots = np.concatenate([p.slots[: p.n] for p in postings], dtype=np.int64)
        keep = admit(slots)
        df = np.add.reduceat(keep, np.cumsum([0] + counts[:-1]), dtype=np.int64)  # admitted entries per term
        total = max(docs if docs is not None else self.docs, 1)
        # Per term as term by term (0 for a term nothing admitted matches), so the same floats.
        weight = term_weights(df.tolist(), total, self.k1)
        ideal = 0.0
        for w in weight:
            ideal += w  # as term by term (sum() compensates rounding from Python 3.12 on)
        if ideal == 0.0:
            return empty
        tf = np.concatenate([p.tfs[: p.n] for p in postings])
        admitted = int(df.sum())
        compress = 5 * admitted < 4 * len(slots)  # else the few others are scored 0, not dropped
        if compress:
            slots, tf, counts = slots[keep], tf[keep], df
        # The score of each entry, in the same float32 operations as term by term.
        avg = max(self._total / self.docs, 1e-6)
        norm = length_norm(self._length[slots], avg, self.k1, self.b)
        norm += tf
        part = np.repeat(np.array(weight, dtype=np.float32), counts)
        part *= tf
        if not compress:
            part *= keep
        part /= norm
        scores = np.zeros(self._end, dtype=np.float32)
        np.add.at(scores, slots, part)  # in term order per slot: the same sums as term by term
        return (*self._top(scores, len(slots), limit), ideal)

    def _top(self, scores: np.ndarray, matched: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``limit`` best-scoring slots (positive scores only), best first and equal scores
        by slot; ``matched``: how many slots may have a positive score, at most."""
        if limit <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        found = None
        if matched > 8 * limit and len(scores) >= 2 * self.sample:
            # A threshold at most the limit-th best score keeps few candidates without
            # partitioning all the matches: a sample of every slot's score (0 if unmatched)
            # whose rank puts about four times the limit above it.
            stride = len(scores) // self.sample
            sample = scores[::stride]
            rank = min(len(sample) - 1, -(-4 * limit // stride))
            threshold = np.partition(sample, len(sample) - 1 - rank)[len(sample) - 1 - rank]
            if threshold > 0:
                found = np.flatnonzero(scores >= threshold)
                if len(found) < limit:  # an unlucky sample: keep them all
                    found = None
        if found is None:
            found = np.flatnonzero(scores > 0)
            if len(found) > limit:  # the limit-th best score: keep what is not below it
                top = scores[found]
                found = found[top >= np.partition(top, len(top) - limit)[len(top) - limit]]
        order = np.argsort(-scores[found], kind="stable")[:limit]
        found = found[order]
        return found, scores[found]
