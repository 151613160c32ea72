"""Stage 2's learned part: a calibrated k-NN predictor of each expert's quality on a prompt.

Records are ``{"prompt", "expert", "score"}`` (score in [0, 1]: a judge's grade, a unit test's
pass/fail). For a new prompt, an expert's predicted quality is a kernel-weighted mean of its scores
on the ``k`` most similar recorded prompts, shrunk toward the expert's overall mean::

    w_i  = exp((cos_i - 1) / tau)                  (1 for an identical prompt, -> 0 for far ones)
    q    = (sum_i w_i * score_i + m * mean) / (sum_i w_i + m)

The weights are *absolute*, not normalised among the neighbours, so when every neighbour is far
the prior dominates - that is the confidence. ``k``, ``tau`` and ``m`` are not guessed: :meth:`tuned`
picks them by leave-one-prompt-out Brier score on the records themselves (a prompt never predicts
itself), which is what makes the numbers calibrated predictions rather than similarity scores.

Routing (:meth:`choose`) keeps the best-on-average expert ``b`` unless another expert's advantage
*over b on the same prompts* is positive with confidence. The advantage is estimated from paired
differences ``d_i = score_e(i) - score_b(i)`` on the recorded prompts near the query (kernel
weights as above, its own wider ``route_k``: the decision needs more evidence than a prediction),
shrunk toward no advantage with weight ``m``::

    A_e  = sum_i w_i d_i / (sum_i w_i + m)
    se_e = sqrt(((sum_i w_i (d_i - A_e)^2) + m * var(d)) / (sum_i w_i + m) / n_eff)

and the request goes to ``argmax_e (A_e - z * se_e)`` when that is positive. Pairing matters: most
of two models' misses are the same hard prompts, so the paired difference is far less noisy than
two separate estimates (the earlier rule compared two independent bounds and rarely dared move).
``route_k``, the kernel width and ``z`` are chosen by cross-validation over clusters of prompts (so
paraphrases are held out together), and the chosen rule is *kept only if its cross-validated gain
over the best single expert is more than one standard error above zero*; otherwise ``z`` is infinite
and routing never leaves ``b`` (an argmax over many settings flatters itself: the winner's curse).
On the public judgments (bench/router_quality.py) this rule gained +0.022 where domain leaders
differ and never lost where one model leads everywhere (docs/router.md).

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
Z_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
NEVER = 1e9  # z that never leaves the best-on-average expert
ROUTE_K_GRID = (20, 40, 80, 160, 320)
ROUTE_TAU_GRID = (0.05, 0.1, 0.2)
ACCEPT_SE = 1.0  # a routing rule is kept only if its cross-validated gain exceeds this many standard errors
RADIUS_NEIGHBOUR = 10  # the radius is set by how far the records' 10th neighbours are (see radius)
DEFAULT_Z = 1.0  # before tuning, or with too few complete prompts to cross-validate


def _col_var(d: np.ndarray) -> np.ndarray:
    """Per column, the variance of its non-NaN entries (0.25 where fewer than two: the variance of
    a fair coin's 0/1 difference, a cautious prior when nothing is known)."""
    out = np.full(d.shape[1], 0.25)
    for j in range(d.shape[1]):
        col = d[:, j][~np.isnan(d[:, j])]
        if len(col) >= 2:
            out[j] = float(col.var()) + 1e-4
    return out


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
        self._targets: dict[tuple[str, ...], np.ndarray] = {}  # per expert list: the service asks per request

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
    def radius(self) -> float:
        """Cosine below which a recorded prompt is no neighbour at all (``-1``: none set). Set by
        :meth:`tuned` to the 1st percentile, over the records' prompts, of the cosine to their 10th
        nearest other prompt: a query farther from every record than that is in a
        domain the records do not cover, and gets each expert's mean (so the best single expert).
        Without it, a kernel tuned on dense records lends far neighbours real weight."""
        return float(self.fit_info.get("radius", -1.0))

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
                        exclude_self: bool = False, with_se: bool = False):
        """Predictions ``(n_queries, len(experts))`` from query-to-prompt cosines ``sims``
        ``(n_queries, n_prompts)``; NaN for an expert without records. ``with_se``: also the
        standard error of each prediction (see the module docstring), as a second matrix."""
        out = np.full((len(sims), len(experts)), np.nan)
        se = np.full((len(sims), len(experts)), np.nan)
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
            w[st < self.radius] = 0.0  # farther than the records' own neighbours: no evidence
            prior = float(sc.mean())
            sw = w.sum(1)
            out[:, j] = ((w * sc[top]).sum(1) + m * prior) / (sw + m)
            if with_se:
                kish = sw ** 2 / np.maximum((w ** 2).sum(1), 1e-300)
                n_eff = kish * sw / (sw + m) + m
                q = out[:, j]
                se[:, j] = np.sqrt(np.clip(q * (1 - q), 0.0, None) / np.maximum(n_eff, 1e-12))
        return (out, se) if with_se else out

    def predict_many(self, queries: np.ndarray, experts: Sequence[str], with_se: bool = False):
        """Predicted quality ``(n, len(experts))`` for many query embeddings (NaN: no records);
        ``with_se``: ``(quality, standard error)``."""
        if not len(self.embeddings):
            nan = np.full((len(np.atleast_2d(queries)), len(experts)), np.nan)
            return (nan, nan.copy()) if with_se else nan
        sims = _unit(queries) @ self.embeddings.T
        return self._predict_matrix(sims, experts, self.k, self.tau, self.prior_weight, with_se=with_se)

    def _advantage(self, sims: np.ndarray, experts: Sequence[str], base: int, k: int, tau: float,
                   tgt: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Paired advantage of each expert over ``experts[base]`` and its standard error, per query
        (module docstring), from query-to-prompt cosines ``sims``. Only recorded prompts scored for
        both experts count; NaN for an expert with no such prompt at all. ``tgt``: the per-prompt
        score matrix of the prompts behind ``sims`` (default: all of them)."""
        tgt = self._target_matrix(list(experts)) if tgt is None else tgt
        kk = min(k, sims.shape[1])
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        st = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        w = np.exp((st - 1.0) / tau)
        w[st < self.radius] = 0.0
        m = self.prior_weight
        D = tgt[top] - tgt[top][:, :, [base]]  # (n_q, kk, M)
        ok = ~np.isnan(D)
        W = np.where(ok, w[:, :, None], 0.0)
        Dz = np.where(ok, D, 0.0)
        all_d = tgt - tgt[:, [base]]
        have = ~np.isnan(all_d).all(0)
        v0 = _col_var(all_d)  # the shrinkage's variance: the difference's spread over all records
        sw = W.sum(1)
        mu = (W * Dz).sum(1) / (sw + m)
        var = ((W * (Dz - mu[:, None, :]) ** 2).sum(1) + m * v0[None, :]) / (sw + m)
        kish = sw ** 2 / np.maximum((W ** 2).sum(1), 1e-300)
        n_eff = kish * sw / (sw + m) + m
        se = np.sqrt(var / n_eff)
        mu[:, ~have], se[:, ~have] = np.nan, np.nan
        mu[:, base], se[:, base] = 0.0, 0.0
        return mu, se

    @staticmethod
    def pick_rows(A: np.ndarray, SE: np.ndarray, base: int, z: float) -> np.ndarray:
        """Column picked per row: ``base`` unless another column's bound ``A - z * SE`` is positive,
        then the one with the highest bound (NaN never wins)."""
        lb = np.where(np.isnan(A), -np.inf, A - z * np.nan_to_num(SE, nan=np.inf))
        lb[:, base] = 0.0
        pick = lb.argmax(1)
        pick[lb[np.arange(len(lb)), pick] <= 0] = base
        return pick

    def predict(self, query: np.ndarray, experts: Sequence[str]) -> dict[str, float | None]:
        """Predicted quality in [0, 1] of each named expert for one query embedding; ``None``
        for an expert with no records."""
        row = self.predict_many(np.asarray(query).reshape(1, -1), experts)[0]
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(experts, row)}

    def _target_matrix(self, experts: list[str]) -> np.ndarray:
        """Per distinct prompt and expert, the mean recorded score (NaN where there is none);
        cached, as the records never change in place (:meth:`add` returns a new predictor)."""
        key = tuple(experts)
        if key not in self._targets:
            if len(self._targets) >= 64:
                self._targets.clear()
            tgt = self._compute_targets(list(experts))
            tgt.flags.writeable = False
            self._targets[key] = tgt
        return self._targets[key]

    def _compute_targets(self, experts: list[str]) -> np.ndarray:
        tgt = np.full((self.n_prompts, len(experts)), np.nan)
        for j, name in enumerate(experts):
            recs = self._index.get(name)
            if recs is None:
                continue  # no records: a NaN column
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

    def cluster_folds(self, folds: int = 5, seed: int = 0) -> np.ndarray:
        """A fold per distinct prompt: k-means clusters of the embeddings dealt to ``folds`` folds,
        so paraphrases of one question (which the records cannot name) are held out together."""
        from sklearn.cluster import KMeans

        n_clusters = int(min(50, max(folds, self.n_prompts // 20)))
        lab = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(self.embeddings)
        return (np.random.default_rng(seed).permutation(n_clusters) % folds)[lab]

    def choose_route(self, k_grid: Sequence[int] = ROUTE_K_GRID, tau_grid: Sequence[float] = ROUTE_TAU_GRID,
                     z_grid: Sequence[float] = Z_GRID, folds: int = 5, repeats: int = 3) -> dict[str, Any]:
        """``route_k``, ``route_tau`` and ``z`` of the routing rule (module docstring) by k-fold
        cross-validation over :meth:`cluster_folds`, repeated with ``repeats`` clusterings (one
        split's luck is the main noise here): each fold's prompts are routed from the other folds'
        records. The setting with the best mean recorded score is kept only if its gain over the
        best single expert is more than ``ACCEPT_SE`` standard errors (over prompts) above zero;
        otherwise ``z`` is :data:`NEVER`. Only prompts scored for every expert count; with fewer
        than 50 the defaults stay (``DEFAULT_Z``)."""
        experts = self.known_experts
        tgt = self._target_matrix(experts)
        full = np.flatnonzero(~np.isnan(tgt).any(1))
        default = {"z": DEFAULT_Z, "route_k": self.route_k, "route_tau": self.route_tau}
        if len(full) < 50 or len(experts) < 2:
            return default
        T = tgt[full]
        best = int(np.argmax(T.mean(0)))
        sims_all = self.embeddings[full] @ self.embeddings[full].T
        settings = [(k, tau, z) for k in k_grid if k <= len(full) for tau in tau_grid for z in z_grid]
        if not settings:
            return default
        diffs = {s: np.zeros(len(full)) for s in settings}
        for seed in range(repeats):
            fold = QualityPredictor(self.embeddings[full], [], [], fit_info=self.fit_info).cluster_folds(folds, seed)
            for f in range(folds):
                a, b = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                if not len(a) or not len(b):
                    continue
                sims = sims_all[np.ix_(b, a)]
                for k in {s[0] for s in settings}:
                    for tau in tau_grid:
                        A, SE = self._advantage(sims, experts, best, k, tau, tgt=T[a])
                        for z in z_grid:
                            pick = self.pick_rows(A, SE, best, z)
                            diffs[(k, tau, z)][b] += (T[b][np.arange(len(b)), pick] - T[b, best]) / repeats
        stats = {s: (float(d.mean()), float(d.std() / np.sqrt(len(d)))) for s, d in diffs.items()}
        k, tau, z = max(settings, key=lambda s: (stats[s][0], s[2], s[0]))  # ties: the more cautious
        gain, se = stats[(k, tau, z)]
        accepted = gain > ACCEPT_SE * se
        self.fit_info["route_cv"] = {"k": k, "tau": tau, "z": z, "gain": round(gain, 4), "se": round(se, 4),
                                     "accepted": bool(accepted), "n_prompts": int(len(full)),
                                     "best_single": round(float(T[:, best].mean()), 4)}
        return {"z": float(z) if accepted else NEVER, "route_k": int(k), "route_tau": float(tau)}

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
        other = np.where(sims > 1.0 - 1e-6, -1.0, sims)  # exact duplicates are no neighbours
        nth = min(RADIUS_NEIGHBOUR, self.n_prompts - 1)
        radius = float(np.quantile(np.partition(other, -nth, axis=1)[:, -nth], 0.01))
        self = QualityPredictor(self.embeddings, self.experts, self.scores, self.k, self.tau, self.prior_weight,
                                self.encoder_id, self.prompt_index, {"radius": radius})
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
                "radius": radius,
                "brier_expert_mean_only": round(prior_brier, 5), "n_prompts": self.n_prompts,
                "n_records": len(self.experts), "grid": table}
        out = QualityPredictor(self.embeddings, self.experts, self.scores, k, tau, m, self.encoder_id,
                               self.prompt_index, info)
        out.fit_info.update(out.choose_route())
        return out

    @property
    def z(self) -> float:
        """Confidence of the routing rule: chosen by :meth:`choose_route` when tuned, else
        ``DEFAULT_Z``; :data:`NEVER` when cross-validation found no gain worth acting on."""
        return float(self.fit_info.get("z", DEFAULT_Z))

    @property
    def route_k(self) -> int:
        """Neighbours behind a routing decision (wider than :attr:`k`, which serves predictions)."""
        return int(self.fit_info.get("route_k", max(self.k, 40)))

    @property
    def route_tau(self) -> float:
        """Kernel width of the routing decision's neighbours."""
        return float(self.fit_info.get("route_tau", self.tau))

    def best_expert(self) -> str | None:
        """The expert with the best mean recorded score (the 'always this one' baseline)."""
        means = {e: self.mean(e) for e in self.known_experts}
        return max(means, key=lambda e: means[e]) if means else None

    def base_expert(self, experts: Sequence[str]) -> str | None:
        """Among ``experts``, the one with the best mean recorded score (None: none has records)."""
        known = [e for e in experts if e in self._index]
        return max(known, key=lambda e: self.mean(e) or 0.0) if known else None

    def choose_many(self, queries: np.ndarray, experts: Sequence[str]) -> list[str | None]:
        """:meth:`choose` for many query embeddings at once (one pass)."""
        base = self.base_expert(experts)
        if base is None:
            return [None] * len(np.atleast_2d(queries))
        if self.z >= NEVER or not len(self.embeddings):
            return [base] * len(np.atleast_2d(queries))
        b = list(experts).index(base)
        A, SE = self._advantage(_unit(queries) @ self.embeddings.T, experts, b, self.route_k, self.route_tau)
        return [experts[i] for i in self.pick_rows(A, SE, b, self.z)]

    def confident_pick(self, query: np.ndarray, experts: Sequence[str]) -> str | None:
        """The expert :meth:`choose` moves to, or None when it stays with the best-on-average one
        (what the service's policy rewards: :mod:`routers.policy`)."""
        pick = self.choose(query, experts)
        return pick if pick is not None and pick != self.base_expert(experts) else None

    def choose(self, query: np.ndarray, experts: Sequence[str]) -> str | None:
        """Pure quality routing among ``experts``: the best-on-average one unless another's paired
        advantage over it is positive with confidence :attr:`z` (module docstring)."""
        return self.choose_many(np.asarray(query).reshape(1, -1), experts)[0]

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
