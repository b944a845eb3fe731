"""The benchmark workload: an agent that resends its whole conversation every turn.

Each client stream is one agent working through sessions. A session starts from a base
history (system prompt + ``BASE_PAIRS`` user/assistant pairs, a few hundred characters each,
the first user message naming the session so no two sessions share a transcript). Every
request sends that history plus one new user message; the assistant's reply is appended
(exactly as the provider sent it, like a real agent does) together with the user message,
so the next request resends both. After ``TURNS_PER_SESSION`` turns the agent starts a
new session, which keeps request sizes bounded: 34 to 48 messages (~41 on average,
~12-17 KB of JSON).

The "full" target runs a different shape of the same sizes (``WindowConversation``): each
client stream keeps ONE long session for the whole run, whose stored transcript already holds
hundreds of turns (seeded by bench/seed_full.py from ``long_history``), and sends like an agent
that trims its own history: the system prompt plus its most recent messages only, again 34 to
48 messages. The proxy recognises them as the tail of the stored transcript and restores the rest.

The fake upstream answers ``"echo: " + <last user text>`` (tests/fake_upstream.py), so the
reply is known without parsing the body; non-streaming replies are still checked.
"""

from __future__ import annotations

from typing import Any

import orjson

MODEL = "fake-model"
BASE_PAIRS = 16  # base history: system + 16 user/assistant pairs = 33 messages
TURNS_PER_SESSION = 8  # requests carry 34, 36, ..., 48 messages
MAX_MESSAGES = 1 + 2 * BASE_PAIRS + 2 * TURNS_PER_SESSION  # 49: the window never sends this many
BENCH_USER = "bench-user"  # the user id of the full target's requests (memory scope "user")
# Turn messages of the long sessions: a user message this long (plus its "turn N of S: "
# prefix) and its ~equal echo make windowed requests as large as Conversation's (~12-17 KB).
WINDOW_USER_CHARS = 300

_WORDS = (
    "the agent reads the repository layout then opens the failing test and traces the call "
    "into the parser where a missing bounds check lets an empty token slip through so it "
    "proposes a patch adds a regression test runs the suite and reports the results with "
    "a short summary of the root cause and the files it touched along the way"
).split()


def filler(seed: int, chars: int) -> str:
    """Deterministic prose of about ``chars`` characters, different for each seed."""
    out: list[str] = []
    size, i = 0, seed * 7
    while size < chars:
        word = _WORDS[i % len(_WORDS)]
        out.append(word)
        size += len(word) + 1
        i += 3 + seed % 5
    return " ".join(out)


SYSTEM = {"role": "system", "content": "You are a careful coding agent. " + filler(1, 400)}
_BASE_USER = [filler(10 + i, 300) for i in range(BASE_PAIRS)]
_BASE_ASSISTANT = [filler(100 + i, 380) for i in range(BASE_PAIRS)]


def base_history(session_id: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(BASE_PAIRS):
        user = _BASE_USER[i] if i else f"[task {session_id}] " + _BASE_USER[i]
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _BASE_ASSISTANT[i]})
    return messages


def expected_reply(user_text: str) -> str:
    """What tests/fake_upstream.py answers to ``user_text``."""
    return "echo: " + user_text


def stream_prefix(run_id: str, target: str, index: int) -> str:
    """Name of a client stream (loadgen) and, for the full target, of its one session."""
    return f"{run_id}-{target}-c{index}"


def long_history(session_id: str, turns: int, start: int = 0) -> list[dict[str, Any]]:
    """Turns ``start``..``turns - 1`` of a long session, user and assistant messages.

    Turn 0 names the session, so no two sessions share a transcript. The seeder stores
    ``[SYSTEM] + long_history(sid, turns)``; the client resends the tail of the same list.
    """
    messages: list[dict[str, Any]] = []
    for turn in range(start, turns):
        user = _window_user(session_id, turn)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": expected_reply(user)}]
    return messages


def _window_user(session_id: str, turn: int) -> str:
    return f"turn {turn} of {session_id}: " + filler(turn, WINDOW_USER_CHARS)


