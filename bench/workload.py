"""The benchmark workload: an agent that resends its whole conversation every turn.

Each client stream is one agent working through sessions. A session starts from a base
history (system prompt + ``BASE_PAIRS`` user/assistant pairs, a few hundred characters each,
the first user message naming the session so no two sessions share a transcript). Every
request sends that history plus one new user message; the assistant's reply is appended
(exactly as the provider sent it, like a real agent does) together with the user message,
so the next request resends both. After ``TURNS_PER_SESSION`` turns the agent starts a
new session, which keeps request sizes bounded: 34 to 48 messages (~41 on average,
~12-17 KB of JSON).

The fake upstream answers ``"echo: " + <last user text>`` (tests/fake_upstream.py), so the
reply is known without parsing the body; non-streaming replies are still checked.
"""

from __future__ import annotations

from typing import Any

import orjson

MODEL = "fake-model"
BASE_PAIRS = 16  # base history: system + 16 user/assistant pairs = 33 messages
TURNS_PER_SESSION = 8  # requests carry 34, 36, ..., 48 messages

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
