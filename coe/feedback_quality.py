"""Feedback records → the router a replica serves: the trained router's quality predictor plus
one evaluation record per piece of feedback (issue 14, item 6).

Stage 1 and the trained records are untouched; the feedback records are appended through the
predictor's public API (``QualityPredictor.add`` / ``from_records``), so whatever predictor the
router ships with learns from use the same way ``coe router quality add`` teaches it from a file.
Each distinct feedback prompt is embedded once per replica and kept while its record lives, so a
rebuild after one more thumbs-down embeds one prompt, not all of them.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from coe.feedback import FeedbackRecord
from routers.data import EvalRecord
from routers.quality import QualityPredictor
from routers.router import Router

log = logging.getLogger("coe.feedback")


class FeedbackRouter:
    """Builds ``base`` + feedback records into a :class:`Router` (``build``), caching embeddings."""

    def __init__(self, base: Router):
        self.base = base
        self._emb: dict[str, np.ndarray] = {}
        self.n_records = 0

    def _encode(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._emb]
        if missing:
            for p, e in zip(missing, self.base.encoder.encode(missing)):
                self._emb[p] = np.asarray(e, dtype=np.float32)
        if not prompts:
            return np.zeros((0, self.base.encoder.dim), dtype=np.float32)
        return np.stack([self._emb[p] for p in prompts])

    def build(self, records: Mapping[str, FeedbackRecord]) -> Router:
        """The router to serve: ``base`` when there is no feedback, else ``base`` with the records
        (oldest first) appended to its quality predictor; hyperparameters stay the trained ones."""
        recs = [EvalRecord(prompt=r.prompt, expert=r.expert, score=float(r.score))
                for r in sorted(records.values(), key=lambda r: r.at)]
        self.n_records = len(recs)
        live = {r.prompt for r in recs}
        for p in [p for p in self._emb if p not in live]:  # expired or replaced: forget its embedding
            del self._emb[p]
        if not recs:
            return self.base
        base_q = self.base.quality
        if base_q is not None:
            qp = base_q.add(recs, self._encode)
        else:
            qp = QualityPredictor.from_records(recs, self._encode, encoder_id=self.base.encoder.id, tune=False)
        b = self.base
        return Router(b.classifier, b.encoder, b.policy, qp, b.info, b.path)

    def summary(self) -> dict[str, Any]:
        return {"feedback_records": self.n_records, "embedded_prompts": len(self._emb)}
