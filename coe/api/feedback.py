"""The body of ``POST /v1/feedback`` (docs/api.md, "Feedback"): a score for one answered request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

THUMBS = {"up": 1.0, "down": 0.0}


class FeedbackRequest(BaseModel):
    """``{"request_id": ..., "score": 0..1}`` or ``{"request_id": ..., "thumbs": "up"|"down"}``.

    ``request_id`` is the response's ``x-request-id`` header or its body ``id`` (``chatcmpl-…``)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    score: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _one_judgement(self) -> "FeedbackRequest":
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of 'score' (0..1) or 'thumbs' ('up' or 'down')")
        return self

    @property
    def value(self) -> float:
        """The score in [0, 1] (thumbs up = 1, down = 0)."""
        return float(self.score) if self.score is not None else THUMBS[self.thumbs or "down"]

    @property
    def rid(self) -> str:
        """The request id as the ingress keeps it (without the body id's ``chatcmpl-`` prefix)."""
        return self.request_id.removeprefix("chatcmpl-")
