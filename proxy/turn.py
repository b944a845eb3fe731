"""The canonical chat turn: what one request carries through the pipeline, whatever its protocol.

A protocol edge (Chat Completions, Responses, Anthropic Messages) parses its request into a chat
body; the pipeline's stages read a ``Turn`` and return what they decided, and the pipeline alone
writes their results into it (``proxy/pipeline.py``). Stages and edges import this module, never
the pipeline, so no stage depends on the module that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol

if TYPE_CHECKING:
    from proxy.config import ResolvedModel, TenantConfig
    from proxy.records import Message, Session
    from proxy.sessions import SessionRef
    from proxy.storage.base import Record
    from proxy.transcript import Plan
    from proxy.upstream import Upstream


class Exchange(Protocol):
    """How a turn of a client protocol other than Chat Completions reaches the upstream and is read
    back for the record (edge adapters implement it; None means Chat Completions)."""

    async def complete(self, upstream: Upstream, turn: Turn) -> dict[str, Any]:
        """The answer, in the client's protocol."""

    def reply(self, response: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, dict[str, Any] | None, str | None]:
        """From an answer: the assistant messages to record, finish reason, usage (prompt_tokens /
        completion_tokens) and model."""

    def stream(self, upstream: Upstream, turn: Turn) -> AsyncIterator[list[dict[str, Any]]]:
        """The answer's stream events, in the client's protocol, in batches."""

    def collector(self, keep_chunks: bool) -> Any:
        """What rebuilds the answer from the stream: add(event), messages(), finish_reason(), usage, model, chunks."""


@dataclass
class Turn:
    """Everything one chat request carries through the pipeline."""

    tenant: TenantConfig
    ref: SessionRef
    route: ResolvedModel
    body: dict[str, Any]  # what goes upstream
    session: Session
    stored: list[Message]
    plan: Plan
    request_id: str
    started: float
    headers: dict[str, str] = field(default_factory=dict)  # response headers for the client
    idempotency_key: str | None = None  # hashed Idempotency-Key header
    replay: dict[str, Any] | None = None  # the recorded response for a repeated Idempotency-Key
    injected: list[str] | None = None  # ids of the long-term memories added to the prompt
    fingerprint: str | None = None  # hash of the request body, kept with an idempotent response
    # Set by a protocol edge that keeps its own records of a turn (e.g. a Responses API response
    # id pointing at the recorded reply): called with the recorded messages and the outcome once
    # the session's head is updated; what it returns is written in the same transaction, tagged
    # "<kind>_id" for the tenant's persistence policy (persistence.critical).
    on_record: Callable[[list[Message], dict[str, Any]], list[Record]] | None = None
    protocol: str | None = None  # the client protocol when not Chat Completions, recorded on its messages
    # For the access log: what the provider answered, how long it took, the tokens it counted.
    upstream_status: int | None = None
    upstream_ms: float = 0.0
    usage: dict[str, Any] | None = None  # the provider's token counts
    exchange: Exchange | None = None  # the client protocol's upstream call; None: Chat Completions
    recalled: list[dict[str, Any]] = field(default_factory=list)  # older messages the context stage quoted back
