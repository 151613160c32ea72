"""The typed request that crosses from the ingress to an expert pool replica.

Built in one place (:meth:`coe.api.protocol.ChatCompletionRequest.to_generate_request`) and read by
``ExpertPoolDeployment.generate``. A pydantic model, so Ray moves it as a typed object and the pool
re-validates nothing by hand: no untyped dict of sampling options travels between processes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from coe.engines.base import ChatMessage, SamplingParams


class GenerateRequest(BaseModel):
    """One chat completion to generate on the expert named by the multiplexed model id.

    ``sampling`` holds only what the client set (``model_fields_set``): the pool fills the rest from
    the expert's generation defaults and clamps ``max_tokens`` to the expert's context. A client
    that set ``max_tokens`` explicitly gets a 400 instead of a silent clamp (``max_tokens_explicit``)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    max_tokens_explicit: bool = False
    request_id: str | None = None
    #: how long to wait for an expert whose engine is still starting (None: the service's
    #: ``limits.loading_wait_s``; 0: answer ``expert_loading`` at once, so a routed request can go to
    #: the next-best expert)
    loading_wait_s: float | None = Field(None, ge=0)
