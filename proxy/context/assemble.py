"""Assembly: choose what of a conversation goes upstream within a token budget (pure and fast).

Given the request's view (units, segments), the summaries available and the budget, choose a
*frontier*: units before it are represented by summaries (or omitted), units from it on are
sent verbatim. Then add back older pinned (important) and retrieved (relevant) units while
they fit their shares. Rules that always hold:

- the leading system prompt, the newest user message and the final unit are always sent, verbatim
  (when they alone exceed the budget: ContextTooLarge, never a truncation);
- a unit (an assistant tool call with its results) is sent whole or not at all;
- messages keep their order; summaries go in one delimited system message after the system prompt;
- the result never exceeds the budget; when the whole history fits, it is sent unchanged.

Prefix stability (provider prompt caches bill a prompt's unchanged prefix at 10-50 %): the
request is append-mostly. System prompt, then the summary message and the pinned units (both
change only at a compaction), then the verbatim units from the frontier on; what changes every
turn (older turns retrieved for their relevance) goes in one delimited block right before the
newest user message, never in front. The frontier is sticky (``hint_seq``) and so are the
summaries it was sent with (``hint_parts``): both are kept while the request stays under the
high-water mark (``Policy.high_water`` of the budget). Past it, the conversation is compacted in
one large step, to the most verbatim frontier whose request fits the low-water mark
(``Policy.low_water``), so that many following turns append to an unchanged prefix; failing
that, to "summaries + the last window_turns turns" if those summaries exist, else to the most
verbatim frontier that fits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from proxy import tokens
from proxy.context.summaries import Summary
from proxy.context.units import View, text_of

_MESSAGE_OVERHEAD = tokens.MESSAGE_OVERHEAD  # a constant: counting at import would load the tokenizer before serving
_JOINT = 2  # tokens allowed per joint between concatenated parts (an upper bound)


class ContextTooLarge(Exception):
    """The parts that must be sent verbatim do not fit the budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"{needed} tokens needed, budget {budget}")
        self.needed, self.budget = needed, budget


@dataclass(frozen=True)
class Policy:
    window_turns: int | None  # None: the window strategy is off (compact as far as summaries go)
    window_share: float  # the verbatim window takes at most this share of the budget
    summaries: bool
    pin_share: float  # 0: no pins (importance off)
    retrieval_share: float  # 0: no retrieval
    summary_estimate: int  # tokens assumed for a segment summary not made yet
    high_water: float = 1.0  # the sticky frontier is kept while the request fits this share of the budget
    low_water: float = 1.0  # a compaction goes down to this share of the budget (when it can)
    # The blocks that change every request (retrieved turns here, recalled memories after) take at
    # most this share of the tokens the compacted request saves (None: no such cap); see manager.
    tail_share_of_saved: float | None = None


@dataclass
class Assembly:
    messages: list[dict[str, Any]]
    tokens: int  # what is sent (messages + request overhead)
    full_tokens: int  # the whole history as the client's request would have sent it
    changed: bool = False
    frontier_seq: int | None = None  # last stored seq before the frontier: the next request's hint
    used: list[str] = field(default_factory=list)  # summary keys sent
    missing: list[int] = field(default_factory=list)  # segments whose summary the plan needs
    fold: bool = False  # a session summary would let more of the conversation fit
    omitted: int = 0  # messages neither sent nor covered by a summary
    covered: int = 0  # messages covered by the summaries sent
    pinned: int = 0  # older messages re-sent for their importance
    retrieved: int = 0  # older messages re-sent for their relevance
    segments: int = 0  # leading segments the chosen frontier covers
    recalled: list[dict[str, Any]] = field(default_factory=list)  # the retrieved older messages, quoted in the block
    tail_room: int | None = None  # what the per-request blocks may still take after the retrieved turns (None: no cap)


@dataclass
class _Option:
    frontier: int  # unit index
    segments: int  # leading segments covered
    parts: list[Summary | int]  # a Summary, or a segment index whose summary is missing
    summary_tokens: int
    missing: int
    gap: bool = False  # units between the last segment and the frontier are omitted


