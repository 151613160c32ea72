"""What the router decided and why (returned to the service, logged, shown by ``coe router explain``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CategoryProb(BaseModel):
    category: str
    prob: float


class CandidateScore(BaseModel):
    """One eligible candidate and the terms of its score (``score`` is what was maximised)."""

    expert: str
    score: float
    capability: float = Field(description="declared per-category capabilities weighted by category probs")
    quality: float | None = Field(None, description="learned per-query quality (None: no records for it)")
    cost: float = Field(0.0, description="cost_per_1k_tokens of the expert")
    residency: float = Field(0.0, description="0..1 'already hot' hint from the pool")
    categories: list[str] = Field(default_factory=list, description="mapped categories that made it a candidate")
    quality_pick: bool = Field(False, description="the quality rule is confident this one beats the best-on-average "
                                                  "candidate (its score carries quality_pick_bonus)")


class RoutingDecision(BaseModel):
    expert: str
    category: str | None = Field(None, description="category routed on (None when an expert was named)")
    category_probs: list[CategoryProb] = Field(default_factory=list, description="top 3 of stage 1")
    candidates: list[CandidateScore] = Field(default_factory=list, description="best first")
    fallback_reason: str | None = None
    forced: Literal["auto", "category", "expert"] = "auto"
    excluded: dict[str, str] = Field(default_factory=dict, description="candidate -> why it was ineligible")
    not_candidates: dict[str, str] = Field(
        default_factory=dict,
        description="expert -> why it did not compete although it declares a capability in a category routed on "
                    "(e.g. 'not in the category map for coding'); experts without such a capability are not listed")
    route_ms: float = 0.0
