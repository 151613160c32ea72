"""Stage 2's learned part: a per-expert quality predictor from evaluation records.

Records are ``{"prompt", "expert", "score"}`` (score in [0, 1], e.g. a judge's grade or a
pass/fail of a unit test). For a new prompt, each expert's predicted quality is the
similarity-weighted mean score of its ``k`` nearest recorded prompts (cosine over the same
embeddings stage 1 uses), shrunk toward the expert's overall mean when the neighbours are far
or few. A kNN needs no training step, explains itself ("these prompts, these scores"), and
updates by appending records. Saved as ``quality.json`` + ``quality.npz`` (no pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from routers.artifacts import read_artifact, write_artifact

FORMAT = "coe-router-quality/1"


class QualityPredictor:
    """kNN quality per expert. ``k`` neighbours, softmax weights with temperature ``tau`` over
    cosine similarity, and a prior of ``prior_weight`` pseudo-records at the expert's mean."""

    def __init__(
        self,
        embeddings: np.ndarray,
        experts: Sequence[str],
        scores: Sequence[float],
        k: int = 10,
        tau: float = 0.05,
        prior_weight: float = 2.0,
        encoder_id: str = "",
    ):
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.experts = [str(e) for e in experts]
        self.scores = np.asarray(scores, dtype=np.float64)
        if not (len(self.embeddings) == len(self.experts) == len(self.scores)):
            raise ValueError("embeddings, experts and scores must have the same length")
        self.k, self.tau, self.prior_weight = int(k), float(tau), float(prior_weight)
        self.encoder_id = encoder_id
        self._index: dict[str, np.ndarray] = {}
        for name in sorted(set(self.experts)):
            self._index[name] = np.flatnonzero(np.array(self.experts) == name)

    @property
    def known_experts(self) -> list[str]:
        return list(self._index)

    def mean(self, expert: str) -> float | None:
        idx = self._index.get(expert)
        return None if idx is None else float(self.scores[idx].mean())

    def predict(self, query: np.ndarray, experts: Sequence[str]) -> dict[str, float | None]:
        """Predicted quality in [0, 1] of each named expert for one query embedding; ``None``
        for an expert with no records."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        sims_all = self.embeddings @ q if len(self.embeddings) else np.zeros(0)
        out: dict[str, float | None] = {}
        for name in experts:
            idx = self._index.get(name)
            if idx is None:
                out[name] = None
                continue
            sims = sims_all[idx]
            k = min(self.k, len(idx))
            top = np.argpartition(-sims, k - 1)[:k]
            w = np.exp((sims[top] - sims[top].max()) / self.tau)
            # confidence: how close the nearest neighbours are (cos 1 -> full weight)
            conf = float(np.clip(sims[top].max(), 0.0, 1.0)) * k
            knn = float((w * self.scores[idx][top]).sum() / w.sum())
            prior = float(self.scores[idx].mean())
            out[name] = (conf * knn + self.prior_weight * prior) / (conf + self.prior_weight)
        return out

    def save(self, directory: str | Path) -> Path:
        doc = {"format": FORMAT, "experts": self.experts, "k": self.k, "tau": self.tau,
               "prior_weight": self.prior_weight, "encoder_id": self.encoder_id,
               "n_records": len(self.experts),
               "per_expert_mean": {e: self.mean(e) for e in self.known_experts}}
        return write_artifact(directory, "quality", doc, {"embeddings": self.embeddings, "scores": self.scores})

    @classmethod
    def load(cls, directory: str | Path) -> "QualityPredictor":
        doc, z = read_artifact(directory, "quality", FORMAT, ("embeddings", "scores"))
        emb, scores = z["embeddings"], z["scores"]
        return cls(emb, doc["experts"], scores, doc["k"], doc["tau"], doc["prior_weight"], doc.get("encoder_id", ""))