def assemble(
    view: View,
    summaries: Mapping[str, Summary],
    budget: int,
    policy: Policy,
    *,
    overhead: int = 0,
    encoding: str = tokens.DEFAULT_ENCODING,
    hint_seq: int | None = None,
    hint_parts: Sequence[str] = (),
    ranked: Sequence[int] = (),
) -> Assembly:
    """Choose the messages to send; see the module docstring for the rules. ``hint_seq`` and
    ``hint_parts``: the frontier and the summary keys of the session's previous request."""
    units, items = view.units, view.items
    full = view.tokens + overhead
    if full <= budget * policy.high_water:
        return Assembly([i.body for i in items], full, full)
    n = len(units)
    mandatory = set(range(view.head))
    if view.last_user >= 0:
        mandatory.add(view.last_user)
    if n:
        mandatory.add(n - 1)
    head_tokens = sum(units[u].tokens for u in range(view.head))
    needed = overhead + sum(units[u].tokens for u in mandatory)
    if needed > budget:
        raise ContextTooLarge(needed, budget)
    late_mandatory = sorted(u for u in mandatory if u >= view.head)

    pins = [u for u in range(view.head, n) if units[u].priority and u not in mandatory] if policy.pin_share else []
    pin_cap = int(policy.pin_share * budget)
    pin_prefix = [0] * (n + 1)  # pin_prefix[f]: tokens of the pins before unit f
    for u in pins:
        pin_prefix[u + 1] = units[u].tokens
    for u in range(n):
        pin_prefix[u + 1] += pin_prefix[u]
    options = _options(view, summaries, policy, encoding)
    header = _header_bound(encoding, policy.summaries)

    def cost(option: _Option) -> int:
        frontier = option.frontier
        before = sum(units[u].tokens for u in late_mandatory if u < frontier)
        pinned = min(pin_cap, pin_prefix[frontier])
        block = 0
        if option.parts or frontier > view.head:
            block = header + option.summary_tokens
        return overhead + head_tokens + block + before + view.suffix[frontier] + pinned

    costs = [cost(o) for o in options]

    def fits(i: int, *, missing_ok: bool = False, limit: float = budget) -> bool:
        o = options[i]
        return costs[i] <= limit and not o.gap and (missing_ok or not o.missing)

    chosen: int | None = None
    if hint_seq is not None:
        for i, o in enumerate(options):
            if o.frontier > view.head and _seq_before(view, o.frontier) == hint_seq:
                frozen = _frozen(view, o, summaries, hint_parts, encoding)
                if frozen is not None:  # the summaries sent last time, not newer ones (a fold)
                    options[i], costs[i] = frozen, cost(frozen)
                chosen = i if fits(i, limit=min(budget, budget * policy.high_water)) else None
                break
    target = window_start(view, policy, budget)
    if chosen is None and policy.low_water < 1.0:
        # One large step: the most verbatim frontier whose request fits the low-water mark,
        # if it keeps at least the window's turns.
        low = next((i for i in range(len(options)) if fits(i, limit=budget * policy.low_water)), None)
        if low is not None and options[low].frontier <= target:
            chosen = low
    if chosen is None:
        eligible = [i for i, o in enumerate(options) if o.frontier <= target and not o.gap]
        if eligible and fits(eligible[-1]):
            chosen = eligible[-1]
    if chosen is None:
        chosen = next((i for i in range(len(options)) if fits(i)), None)
    if chosen is None:
        chosen = next((i for i in range(len(options)) if fits(i, missing_ok=True)), None)
    if chosen is None:  # last resort: cover all that summaries can, trim the oldest verbatim units
        chosen = len(options) - 1
    return _build(view, options[chosen], budget, policy, overhead, encoding, mandatory, pins, pin_cap, ranked, full)


def _frozen(view: View, option: _Option, summaries: Mapping[str, Summary], keys: Sequence[str], encoding: str) -> _Option | None:
    """``option`` with the summaries ``keys`` (those sent with the same frontier last time) when
    they are all still there and cover what the option covers; None otherwise."""
    if not keys or not option.segments or option.gap:
        return None
    parts = [summaries.get(key) for key in keys]
    if any(p is None for p in parts):
        return None
    first, last = view.segments[0], view.segments[option.segments - 1]
    if not first.seqs or not last.seqs or parts[0].first != first.seqs[0] or parts[-1].last != last.seqs[-1]:
        return None
    if [p.key for p in option.parts if isinstance(p, Summary)] == list(keys):
        return None  # already the same
    return _Option(option.frontier, option.segments, list(parts), sum(part_tokens(p, encoding) for p in parts), 0)


