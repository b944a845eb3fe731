"""One tenant's searchable memory: slot metadata, BM25, exact vector copies and the HNSW index,
and hybrid retrieval over them (dense + lexical, reciprocal rank fusion, recency, threshold).

Everything here runs on the event loop thread except ``VectorIndex`` insertions, which the
service's writer thread performs; it holds no text beyond hashes (texts are read from LMDB for
the few memories that are returned).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import numpy as np

from proxy import lexical
from proxy.memory.columns import NONE, Columns, KeySlots
from proxy.memory.ids import MemoryIds
from proxy.memory.model import EPISODIC, PROCEDURAL, SEMANTIC, TYPES, Memory, Scope, text_hash
from proxy.memory.slots import EMPTY as NO_SLOTS, SlotSet, union as union_of
from proxy.memory.vectors import EXACT_MAX, Mirror, VectorIndex

_TYPE_CODE = {t: i for i, t in enumerate(TYPES)}
_TENANT_GROUP = -1


class Fusion(NamedTuple):
    """How the dense and lexical rankings become one. The defaults were chosen on LoCoMo; the
    leave-one-conversation-out protocol of bench/memory_locomo.py finds the same region (the
    surface is flat there, docs/MEMORY.md), so they are not fitted to those conversations: a small RRF k
    favours the top of each list, the lexical list outweighs the dense one (MiniLM misses names
    and rare words BM25 nails), and the neighbours (previous and next message of the same
    session) of the best hits share their score, since a conversation spreads one topic over
    adjacent turns. With ``by_score`` each ranker's reciprocal rank is scaled by the hit's score
    relative to that ranker's best: rank alone gives a match on one common word (a name said in
    every other message) the same weight as a full match at the same rank."""

    rrf_k: float = 10
    lexical_weight: float = 2.0
    neighbour_share: float = 0.5
    neighbour_sources: int = 10
    by_score: bool = True


FUSION = Fusion()
CANDIDATES = 50  # per ranker, before fusion
RELEASE_BATCH = 1024  # copies a released group gathers (new memories) before they are released too
STRONG_LEXICAL = 0.5  # a lexical match this complete passes without a dense score
LEXICAL_ONLY_MIN = 0.2  # without a query vector (embedder down), the bar for a lexical match


class Lexical(NamedTuple):
    admit: Callable[[np.ndarray], np.ndarray]  # the scope (and type) filter of the search
    slots: np.ndarray
    scores: np.ndarray
    best: float  # the query's best possible BM25 score


@dataclass
class Hit:
    slot: int
    id: str
    score: float  # fused
    cosine: float | None
    lexical: float  # BM25 score normalised to [0, 1] by the query's best possible score


class _Where:
    """slot -> (session id, type), read from the columns: a tuple per memory cost 6 MB at 100k."""

    def __init__(self, tenant: TenantMemory) -> None:
        self._tenant = tenant

    def __len__(self) -> int:
        return len(self._tenant.ids)

    def __getitem__(self, slot: int) -> tuple[str | None, str]:
        cols = self._tenant.cols
        session = int(cols.session[slot])
        return (self._tenant.session_ids[session][0] if session >= 0 else None), TYPES[cols.kind[slot]]


class TenantMemory:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cols = Columns()
        self.bm25 = lexical.BM25()
        self.mirror: Mirror | None = None  # created with the first vector (its size is the dim)
        self._vectors: VectorIndex | None = None
        self.hnsw_ready = False  # the index holds every vector (loaded or rebuilt)
        self.ids = MemoryIds()  # slot -> id and back
        self.key_slot = KeySlots()
        self.where = _Where(self)  # slot -> (session id, type)
        self._users: dict[str, int] = {}
        self._sessions: dict[tuple[str, float | None], int] = {}
        self.session_ids: list[tuple[str, float | None]] = []
        self.session_slots: dict[int, SlotSet] = {}
        self.sessionless: dict[int, SlotSet] = {}  # user code -> API memories without a session
        self.procedural: dict[int, SlotSet] = {}  # user code (-1 tenant) -> procedural slots
        self.tenant_wide = SlotSet()  # memories without user and session
        self.by_position: dict[tuple[int, int], int] = {}  # (session code, seq) -> slot
        self.group_sizes: dict[int, int] = {}  # user code -> live memories
        self.alive = 0
        self.next_key = 0
        self.unembedded: set[str] = set()  # ids stored without a vector (embedder was down)

    @property
    def vectors(self) -> VectorIndex | None:
        """The HNSW index; the service sets it once loaded or built (or None)."""
        return self._vectors

    @vectors.setter
    def vectors(self, index: VectorIndex | None) -> None:
        self._vectors = index
        self._release_copies(list(self.mirror._groups) if self.mirror is not None else [])

    def _release_copies(self, groups: list[int]) -> None:
        """Drop the exact copies of groups only ever searched through the index (over EXACT_MAX)
        for the vectors the index holds; vectors it does not hold yet stay until a next round."""
        index, mirror = self._vectors, self.mirror
        if index is None or mirror is None:
            return
        for code in groups:
            if mirror.size([code]) > EXACT_MAX:
                mirror.release(code, lambda slots: index.contains(self.cols.ukey[slots]))

    def _indexed_vectors(self, slots: np.ndarray) -> np.ndarray:
        """Mirror.lookup: released vectors, read back from the index."""
        assert self.mirror is not None
        if self._vectors is None:
            return np.zeros((len(slots), self.mirror.dim), dtype=np.float32)
        return self._vectors.vectors(self.cols.ukey[slots])

    def _add_vector(self, slot: int, group: int, vector: np.ndarray) -> None:
        if self.mirror is None:
            self.mirror = Mirror(len(vector))
            self.mirror.lookup = self._indexed_vectors
        if len(vector) != self.mirror.dim:
            return
        self.mirror.add(slot, group, vector)
        if self.mirror.released([group]) and self.mirror.held(group) >= RELEASE_BATCH:
            self._release_copies([group])

    # -- writes ------------------------------------------------------------------------------

    def user_code(self, user: str | None, create: bool = False) -> int:
        if user is None:
            return NONE
        code = self._users.get(user)
        if code is None and create:
            code = self._users[user] = len(self._users)
        return NONE - 1 if code is None else code  # -2 matches nothing

    def session_code(self, session: str | None, created: float | None, create: bool = False) -> int:
        if session is None:
            return NONE
        code = self._sessions.get((session, created))
        if code is None and create:
            code = self._sessions[(session, created)] = len(self.session_ids)
            self.session_ids.append((session, created))
        return NONE - 1 if code is None else code

    def sessions_named(self, session: str) -> list[int]:
        return [code for (sid, _), code in self._sessions.items() if sid == session]

    def insert(self, memory: Memory) -> int:
        """Make ``memory`` searchable (lexically at once, densely when it has a vector)."""
        if memory.id in self.ids:
            self.remove(memory.id)
        slot = len(self.ids)
        self.cols.ensure(slot)
        user = self.user_code(memory.user, create=True)
        session = self.session_code(memory.session, memory.session_created, create=True)
        cols = self.cols
        cols.user[slot], cols.session[slot] = user, session
        cols.kind[slot] = _TYPE_CODE[memory.type]
        cols.ts[slot] = memory.ts
        cols.alive[slot] = True
        cols.texthash[slot] = text_hash(memory.text)
        cols.ukey[slot] = memory.key
        cols.seq[slot] = -1 if memory.seq is None else memory.seq
        self.ids.append(memory.id)
        self.key_slot[memory.key] = slot
        self.next_key = max(self.next_key, memory.key + 1)
        if session != NONE:
            self.session_slots.setdefault(session, SlotSet()).add(slot)
            if memory.seq is not None:
                self.by_position[(session, memory.seq)] = slot
        elif user != NONE:
            self.sessionless.setdefault(user, SlotSet()).add(slot)
        else:
            self.tenant_wide.add(slot)
        if memory.type == PROCEDURAL and not memory.extracted:  # extracted ones are recalled by relevance
            self.procedural.setdefault(user, SlotSet()).add(slot)
        self.bm25.add(slot, lexical.tokenize(index_text(memory)))
        if user != NONE:
            self.group_sizes[user] = self.group_sizes.get(user, 0) + 1
        if memory.vector is not None:
            self._add_vector(slot, self.group_of(user, session), memory.vector)
            if self.mirror is not None and slot in self.mirror:
                self.unembedded.discard(memory.id)
        else:
            self.unembedded.add(memory.id)
        self.alive += 1
        return slot

    def attach_vector(self, memory_id: str, vector: np.ndarray) -> int | None:
        """A memory stored without a vector got one: add it to the exact copies."""
        slot = self.ids.slot(memory_id)
        if slot is None:
            return None
        if self.mirror is not None and slot in self.mirror:
            return slot
        self._add_vector(slot, self.group_of(int(self.cols.user[slot]), int(self.cols.session[slot])), vector)
        self.unembedded.discard(memory_id)
        return slot

    @staticmethod
    def group_of(user: int, session: int) -> int:
        if user != NONE:
            return user
        if session != NONE:
            return -2 - session  # an anonymous session is its own group
        return _TENANT_GROUP

    def remove(self, memory_id: str) -> int | None:
        """Forget one memory; returns its usearch key (for the writer to remove) or None."""
        slot = self.ids.remove(memory_id)
        if slot is None:
            return None
        cols = self.cols
        cols.alive[slot] = False
        key = int(cols.ukey[slot])
        self.key_slot.pop(key, None)
        session, user = int(cols.session[slot]), int(cols.user[slot])
        self.session_slots.get(session, NO_SLOTS).discard(slot)
        if self.by_position.get((session, int(cols.seq[slot]))) == slot:
            del self.by_position[(session, int(cols.seq[slot]))]
        self.sessionless.get(user, NO_SLOTS).discard(slot)
        self.procedural.get(user, NO_SLOTS).discard(slot)
        self.tenant_wide.discard(slot)
        if user != NONE:
            self.group_sizes[user] -= 1
        self.bm25.remove(slot)
        if self.mirror is not None:
            self.mirror.remove(slot)
        self.unembedded.discard(memory_id)
        self.alive -= 1
        return key

    def session_memories(self, session: str) -> list[str]:
        found = []
        for code in self.sessions_named(session):
            found += [self.ids[s] for s in self.session_slots.get(code, ()) if self.ids[s]]
        return found

    # -- reads -------------------------------------------------------------------------------

    def admit(self, scope: Scope, types: Iterable[str] = (EPISODIC, SEMANTIC)):
        """A vectorised predicate: which of these slots the scope may see."""
        cols = self.cols
        codes = {_TYPE_CODE[t] for t in types}
        # The type test is one comparison of the gathered codes where it can be (a lookup table
        # indexed by them would cast them first), and none when every type is wanted.
        type_test: Callable[[np.ndarray], np.ndarray] | None = None
        if len(codes) == 1:
            (only,) = codes
            type_test = lambda kind: kind == only  # noqa: E731
        elif len(codes) == len(TYPES) - 1:
            (other,) = set(_TYPE_CODE.values()) - codes
            type_test = lambda kind: kind != other  # noqa: E731
        elif len(codes) < len(TYPES):
            type_ok = np.zeros(len(TYPES), dtype=bool)
            type_ok[list(codes)] = True
            type_test = lambda kind: type_ok[kind]  # noqa: E731
        user = self.user_code(scope.user)
        if scope.kind == "session":
            sessions = np.array(self.sessions_named(scope.session) if scope.session else [], dtype=np.int32)

        def check(slots: np.ndarray) -> np.ndarray:
            ok = cols.alive[slots]
            if type_test is not None:
                ok &= type_test(cols.kind[slots])
            if scope.kind == "tenant":
                return ok
            owner = cols.user[slots]
            if scope.kind == "user":
                visible = owner == user
                # Or tenant-wide (no user, no session): only the user-less slots' sessions are read.
                anonymous = np.flatnonzero(owner == NONE)
                if len(anonymous):
                    visible[anonymous] |= cols.session[slots[anonymous]] == NONE
            else:
                session = cols.session[slots]
                visible = (owner == NONE) & (session == NONE)  # tenant-wide
                visible |= (session == sessions[0]) if len(sessions) == 1 else np.isin(session, sessions)
                if scope.user is not None:
                    visible |= (owner == user) & (session == NONE)
            ok &= visible
            return ok

        return check

    def _groups(self, scope: Scope) -> list[int] | None:
        if scope.kind == "tenant":
            return None
        if scope.kind == "user":
            return [self.user_code(scope.user), _TENANT_GROUP]
        return []  # session scope enumerates slots instead

    def _session_scope_slots(self, scope: Scope) -> np.ndarray:
        groups = [self.session_slots.get(code, NO_SLOTS) for code in (self.sessions_named(scope.session) if scope.session else [])]
        if scope.user is not None:
            groups.append(self.sessionless.get(self.user_code(scope.user), NO_SLOTS))
        groups.append(self.tenant_wide)
        return union_of(groups)

    def dense(self, query: np.ndarray, scope: Scope, admit, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``limit`` admitted slots by cosine: exact for small scopes, HNSW for large ones."""
        mirror = self.mirror
        if mirror is None or len(query) != mirror.dim:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if scope.kind == "session":
            slots = self._session_scope_slots(scope)
            slots = slots[admit(slots)] if len(slots) else slots
            sims = mirror.score(query, slots)
            order = np.argsort(-sims, kind="stable")[:limit]
            return slots[order], sims[order]
        groups = self._groups(scope)
        size = mirror.size(groups) if groups is not None else self.alive
        # A group whose copies were released is searched through the index whatever its size,
        # even while a new one is being built (the one set is complete meanwhile).
        if self._vectors is not None and (mirror.released(groups) or (self.hnsw_ready and size > EXACT_MAX)):
            return self._hnsw(query, admit, limit, size)
        return mirror.search(query, groups, limit, admit)

    def _hnsw(self, query: np.ndarray, admit, limit: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.vectors is not None
        total = max(len(self.vectors), 1)
        fraction = max(size / total, 1e-4)
        count = min(total, max(limit * 2, int(limit / fraction * 1.5)))
        while True:
            keys, sims = self.vectors.search(query, count)
            slots = self.key_slot.lookup(keys)
            keep = slots >= 0
            slots, sims = slots[keep], sims[keep]
            if len(slots):
                keep = admit(slots)
                slots, sims = slots[keep], sims[keep]
            if len(slots) >= limit or count >= total or count >= 8192:
                return slots[:limit], sims[:limit]
            count = min(total, count * 4)

    def lexical(self, text: str, scope: Scope, types: Iterable[str] = (EPISODIC, SEMANTIC)) -> Lexical:
        """The BM25 half of a search; it needs no query vector, so it runs while that is computed."""
        admit = self.admit(scope, types)
        return Lexical(admit, *self.bm25.search(lexical.tokenize(text), admit, CANDIDATES, self.scope_size(scope)))

    def search(
        self, text: str, query: np.ndarray | None, scope: Scope, *, top_k: int, min_score: float,
        half_life_days: float | None = None, exclude_hashes: frozenset[int] | set[int] = frozenset(),
        types: Iterable[str] = (EPISODIC, SEMANTIC), now: float | None = None, lexical_part: Lexical | None = None,
        fusion: Fusion = FUSION,
    ) -> list[Hit]:
        """Hybrid retrieval: dense and BM25 candidates fused by reciprocal rank.

        ``lexical_part``: ``self.lexical(text, scope, types)`` computed beforehand."""
        if self.alive == 0:
            return []
        admit, lex_slots, lex_scores, best_lexical = lexical_part or self.lexical(text, scope, types)
        fused: dict[int, float] = {}
        cosine: dict[int, float] = {}
        lexical_score: dict[int, float] = {}
        lex_shares = _shares(lex_scores, fusion)
        for rank, (slot, score) in enumerate(zip(lex_slots.tolist(), lex_scores.tolist())):
            fused[slot] = fusion.lexical_weight * lex_shares[rank] / (fusion.rrf_k + rank)
            lexical_score[slot] = score / best_lexical if best_lexical > 0 else 0.0
        if query is not None:
            dense_slots, dense_sims = self.dense(query, scope, admit, CANDIDATES)
            dense_shares = _shares(dense_sims, fusion)
            for rank, (slot, sim) in enumerate(zip(dense_slots.tolist(), dense_sims.tolist())):
                fused[slot] = fused.get(slot, 0.0) + dense_shares[rank] / (fusion.rrf_k + rank)
                cosine[slot] = sim
        via = self._share_with_neighbours(fused, admit, fusion)
        if query is not None:
            missing = [s for s in fused if s not in cosine]
            if missing and self.mirror is not None and len(query) == self.mirror.dim:
                for slot, sim in zip(missing, self.mirror.score(query, np.array(missing, dtype=np.int64)).tolist()):
                    cosine[slot] = sim
        now = time.time() if now is None else now
        ranked = sorted(fused.items(), key=lambda item: -item[1])
        hits: list[Hit] = []
        seen: set[int] = set(exclude_hashes)

        def relevant(slot: int) -> bool:
            sim, lex = cosine.get(slot), lexical_score.get(slot, 0.0)
            return (sim is not None and sim >= min_score) or lex >= STRONG_LEXICAL or (query is None and lex >= LEXICAL_ONLY_MIN)

        for slot, score in ranked:
            sim = cosine.get(slot)
            lex = lexical_score.get(slot, 0.0)
            if not relevant(slot) and not (slot in via and relevant(via[slot])):
                continue  # below the bar, and not the neighbour of a hit above it
            digest = int(self.cols.texthash[slot])
            if digest in seen:
                continue  # already in the context being sent, or a duplicate of a better hit
            seen.add(digest)
            if half_life_days:
                age_days = max(0.0, now - float(self.cols.ts[slot])) / 86400.0
                score *= 0.5 + 0.5 * math.pow(0.5, age_days / half_life_days)
            hits.append(Hit(slot, self.ids[slot] or "", score, sim, lex))
        hits.sort(key=lambda h: -h.score)
        return hits[:top_k]

    def scope_size(self, scope: Scope) -> int:
        """How many memories the scope covers (the document count of its BM25 statistics)."""
        if scope.kind == "tenant":
            return self.alive
        size = len(self.tenant_wide)
        if scope.kind == "user":
            return size + self.group_sizes.get(self.user_code(scope.user), 0)
        size += sum(len(self.session_slots.get(code, ())) for code in self.sessions_named(scope.session)) if scope.session else 0
        if scope.user is not None:
            size += len(self.sessionless.get(self.user_code(scope.user), ()))
        return size

    def _share_with_neighbours(self, fused: dict[int, float], admit, fusion: Fusion) -> dict[int, int]:
        """Give the neighbours of the best hits a share of their score; returns neighbour -> hit."""
        if fusion.neighbour_share <= 0:
            return {}
        best = sorted(fused.items(), key=lambda item: -item[1])[:fusion.neighbour_sources]
        cols = self.cols
        pairs: list[tuple[int, int, float]] = []  # (neighbour, hit, hit's score)
        for slot, score in best:
            session, seq = int(cols.session[slot]), int(cols.seq[slot])
            if session == NONE or seq < 0:
                continue
            for other in (seq - 1, seq + 1):
                neighbour = self.by_position.get((session, other))
                if neighbour is not None:
                    pairs.append((neighbour, slot, score))
        via: dict[int, int] = {}
        if not pairs:
            return via
        allowed = admit(np.array([p[0] for p in pairs], dtype=np.int64))
        for (neighbour, slot, score), ok in zip(pairs, allowed.tolist()):
            if ok:
                fused[neighbour] = fused.get(neighbour, 0.0) + fusion.neighbour_share * score
                via.setdefault(neighbour, slot)
        return via

    def procedural_for(self, user: str | None) -> list[int]:
        """Slots of the procedural memories that apply to ``user`` (tenant-wide ones first)."""
        found = list(self.procedural.get(_TENANT_GROUP, NO_SLOTS))  # ascending already
        if user is not None:
            found += list(self.procedural.get(self.user_code(user), NO_SLOTS))
        return [s for s in found if self.cols.alive[s]]

    def stats(self) -> dict[str, int]:
        counts = {t: 0 for t in TYPES}
        alive = self.cols.alive[: len(self.ids)]
        for t, code in _TYPE_CODE.items():
            counts[t] = int(np.count_nonzero(alive & (self.cols.kind[: len(self.ids)] == code)))
        return {
            "memories": self.alive, **counts, "users": len(self._users), "unembedded": len(self.unembedded),
            "hnsw_entries": len(self.vectors) if self.vectors is not None else 0,
            "mirror_bytes": self.mirror.nbytes() if self.mirror is not None else 0,
        }


def _shares(scores: np.ndarray, fusion: Fusion) -> list[float]:
    """Each hit's share of its reciprocal rank: its score as a fraction of the ranker's best (ranked
    best first), or 1 without ``by_score`` or a positive best."""
    best = float(scores[0]) if len(scores) else 0.0
    if not fusion.by_score or best <= 0:
        return [1.0] * len(scores)
    return np.clip(scores / best, 0.0, 1.0).tolist()


def index_text(memory: Memory) -> str:
    """What is embedded and indexed: the message it answered, the speaker's name, the text."""
    text = f"{memory.name}: {memory.text}" if memory.name else memory.text
    return f"{memory.context}\n{text}" if memory.context else text
