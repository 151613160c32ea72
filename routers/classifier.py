"""Stage 1: the category classifier (logistic regression on sentence embeddings).

Why this shape: a linear model on normalised MiniLM embeddings is fast (one 384×9 matrix product),
explainable (per-class weights), trains in seconds from a few hundred labelled prompts, and with
cross-validated regularisation it generalises better to unseen phrasing than a kNN that memorises
the seed set.

Calibration is temperature scaling fitted on out-of-fold logits, so that a probability of 0.9
means "right about 90% of the time" on unseen prompts; the routing policy's confidence
threshold and category mixing rely on that.

Artifacts are ``classifier.json`` (labels, encoder id, temperature, training metadata, eval
metrics) + ``classifier.npz`` (``coef``, ``intercept``) — never pickle. Inference is plain numpy,
so a loaded classifier gives bit-identical probabilities.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routers.artifacts import read_artifact, write_artifact
from routers.errors import ArtifactError

FORMAT = "coe-router-classifier/1"
DEFAULT_C_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_lr(X: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=500, tol=1e-3, class_weight="balanced", random_state=seed)
    clf.fit(X, y)
    return clf


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of out-of-fold logits."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = _softmax(logits / np.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def _cv_select(X: np.ndarray, y: np.ndarray, c_grid: Sequence[float], folds: int, seed: int,
               groups: Sequence[str] | None = None):
    """Pick C by stratified k-fold macro-F1 (ties -> the smaller C, i.e. more regularised);
    returns (C, out-of-fold logits for that C, per-C scores). With ``groups`` (e.g. the template a
    generated prompt came from) a whole group is always held out together, so the out-of-fold
    logits - and the temperature fitted on them - are those of *unseen phrasing*, not of
    near-copies of training prompts."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_classes = int(y.max()) + 1
    folds = max(2, min(folds, int(np.bincount(y).min())))
    if groups is not None:
        splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, groups))
    else:
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    best = None
    scores = {}
    for C in c_grid:
        oof = np.zeros((len(y), n_classes))
        for tr, te in splits:
            clf = _fit_lr(X[tr], y[tr], C, seed)
            oof[np.ix_(te, clf.classes_)] = clf.decision_function(X[te])
        f1 = f1_score(y, oof.argmax(1), average="macro")
        scores[C] = float(f1)
        if best is None or f1 > best[1] + 1e-9:
            best = (C, f1, oof)
    return best[0], best[2], scores


class CategoryClassifier:
    """Calibrated multinomial logistic regression over prompt embeddings."""

    def __init__(
        self,
        labels: Sequence[str],
        coef: np.ndarray,
        intercept: np.ndarray,
        temperature: float = 1.0,
        encoder_id: str = "",
        meta: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ):
        self.labels = list(labels)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.temperature = float(temperature)
        self.encoder_id = encoder_id
        self.meta = dict(meta or {})
        self.metrics = dict(metrics or {})
        if self.coef.shape[0] != len(self.labels) or self.intercept.shape != (len(self.labels),):
            raise ArtifactError(
                f"classifier shape mismatch: {len(self.labels)} labels, coef {self.coef.shape}, "
                f"intercept {self.intercept.shape}"
            )

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        y: Sequence[str],
        labels: Sequence[str] | None = None,
        C: float | None = None,
        c_grid: Sequence[float] = DEFAULT_C_GRID,
        folds: int = 5,
        seed: int = 0,
        encoder_id: str = "",
        meta: dict[str, Any] | None = None,
        groups: Sequence[str] | None = None,
    ) -> "CategoryClassifier":
        """Train on embeddings ``X`` with string labels ``y``. ``C=None`` picks the regularisation
        by cross-validation; the temperature is always fitted on out-of-fold logits (grouped by
        ``groups`` when given, see :func:`_cv_select`)."""
        X = np.asarray(X, dtype=np.float64)
        labels = list(labels) if labels is not None else sorted(set(y))
        index = {c: i for i, c in enumerate(labels)}
        missing = sorted(set(y) - set(index))
        if missing:
            raise ValueError(f"labels not in the label list: {missing}")
        yi = np.array([index[c] for c in y])
        present = np.bincount(yi, minlength=len(labels))
        if (present < 2).any():
            few = [labels[i] for i in np.flatnonzero(present < 2)]
            raise ValueError(f"every category needs at least 2 examples; too few for: {', '.join(few)}")
        t0 = time.perf_counter()
        grid = [C] if C is not None else list(c_grid)
        # with a fixed C, 3 folds are enough for the temperature (the only thing CV then fits)
        chosen, oof, cv_scores = _cv_select(X, yi, grid, folds if C is None else min(folds, 3), seed,
                                            list(groups) if groups is not None else None)
        temperature = _fit_temperature(oof, yi)
        clf = _fit_lr(X, yi, chosen, seed)
        info = dict(meta or {})
        info.update(
            n_train=int(len(yi)), per_category={labels[i]: int(n) for i, n in enumerate(present)},
            C=float(chosen), cv_macro_f1_by_C={str(k): v for k, v in cv_scores.items()},
            temperature=temperature, seed=seed, grouped_cv=groups is not None, fit_seconds=round(time.perf_counter() - t0, 3),
            model="LogisticRegression(multinomial, class_weight=balanced) + temperature scaling",
        )
        return cls(labels, clf.coef_, clf.intercept_, temperature, encoder_id, info)

    # -- inference --------------------------------------------------------------------------------
    def logits(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        return X @ self.coef.T + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, shape ``(n, len(labels))``, columns in ``labels`` order."""
        return _softmax(self.logits(X) / self.temperature)

    def predict(self, X: np.ndarray) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(X).argmax(axis=1)]

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``classifier.json`` + ``classifier.npz`` into ``directory`` (created)."""
        doc = {
            "format": FORMAT, "labels": self.labels, "encoder_id": self.encoder_id,
            "temperature": self.temperature, "training": self.meta, "metrics": self.metrics,
        }
        return write_artifact(directory, "classifier", doc, {"coef": self.coef, "intercept": self.intercept})

    @classmethod
    def load(cls, directory: str | Path) -> "CategoryClassifier":
        doc, z = read_artifact(directory, "classifier", FORMAT, ("coef", "intercept"))
        coef, intercept = z["coef"], z["intercept"]
        return cls(doc["labels"], coef, intercept, doc.get("temperature", 1.0), doc.get("encoder_id", ""),
                   doc.get("training"), doc.get("metrics"))