def _options(view: View, summaries: Mapping[str, Summary], policy: Policy, encoding: str) -> list[_Option]:
    """Frontier candidates in increasing order, each with the summaries that would cover before it."""
    head, n = view.head, len(view.units)
    options = [_Option(head, 0, [], 0, 0)]
    if not policy.summaries:
        options += [_Option(f, 0, [], 0, 0) for f in range(head + 1, n + 1)]
        return options
    base: list[Summary | int] = []  # parts covering segments 0..j-1
    base_tokens = 0
    missing = 0
    label = _label_bound(encoding)
    for segment in view.segments:
        folded = summaries.get(segment.session_key)
        if folded is not None:
            base, base_tokens, missing = [folded], part_tokens(folded, encoding), 0
        else:
            own = summaries.get(segment.key)
            if own is not None:
                base = base + [own]
                base_tokens += part_tokens(own, encoding)
            else:
                base = base + [segment.index]
                base_tokens += policy.summary_estimate + label
                missing += 1
        options.append(_Option(segment.hi, segment.index + 1, base, base_tokens, missing))
    last = view.segments[-1].hi if view.segments else head
    count = len(view.segments)
    options += [_Option(f, count, base, base_tokens, missing, gap=True) for f in range(last + 1, n + 1)]
    return options


def window_start(view: View, policy: Policy, budget: int) -> int:
    """First unit of the verbatim window kept after a compaction."""
    units, n = view.units, len(view.units)
    if policy.window_turns is None:
        return n
    start, turns = n, 0
    for u in range(n - 1, view.head - 1, -1):
        start = u
        if units[u].role == "user":
            turns += 1
            if turns >= policy.window_turns:
                break
    limit = policy.window_share * budget
    while start < n - 1 and view.suffix[start] > limit:
        start += 1
    return max(start, view.head)


def _seq_before(view: View, frontier: int) -> int | None:
    return view.items[view.units[frontier - 1].end - 1].seq if frontier > 0 else None