class Conversation:
    """One agent's client stream: consecutive sessions of growing conversations."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.sessions = 0
        self._start_session()

    def _start_session(self) -> None:
        self.session_id = f"{self.prefix}-s{self.sessions}"
        self.sessions += 1
        self.history = base_history(self.session_id)
        self.turn = 0

    def next_request(self, stream: bool) -> tuple[str, bytes, str]:
        """(session id, JSON body, new user text) of the next turn."""
        user_text = f"turn {self.turn} of {self.session_id}: " + filler(self.turn + self.sessions, 260)
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": self.history + [{"role": "user", "content": user_text}],
        }
        if stream:
            body["stream"] = True
        return self.session_id, orjson.dumps(body), user_text

    def record_reply(self, user_text: str, reply: str) -> None:
        """The turn succeeded: the next request resends it, like an agent with memory does."""
        self.history = self.history + [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": reply},
        ]
        self.turn += 1
        if self.turn >= TURNS_PER_SESSION:
            self._start_session()

    def abandon(self) -> None:
        """The turn failed: start a fresh session so the stored state stays consistent."""
        self._start_session()


# The full target's client streams spread their turns over a few seeded sessions each, so that
# over a whole run no session grows far past its seeded length (the benchmark's "session with
# 500 stored turns"). Stream 0 carries every c=1 latency measurement (~1 500 turns a run).
LATENCY_STREAM_SESSIONS = 16
OTHER_STREAM_SESSIONS = 2


def window_sessions(run_id: str, index: int) -> list[str]:
    """The sessions client stream ``index`` of the full target uses (bench/seed_full.py seeds them)."""
    prefix = stream_prefix(run_id, "full", index)
    count = LATENCY_STREAM_SESSIONS if index == 0 else OTHER_STREAM_SESSIONS
    return [f"{prefix}-s{j}" for j in range(count)]


class RotatingWindows:
    """One client stream of the full target: its turns go round-robin to its long sessions,
    each played by a WindowConversation (an agent per session, one request at a time)."""

    def __init__(self, sessions: list[str], stored_turns: int) -> None:
        self.windows = [WindowConversation(session, stored_turns) for session in sessions]
        self.current = 0

    def next_request(self, stream: bool) -> tuple[str, bytes, str]:
        return self.windows[self.current].next_request(stream)

    def record_reply(self, user_text: str, reply: str) -> None:
        self.windows[self.current].record_reply(user_text, reply)
        self.current = (self.current + 1) % len(self.windows)

    def abandon(self) -> None:
        self.windows[self.current].abandon()
        self.current = (self.current + 1) % len(self.windows)


class WindowConversation:
    """One agent's client stream in ONE long session that trims its own history.

    The session's first ``stored_turns`` turns are already stored (bench/seed_full.py). Every
    request sends the system prompt, the most recent messages and one new user message; once
    the next request would carry ``MAX_MESSAGES``, the oldest ``2 * TURNS_PER_SESSION``
    messages are dropped, so requests carry 34 to 48 messages, as Conversation's do.
    """

    def __init__(self, session_id: str, stored_turns: int) -> None:
        if stored_turns < BASE_PAIRS:
            raise ValueError(f"a long session needs at least {BASE_PAIRS} stored turns")
        self.session_id = session_id
        self.turn = stored_turns
        self.history = [SYSTEM] + long_history(session_id, stored_turns, stored_turns - BASE_PAIRS)

    def next_request(self, stream: bool) -> tuple[str, bytes, str]:
        """(session id, JSON body, new user text) of the next turn."""
        user_text = _window_user(self.session_id, self.turn)
        body: dict[str, Any] = {"model": MODEL, "messages": self.history + [{"role": "user", "content": user_text}]}
        if stream:
            body["stream"] = True
        return self.session_id, orjson.dumps(body), user_text

    def record_reply(self, user_text: str, reply: str) -> None:
        self.history = self.history + [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
        self.turn += 1
        if len(self.history) + 1 >= MAX_MESSAGES:
            self.history = self.history[:1] + self.history[1 + 2 * TURNS_PER_SESSION:]

    def abandon(self) -> None:
        """The turn failed: keep the window. If the proxy recorded the turn anyway, the next
        request no longer ends the stored transcript, which shows up as a branch."""
