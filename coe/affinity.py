"""Conversation affinity: the turns of one conversation stay with one expert.

Switching experts mid-conversation changes the voice (and, with vLLM, throws away the prefix cache),
so the service's routing step keeps a conversation on the expert that answered its earlier turns
unless the router's score for another beats that expert's by ``margin``. It calls the router's
scores (the decision's ``candidates``); the router itself knows nothing of conversations.

A conversation is named by an explicit session header (``X-Coe-Session``, or ``X-Session-Id``), or
else by a hash of its opening (the leading system messages and the first user message), which every
later turn repeats. OpenAI's ``user`` field names the end user, not a conversation, so it is not used.

The map lives in the ingress replica's memory (bounded LRU with a TTL): it is live state, not
something an operator sets, so it does not go to Redis (decision 3 of DESIGN.md). With several
ingress replicas a conversation's turns may land on different replicas; each then decides afresh,
and the session header plus Ray Serve's session affinity is the way to pin them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field


class AffinityConfig(BaseModel):
    """``conversation:`` in the service config."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    margin: float = Field(0.15, ge=0.0, description="another expert must out-score the sticky one by this much")
    ttl_s: float = Field(3600.0, gt=0, description="a conversation idle this long is forgotten")
    max_conversations: int = Field(100_000, ge=1)


@dataclass(frozen=True)
class Stickiness:
    """What the affinity step decided: the expert to use and the note for ``coe.conversation``."""

    expert: str
    note: str  # "new" | "sticky" | "switched: <why>"


def conversation_key(messages: Sequence[dict[str, Any]], session: str | None, tenant: str | None = None) -> str | None:
    """The conversation's name within ``tenant`` (the API key's id; DESIGN decision 8: one tenant's
    session header or opening never pins, or reveals, another's): the session header, else a hash
    of its opening turns (None when there is no user message to hash)."""
    scope = f"{tenant or '-'}|"
    if session:
        return scope + "s:" + session.strip()[:200]
    opening: list[tuple[str, str]] = []
    for m in messages:
        opening.append((str(m["role"]), str(m.get("content") or "")))
        if m["role"] == "user":
            return scope + "h:" + hashlib.sha256(json.dumps(opening).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return None


def is_continuation(messages: Sequence[dict[str, Any]]) -> bool:
    """True when the conversation has earlier turns (an assistant reply or several user turns)."""
    return any(m["role"] in ("assistant", "tool") for m in messages) or sum(m["role"] == "user" for m in messages) > 1


class ConversationAffinity:
    """Remembers which expert answered each conversation and decides whether the next turn stays."""

    def __init__(self, config: AffinityConfig | None = None, clock: Any = time.monotonic):
        self.config = config or AffinityConfig()
        self._clock = clock
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def previous(self, key: str) -> str | None:
        item = self._seen.get(key)
        if item is None:
            return None
        expert, at = item
        if self._clock() - at > self.config.ttl_s:
            del self._seen[key]
            return None
        return expert

    def remember(self, key: str, expert: str) -> None:
        self._seen[key] = (expert, self._clock())
        self._seen.move_to_end(key)
        while len(self._seen) > self.config.max_conversations:
            self._seen.popitem(last=False)

    def decide(self, key: str | None, chosen: str, candidates: Sequence[dict[str, Any]]) -> Stickiness:
        """Keep the previous expert unless the router's choice out-scores it by more than the margin."""
        prev = self.previous(key) if key and self.config.enabled else None
        if prev is None:
            return Stickiness(chosen, "new")
        if prev == chosen:
            return Stickiness(prev, "sticky")
        scores = {c.get("expert"): float(c.get("score") or 0.0) for c in candidates}
        if prev not in scores:
            return Stickiness(chosen, f"switched: '{prev}' is not a candidate for this turn")
        best = scores.get(chosen, max(scores.values(), default=0.0))
        gap = best - scores[prev]
        if gap > self.config.margin:
            return Stickiness(chosen, f"switched: '{chosen}' scored {best:.3f}, beating '{prev}' ({scores[prev]:.3f}) "
                                      f"by more than the margin {self.config.margin:g}")
        return Stickiness(prev, "sticky")