def _build(view: View, option: _Option, budget: int, policy: Policy, overhead: int, encoding: str,
           mandatory: set[int], pins: list[int], pin_cap: int, ranked: Sequence[int], full: int) -> Assembly:
    units, items, head = view.units, view.items, view.head
    frontier = option.frontier
    keep = set(range(head)) | {u for u in mandatory if u < frontier} | set(range(frontier, len(units)))
    parts = [p for p in option.parts if isinstance(p, Summary)]
    missing = [p for p in option.parts if isinstance(p, int)]
    used = overhead + sum(units[u].tokens for u in keep)
    dropped: set[int] = set()  # units neither kept nor covered by a summary sent
    header = _header_bound(encoding, policy.summaries)

    if option.gap:
        dropped.update(range(view.segments[-1].hi if view.segments else head, frontier))
    if missing:  # their summaries are not there: what they cover is omitted (the manager fills them first)
        for index in missing:
            segment = view.segments[index]
            dropped.update(range(segment.lo, segment.hi))

    def block_tokens() -> int:
        if not parts and not dropped and not (not policy.summaries and frontier > head):
            return 0
        return header + sum(part_tokens(p, encoding) for p in parts)

    fold = False
    if used + block_tokens() > budget:  # last resort: trim the oldest verbatim units after the frontier
        for u in range(frontier, len(units)):
            if used + block_tokens() <= budget:
                break
            if u in mandatory:
                continue
            keep.discard(u)
            dropped.add(u)
            used -= units[u].tokens
    while parts and used + block_tokens() > budget:  # then the oldest summaries
        fold = True
        gone = parts.pop(0)
        dropped.update(_units_covering(view, gone))
    # Barely more room than the mandatory messages: not even the note fits, so none is sent.
    noted = used + block_tokens() <= budget
    remaining = budget - used - (block_tokens() if noted else 0)

    pinned = retrieved = 0
    old = frontier  # pins and retrieved units come from before the frontier
    if pins and remaining > 0:
        allowance = min(pin_cap, remaining)
        for u in sorted((u for u in pins if u < old and u not in keep), key=lambda u: (-units[u].priority, -u)):
            if units[u].tokens <= allowance:
                keep.add(u)
                allowance -= units[u].tokens
                remaining -= units[u].tokens
                pinned += units[u].end - units[u].start
    recalled: list[int] = []  # retrieved units: quoted in the block before the newest user message
    tail_cap = remaining
    if policy.tail_share_of_saved is not None:
        # Billed at full price every request, unlike the cached prefix: at most a share of
        # what this compacted request saves (with a cached price of 0.1 and a share of 0.03,
        # the blocks cost at most a third of what compaction saves).
        stable = used + (block_tokens() if noted else 0) + sum(units[u].tokens for u in keep if u < old and u not in mandatory)
        tail_cap = max(0, min(remaining, int(policy.tail_share_of_saved * (full - stable))))
    if ranked and policy.retrieval_share and tail_cap > _RECALL_FRAMING:
        allowance = min(int(policy.retrieval_share * budget), tail_cap) - _RECALL_FRAMING
        for u in ranked:
            if not head <= u < old or u in keep or u in recalled:
                continue
            # A retrieved user message comes back with the answer that followed it, as one exchange.
            group = [u]
            while group[-1] + 1 < old and units[group[-1] + 1].role != "user":
                group.append(group[-1] + 1)
            group = [g for g in group if g not in keep and g not in recalled]
            cost = sum(units[g].tokens + _RECALL_LABEL * (units[g].end - units[g].start) for g in group)
            if cost > allowance:
                group = [u]
                cost = units[u].tokens + _RECALL_LABEL * (units[u].end - units[u].start)
                if cost > allowance:
                    continue
            recalled.extend(group)
            allowance -= cost
        recalled.sort()
    recall_block, recall_tokens = _recall_block(view, recalled, encoding, min(remaining, tail_cap))
    if recall_block is not None:
        retrieved = sum(units[g].end - units[g].start for g in recalled)
        remaining -= recall_tokens
    else:
        recalled = []

    if not policy.summaries:
        dropped.update(u for u in range(head, frontier) if u not in keep)
    dropped -= keep
    dropped -= set(recalled)
    omitted = sum(units[u].end - units[u].start for u in dropped)
    block = _block(view, parts, omitted, policy.summaries) if noted else None
    messages: list[dict[str, Any]] = [i.body for u in range(head) for i in items[units[u].start:units[u].end]]
    if block is not None:
        messages.append({"role": "system", "content": block})
    # The block of retrieved turns changes every request: right before the newest user
    # message (else before the final unit), after everything that stays the same.
    anchor = view.last_user if view.last_user in keep else len(units) - 1
    for u in sorted(keep):
        if u >= head:
            if u == anchor and recall_block is not None:
                messages.append({"role": "user", "content": recall_block})
            messages.extend(i.body for i in items[units[u].start:units[u].end])
    sent = overhead + sum(units[u].tokens for u in keep) + recall_tokens
    if block is not None:
        # The header changes only when the summaries or the omitted count do: counted once.
        sent += tokens.count_recurring(_header(view, parts, omitted, policy.summaries), encoding) + _MESSAGE_OVERHEAD
        sent += sum(part_tokens(p, encoding) for p in parts)
    return Assembly(
        messages, sent, full, changed=True, frontier_seq=_seq_before(view, frontier),
        used=[p.key for p in parts], missing=sorted(missing), fold=fold, omitted=omitted,
        covered=sum(len(p.seqs) for p in parts), pinned=pinned, retrieved=retrieved, segments=option.segments,
        recalled=[i.body for u in recalled for i in items[units[u].start:units[u].end]],
        tail_room=None if policy.tail_share_of_saved is None else max(0, tail_cap - recall_tokens),
    )


def _units_covering(view: View, summary: Summary) -> range:
    """Units a summary covers (it covers a prefix of segments, or one segment)."""
    wanted_last = summary.last
    lo = None
    for segment in view.segments:
        if segment.seqs and segment.seqs[0] == summary.first:
            lo = segment.lo
        if segment.seqs and segment.seqs[-1] == wanted_last:
            return range(lo if lo is not None else view.head, segment.hi)
    return range(0)


# -- the block of retrieved turns ---------------------------------------------------------------

RECALL_OPEN = '<context-recalled source="agent-state-proxy">'
_RECALL_CLOSE = "</context-recalled>"
_RECALL_INTRO = ("Earlier messages of this conversation, repeated here for their relevance to the next message "
                 "(quoted from the conversation above; not new messages):")
_RECALL_LABEL = 12  # tokens budgeted per quoted message for its label line, beyond its own framing
_RECALL_FRAMING = 48  # tokens budgeted for the block's opening, intro, closing and message framing


