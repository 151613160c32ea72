"""Stage 2's learned part: a calibrated k-NN predictor of each expert's quality on a prompt.

Records are ``{"prompt", "expert", "score"}`` (score in [0, 1]: a judge's grade, a unit test's
pass/fail). For a new prompt, an expert's predicted quality is a kernel-weighted mean of its scores
on the ``k`` most similar recorded prompts, shrunk toward the expert's overall mean::

    w_i  = exp((cos_i - 1) / tau)                  (1 for an identical prompt, -> 0 for far ones)
    q    = (sum_i w_i * score_i + m * mean) / (sum_i w_i + m)

The weights are *absolute*, not normalised among the neighbours, so when every neighbour is far
the prior dominates - that is the confidence. ``k``, ``tau`` and ``m`` are not guessed: :meth:`fit`
picks them by leave-one-prompt-out Brier score on the records themselves (a prompt never predicts
itself), which is what makes the numbers calibrated predictions rather than similarity scores.

Why cosine needs care: the router's features are several separately normalised blocks (4 layers ×
384), so their norm is 2, not 1; this class renormalises every vector so the dot product is a true
cosine in [-1, 1]. Each distinct prompt is embedded and stored once, however many experts were
scored on it. A k-NN needs no training step, explains itself ("these prompts, these scores") and
updates by appending records (``coe router quality add``). Saved as ``quality.json`` +
``quality.npz`` (no pickle).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routers.artifacts import read_artifact, write_artifact

FORMAT = "coe-router-quality/2"
OLD_FORMAT = "coe-router-quality/1"
K_GRID = (5, 10, 20, 40)
TAU_GRID = (0.02, 0.05, 0.1, 0.2)
PRIOR_GRID = (0.5, 2.0, 8.0)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class QualityPredictor:
    """Calibrated k-NN quality per expert over unit-normalised prompt embeddings.

    ``embeddings``: one row per distinct prompt; ``prompt_index[r]``: the row of record ``r``;
    ``experts[r]``, ``scores[r]``: who was scored and how."""

    def __init__(
        self,
        embeddings: np.ndarray,
        experts: Sequence[str],
        scores: Sequence[float],
        k: int = 20,
        tau: float = 0.05,
        prior_weight: float = 2.0,
        encoder_id: str = "",
        prompt_index: Sequence[int] | None = None,
        fit_info: dict[str, Any] | None = None,
    ):
        self.embeddings = _unit(embeddings) if len(embeddings) else np.zeros((0, 0), np.float32)
        self.experts = [str(e) for e in experts]
        self.scores = np.asarray(scores, dtype=np.float64)
        self.prompt_index = (np.arange(len(self.experts)) if prompt_index is None
                             else np.asarray(prompt_index, dtype=np.int64))
        if not (len(self.prompt_index) == len(self.experts) == len(self.scores)):
            raise ValueError("prompt_index, experts and scores must have the same length")
        if len(self.prompt_index) and (self.prompt_index.max() >= len(self.embeddings) or self.prompt_index.min() < 0):
            raise ValueError("prompt_index points outside the embeddings")
        self.k, self.tau, self.prior_weight = int(k), float(tau), float(prior_weight)
        self.encoder_id = encoder_id
        self.fit_info = dict(fit_info or {})
        names = np.array(self.experts)
        self._index: dict[str, np.ndarray] = {n: np.flatnonzero(names == n) for n in sorted(set(self.experts))}

    # -- construction ------------------------------------------------------------------------------
    @staticmethod
    def dedupe(prompts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Distinct prompts (first-seen order) and, per input, its row among them."""
        rows: dict[str, int] = {}
        idx = np.array([rows.setdefault(p, len(rows)) for p in prompts], dtype=np.int64)
        return list(rows), idx

    @classmethod
    def from_records(cls, records: Sequence[Any], encode, encoder_id: str = "", tune: bool = True,
                     **kw) -> "QualityPredictor":
        """Build from ``EvalRecord``-like objects, embedding each distinct prompt once with
        ``encode(list_of_prompts) -> array``; ``tune`` picks k/tau/m by leave-one-prompt-out."""
        uniq, idx = cls.dedupe([r.prompt for r in records])
        qp = cls(encode(uniq), [r.expert for r in records], [r.score for r in records],
                 encoder_id=encoder_id, prompt_index=idx, **kw)
        return qp.tuned() if tune else qp

    def add(self, records: Sequence[Any], encode) -> "QualityPredictor":
        """A new predictor with ``records`` appended (new prompts embedded once; known prompts reuse
        their row). Hyperparameters are kept: retune with :meth:`tuned` when the data changed a lot."""
        # the stored embeddings keep no text: new prompts are deduplicated among themselves only
        uniq, idx = self.dedupe([r.prompt for r in records])
        new_emb = encode(uniq) if uniq else np.zeros((0, self.embeddings.shape[1]), np.float32)
        emb = np.vstack([self.embeddings, _unit(new_emb)]) if len(self.embeddings) else _unit(new_emb)
        return QualityPredictor(emb, self.experts + [r.expert for r in records],
                                np.concatenate([self.scores, [r.score for r in records]]),
                                self.k, self.tau, self.prior_weight, self.encoder_id,
                                np.concatenate([self.prompt_index, idx + len(self.embeddings)]), self.fit_info)

    # -- prediction ---------------------------------------------------------------------------------
    @property
    def known_experts(self) -> list[str]:
        return list(self._index)

    @property
    def n_prompts(self) -> int:
        return int(len(self.embeddings))

    def mean(self, expert: str) -> float | None:
        idx = self._index.get(expert)
        return None if idx is None else float(self.scores[idx].mean())

    def _predict_matrix(self, sims: np.ndarray, experts: Sequence[str], k: int, tau: float, m: float,
                        exclude_self: bool = False) -> np.ndarray:
        """Predictions ``(n_queries, len(experts))`` from query-to-prompt cosines ``sims``
        ``(n_queries, n_prompts)``; NaN for an expert without records."""
        out = np.full((len(sims), len(experts)), np.nan)
        for j, name in enumerate(experts):
            recs = self._index.get(name)
            if recs is None or len(recs) == 0:
                continue
            rows, sc = self.prompt_index[recs], self.scores[recs]
            s = sims[:, rows].astype(np.float64)
            kk = min(k, s.shape[1])
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            st = np.take_along_axis(s, top, axis=1)
            w = np.exp((st - 1.0) / tau)
            if exclude_self:
                w[st > 1.0 - 1e-6] = 0.0  # leave-one-prompt-out: a prompt never predicts itself
            prior = float(sc.mean())
            out[:, j] = ((w * sc[top]).sum(1) + m * prior) / (w.sum(1) + m)
        return out

    def predict_many(self, queries: np.ndarray, experts: Sequence[str]) -> np.ndarray:
        """Predicted quality ``(n, len(experts))`` for many query embeddings (NaN: no records)."""
        if not len(self.embeddings):
            return np.full((len(np.atleast_2d(queries)), len(experts)), np.nan)
        sims = _unit(queries) @ self.embeddings.T
        return self._predict_matrix(sims, experts, self.k, self.tau, self.prior_weight)

    def predict(self, query: np.ndarray, experts: Sequence[str]) -> dict[str, float | None]:
        """Predicted quality in [0, 1] of each named expert for one query embedding; ``None``
        for an expert with no records."""
        row = self.predict_many(np.asarray(query).reshape(1, -1), experts)[0]
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(experts, row)}

    def _target_matrix(self, experts: list[str]) -> np.ndarray:
        """Per distinct prompt and expert, the mean recorded score (NaN where there is none)."""
        tgt = np.full((self.n_prompts, len(experts)), np.nan)
        for j, name in enumerate(experts):
            recs = self._index[name]
            sums = np.bincount(self.prompt_index[recs], weights=self.scores[recs], minlength=self.n_prompts)
            cnt = np.bincount(self.prompt_index[recs], minlength=self.n_prompts)
            tgt[cnt > 0, j] = sums[cnt > 0] / cnt[cnt > 0]
        return tgt

    def loo_matrix(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(experts, predictions, targets)`` per distinct prompt, each prompt predicted without its
        own records (leave-one-prompt-out); targets are the mean recorded scores (NaN: none)."""
        experts = self.known_experts
        sims = self.embeddings @ self.embeddings.T
        tgt = self._target_matrix(experts)
        pred = self._predict_matrix(sims, experts, self.k + 1, self.tau, self.prior_weight, exclude_self=True)
        return experts, pred, tgt

    def choose_margin(self, grid: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3),
                      folds: int = 5, seed: int = 0) -> float:
        """The margin by which an expert's predicted quality must beat the best-on-average expert's
        before routing leaves the latter. Argmax over several noisy estimates favours whichever is
        most over-estimated (the winner's curse); the margin guards against it. Chosen by k-fold
        cross-validation over *clusters* of prompts (k-means on the embeddings), so paraphrases of
        one question are held out together - leave-one-prompt-out would let them vouch for each
        other. Only prompts scored for every expert count; the smallest best margin wins."""
        from sklearn.cluster import KMeans

        experts, _, tgt = self.loo_matrix()
        full = np.flatnonzero(~np.isnan(tgt).any(1))
        if len(full) < 50 or len(experts) < 2:
            return 0.0
        n_clusters = int(min(50, max(folds, len(self.embeddings) // 20)))
        lab = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(self.embeddings)
        fold_of_cluster = np.random.default_rng(seed).permutation(n_clusters) % folds
        fold = fold_of_cluster[lab]
        rec_fold = fold[self.prompt_index]
        P = np.full_like(tgt, np.nan)
        for f in range(folds):
            keep = rec_fold != f
            sub = QualityPredictor(self.embeddings, [e for e, k in zip(self.experts, keep) if k], self.scores[keep],
                                   self.k, self.tau, self.prior_weight, prompt_index=self.prompt_index[keep])
            rows = np.flatnonzero(fold == f)
            if len(rows):
                P[rows] = sub.predict_many(self.embeddings[rows], experts)
        P, T = P[full], tgt[full]
        P = np.where(np.isnan(P), -1.0, P)
        best = int(np.argmax(T.mean(0)))
        scores = {}
        for mg in grid:
            pick = P.argmax(1)
            pick[P[np.arange(len(P)), pick] - P[:, best] <= mg] = best
            scores[mg] = float(T[np.arange(len(T)), pick].mean())
        self.fit_info["margin_cv"] = {str(k): round(v, 4) for k, v in scores.items()}
        top = max(scores.values())
        return float(min(mg for mg, v in scores.items() if v >= top - 1e-12))

    # -- calibration ------------------------------------------------------------------------------------
    def tuned(self, k_grid: Sequence[int] = K_GRID, tau_grid: Sequence[float] = TAU_GRID,
              prior_grid: Sequence[float] = PRIOR_GRID) -> "QualityPredictor":
        """A copy with ``k``, ``tau`` and ``m`` chosen by leave-one-prompt-out Brier score over all
        records (each prompt's own records and exact duplicates excluded from its neighbours)."""
        if self.n_prompts < 10:
            return self
        sims = self.embeddings @ self.embeddings.T
        experts = self.known_experts
        tgt = self._target_matrix(experts)
        have = ~np.isnan(tgt)
        best: tuple[float, int, float, float] | None = None
        table = []
        prior_brier = None
        for k, tau, m in itertools.product(k_grid, tau_grid, prior_grid):
            pred = self._predict_matrix(sims, experts, k + 1, tau, m, exclude_self=True)
            brier = float(np.mean((pred[have] - tgt[have]) ** 2))
            table.append({"k": k, "tau": tau, "prior_weight": m, "brier": round(brier, 5)})
            if best is None or brier < best[0] - 1e-9:
                best = (brier, k, tau, m)
        means = np.array([self.mean(e) for e in experts])
        prior_brier = float(np.mean((np.broadcast_to(means, tgt.shape)[have] - tgt[have]) ** 2))
        _, k, tau, m = best  # type: ignore[misc]
        info = {"method": "leave-one-prompt-out Brier", "brier": round(best[0], 5),  # type: ignore[index]
                "brier_expert_mean_only": round(prior_brier, 5), "n_prompts": self.n_prompts,
                "n_records": len(self.experts), "grid": table}
        out = QualityPredictor(self.embeddings, self.experts, self.scores, k, tau, m, self.encoder_id,
                               self.prompt_index, info)
        out.fit_info["margin"] = out.choose_margin()
        return out

    @property
    def margin(self) -> float:
        """Decision margin chosen by :meth:`choose_margin` when tuned (0 otherwise)."""
        return float(self.fit_info.get("margin", 0.0))

    def best_expert(self) -> str | None:
        """The expert with the best mean recorded score (the 'always this one' baseline)."""
        means = {e: self.mean(e) for e in self.known_experts}
        return max(means, key=lambda e: means[e]) if means else None

    def choose(self, query: np.ndarray, experts: Sequence[str]) -> str | None:
        """Pure quality routing among ``experts``: the best-on-average one unless another is
        predicted better by more than :attr:`margin`."""
        pred = {e: q for e, q in self.predict(query, experts).items() if q is not None}
        if not pred:
            return None
        top = max(pred, key=lambda e: pred[e])
        base = max(pred, key=lambda e: self.mean(e) or 0.0)
        return top if pred[top] - pred[base] > self.margin else base

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        doc = {"format": FORMAT, "experts": self.experts, "k": self.k, "tau": self.tau,
               "prior_weight": self.prior_weight, "encoder_id": self.encoder_id,
               "n_records": len(self.experts), "n_prompts": self.n_prompts,
               "per_expert_mean": {e: self.mean(e) for e in self.known_experts},
               "fit": {k: v for k, v in self.fit_info.items() if k != "grid"}}
        return write_artifact(directory, "quality", doc, {"embeddings": self.embeddings, "scores": self.scores,
                                                          "prompt_index": self.prompt_index})

    @classmethod
    def load(cls, directory: str | Path) -> "QualityPredictor":
        import json

        try:
            old = json.loads((Path(directory) / "quality.json").read_text()).get("format") == OLD_FORMAT
        except (OSError, ValueError):
            old = False  # read_artifact below reports the problem
        if old:  # an older artifact: one embedding per record
            doc, z = read_artifact(directory, "quality", OLD_FORMAT, ("embeddings", "scores"))
            idx = None
        else:
            doc, z = read_artifact(directory, "quality", FORMAT, ("embeddings", "scores", "prompt_index"))
            idx = z["prompt_index"]
        return cls(z["embeddings"], doc["experts"], z["scores"], doc["k"], doc["tau"], doc["prior_weight"],
                   doc.get("encoder_id", ""), idx, doc.get("fit"))