def _recall_block(view: View, recalled: list[int], encoding: str, room: int) -> tuple[str | None, int]:
    """The block quoting the retrieved units, and its tokens (exactly counted); the newest
    quoted units are dropped until it fits ``room``. (None, 0) when nothing is quoted."""
    units, items = view.units, view.items
    chosen = list(recalled)
    while chosen:
        lines = [RECALL_OPEN, _RECALL_INTRO]
        for u in chosen:
            for item in items[units[u].start:units[u].end]:
                label = f"[message {item.seq}" if item.seq is not None else "[message"
                text = text_of(item.body).replace(_RECALL_CLOSE, "</ context-recalled>")
                lines.append(f"{label} · {item.body.get('role')}]\n{text}")
        lines.append(_RECALL_CLOSE)
        block = "\n".join(lines)
        cost = tokens.count_text(block, encoding) + _MESSAGE_OVERHEAD
        if cost <= room:
            recalled[:] = chosen
            return block, cost
        chosen.pop()
    return None, 0


# -- the summary message ------------------------------------------------------------------------

_OPEN = '<context-summary source="agent-state-proxy">'
_CLOSE = "</context-summary>"
_NOTE_OPEN = '<context-note source="agent-state-proxy">'
_NOTE_CLOSE = "</context-note>"


def _label(summary: Summary) -> str:
    return _label_text(summary.level, summary.first, summary.last)


def _label_text(level: str, first: int, last: int) -> str:
    return f"## {'Summary' if level == 'session' else 'Segment'} of messages {first}–{last}"


def _header(view: View, parts: list[Summary], omitted: int, summaries: bool) -> str:
    if not summaries:
        return (f"{_NOTE_OPEN}{omitted} earlier messages of this conversation are omitted here to fit the "
                f"context budget.{_NOTE_CLOSE}")
    first = parts[0].first if parts else None
    last = parts[-1].last if parts else None
    span = f" (messages {first}–{last})" if parts else ""
    lines = [
        _OPEN,
        f"The earlier part of this conversation{span} is condensed below to fit the context budget. "
        "Some earlier messages may be repeated verbatim after this note; the most recent messages follow.",
    ]
    if omitted:
        lines.append(f"{omitted} earlier messages are omitted entirely.")
    lines.append(_CLOSE)
    return "\n".join(lines)


def _block(view: View, parts: list[Summary], omitted: int, summaries: bool) -> str | None:
    if not parts and not omitted:
        return None
    header = _header(view, parts, omitted, summaries)
    if not summaries:
        return header
    body = "\n\n".join(f"{_label(p)}\n{p.text}" for p in parts)
    opening, closing = header.rsplit("\n", 1)
    return f"{opening}\n\n{body}\n{closing}" if body else header


_WIDE = 10**9


@functools.lru_cache(maxsize=64)
def _label_bound(encoding: str) -> int:
    """Upper bound of a part's label tokens (numbers at their widest) and its joints."""
    return tokens.count_text(f"## Segment of messages {_WIDE}–{_WIDE}", encoding) + 2 * _JOINT


def part_tokens(summary: Summary, encoding: str) -> int:
    """Tokens a summary costs in the summary message: its label, its text, the joints."""
    return summary.tokens_in(encoding) + _label_tokens(summary.level, summary.first, summary.last, encoding) + 2 * _JOINT


@functools.lru_cache(maxsize=65536)
def _label_tokens(level: str, first: int, last: int, encoding: str) -> int:
    return tokens.count_text(_label_text(level, first, last), encoding)


@functools.lru_cache(maxsize=64)
def _header_bound(encoding: str, summaries: bool) -> int:
    """Upper bound of the summary (or omission note) message's header and framing tokens."""
    if not summaries:
        text = (f"{_NOTE_OPEN}{_WIDE} earlier messages of this conversation are omitted here to fit the "
                f"context budget.{_NOTE_CLOSE}")
        return tokens.count_text(text, encoding) + _MESSAGE_OVERHEAD + _JOINT
    text = (f"{_OPEN}\nThe earlier part of this conversation (messages {_WIDE}–{_WIDE}) is condensed below to "
            "fit the context budget. Some earlier messages may be repeated verbatim after this note; the most "
            f"recent messages follow.\n{_WIDE} earlier messages are omitted entirely.\n{_CLOSE}")
    return tokens.count_text(text, encoding) + _MESSAGE_OVERHEAD + 4 * _JOINT
