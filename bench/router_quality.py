"""Stage 2 on real judgments: does per-prompt quality routing beat always-the-best-expert?

Data: ``../shared/data/eval-records/zeroeval.jsonl`` (read in place, never copied): 1,911 prompts
× 8 models, 0/1 correctness, benchmarks crux / math-l5 / numersense-v2 (see its README).

Two views of the same real records:
* ``all-8``: every model. gpt-4o is the best model on every benchmark, so only per-prompt (not
  per-domain) signal can help - the hardest case for a router.
* ``without-gpt-4o``: the other 7 models. Here different models lead on different benchmarks
  (claude-3.5-sonnet on crux, gpt-4o-mini on math-l5, gemini-1.5-flash on numersense-v2), which is
  the situation of a pool of open 7-8B experts. Real grades, only the pool is smaller.

Splits (nothing is chosen on the test half; each figure touches it once):
* ``grouped_half``: within each benchmark, half of the prompt groups train and half test; a group is
  one prompt, except numersense-v2, whose 64 paraphrases of one number pair form one group (a random
  split would put near-copies on both sides). ``--repeats`` seeds, mean ± sd.
* ``leave_one_benchmark_out``: train on two benchmarks, test on the third (an unseen domain: the
  router must fall back to the best single model, not lose).

Methods, each fitted on the training half only:
* ``knn`` (shipped default, :class:`routers.quality.QualityPredictor`): calibrated k-NN, k/tau/m by
  leave-one-prompt-out Brier; routing by the *paired* advantage over the best single expert in a
  wider neighbourhood, its k, kernel and confidence ``z`` by cross-validation over k-means clusters
  and kept only if the cross-validated gain clears one standard error - all inside the training
  half, exactly what ``coe router quality add`` does;
* ``knn-margin``: the same predictor with the previous rule (fixed margin over the best single);
* ``lr``: one logistic regression per expert (RouteLLM's per-model classifier), ``mf``: a low-rank
  bilinear model (prompt embedding projected to 8 dims × one vector per expert; RouteLLM's matrix
  factorisation), ``mlp``: one hidden layer of 32 (RouterDC-like), each on a 64-d PCA of the
  embedding; hyper-parameters by Brier and the margin by routed score, both out-of-fold in a
  5-fold GroupKFold inside the training half (nested CV).
Scores: the *recorded* score of the chosen model on the test prompts; ``best_single`` is the model
with the best training mean; ``oracle`` the best recorded score per prompt.

Quality vs cost (RouteLLM's curve): a strong (costlier) and a weak model; the test prompts are
ranked by the predicted advantage of the strong one and the top share goes to it; compared with
random mixing at the same share (APGR: area under the performance-gap-recovered curve, 0.5 = random).

    flock /tmp/coe-heavy.lock timeout 1500 python bench/router_quality.py
Writes bench/results/router_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from router_crossstyle import embed_cached  # noqa: E402

from routers.encoder import get_encoder  # noqa: E402
from routers.quality import QualityPredictor  # noqa: E402

DATA = Path(os.environ.get("COE_EVAL_RECORDS", ROOT.parent / "shared" / "data" / "eval-records" / "zeroeval.jsonl"))
if not DATA.exists():
    DATA = Path("/work/shared/data/eval-records/zeroeval.jsonl")

GPT4O = "gpt-4o-2024-05-13"
VIEWS = {"all-8": (), "without-gpt-4o": (GPT4O,)}
# Costlier vs cheaper, by list price per 1M input/output tokens when the models were released
# (2024): gpt-4o $5/$15, claude-3.5-sonnet $3/$15, gpt-4o-mini $0.15/$0.60; Llama-3-8B is an open
# 8B model, the cheapest to serve.
COST_PAIRS = {"all-8": [(GPT4O, "gpt-4o-mini-2024-07-18"), (GPT4O, "Meta-Llama-3-8B-Instruct")],
              "without-gpt-4o": [("claude-3-5-sonnet-20240620", "gpt-4o-mini-2024-07-18")]}
MARGINS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 1.0)
LEARNED_GRIDS = {"lr": (0.003, 0.01, 0.03, 0.1, 0.3), "mf": (1.0, 10.0, 30.0), "mlp": (1.0, 10.0, 30.0)}


def load(path: Path):
    """Prompts, models, score matrix (prompts × models) and benchmark per prompt."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    models = sorted({r["expert"] for r in rows})
    pi, mi = {p: i for i, p in enumerate(prompts)}, {m: j for j, m in enumerate(models)}
    S = np.full((len(prompts), len(models)), np.nan)
    bench = [""] * len(prompts)
    for r in rows:
        S[pi[r["prompt"]], mi[r["expert"]]] = r["score"]
        bench[pi[r["prompt"]]] = r.get("benchmark", "")
    return prompts, models, S, np.array(bench)


def groups_of(prompts: list[str], bench: np.ndarray) -> np.ndarray:
    """numersense-v2 prompts grouped by the pair of numbers they mention; every other prompt alone."""
    out = []
    for i, (p, b) in enumerate(zip(prompts, bench)):
        if b == "numersense-v2":
            out.append("ns:" + ",".join(sorted(re.findall(r"\d+\.\d+", p))))
        else:
            out.append(f"{b}:{i}")
    return np.array(out)


def grouped_half(bench: np.ndarray, G: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for b in sorted(set(bench)):
        gs = np.unique(G[bench == b])
        rng.shuffle(gs)
        train_g = set(gs[: len(gs) // 2])
        for i in np.flatnonzero(bench == b):
            (tr if G[i] in train_g else te).append(i)
    return np.array(tr), np.array(te)


# -- methods -------------------------------------------------------------------------------------------
def fit_knn(X, S, models, tr, encoder_id: str = "") -> QualityPredictor:
    n, M = len(tr), len(models)
    return QualityPredictor(X[tr], [models[m] for _ in range(n) for m in range(M)], S[tr].reshape(-1),
                            encoder_id=encoder_id, prompt_index=np.repeat(np.arange(n), M)).tuned()


def margin_route(Q: np.ndarray, best: int, margin: float) -> np.ndarray:
    pick = Q.argmax(1)
    pick[Q[np.arange(len(Q)), pick] - Q[:, best] <= margin] = best
    return pick


def pick_margin(Q: np.ndarray, S: np.ndarray, best: int) -> float:
    """The smallest margin with the best out-of-fold routed score."""
    sc = {mg: float(S[np.arange(len(S)), margin_route(Q, best, mg)].mean()) for mg in MARGINS}
    top = max(sc.values())
    return min(mg for mg, v in sc.items() if v >= top - 1e-12)


def learned_predict(method: str, hp: float, Xtr, Str, Xte) -> np.ndarray:
    """Per-expert probability of a correct answer from a model fitted on (Xtr, Str)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    pca = PCA(n_components=min(64, len(Xtr) - 1), random_state=0).fit(Xtr)
    A, B = pca.transform(Xtr), pca.transform(Xte)
    sd = A.std(0) + 1e-9
    A, B = A / sd, B / sd
    Y = (Str >= 0.5).astype(int)
    if method == "lr":
        out = np.zeros((len(B), Y.shape[1]))
        for m in range(Y.shape[1]):
            if Y[:, m].min() == Y[:, m].max():
                out[:, m] = Y[0, m]
                continue
            out[:, m] = LogisticRegression(C=hp, max_iter=500).fit(A, Y[:, m]).predict_proba(B)[:, 1]
        return out
    # mf: identity hidden layer = prompt projection (8-d) x per-expert output vectors (bilinear)
    net = MLPClassifier(hidden_layer_sizes=(8,) if method == "mf" else (32,),
                        activation="identity" if method == "mf" else "relu", alpha=hp, max_iter=300, random_state=0)
    return net.fit(A, Y).predict_proba(B)


def fit_learned(method: str, X, S, G, tr):
    """Nested CV inside ``tr``: hyper-parameter by out-of-fold Brier, margin by out-of-fold routed
    score; returns (predict function, chosen hp, margin)."""
    from sklearn.model_selection import GroupKFold

    Xtr, Str = X[tr], S[tr]
    best = int(np.argmax(Str.mean(0)))
    oof = {hp: np.zeros(Str.shape) for hp in LEARNED_GRIDS[method]}
    for a, b in GroupKFold(n_splits=5).split(Xtr, groups=G[tr]):
        for hp in oof:
            oof[hp][b] = learned_predict(method, hp, Xtr[a], Str[a], Xtr[b])
    hp = min(oof, key=lambda h: float(np.mean((oof[h] - Str) ** 2)))
    margin = pick_margin(oof[hp], Str, best)
    return (lambda Xte: learned_predict(method, hp, Xtr, Str, Xte)), hp, margin


def score(S_te: np.ndarray, pick: np.ndarray, best: int, bench_te: np.ndarray | None = None) -> dict:
    r = np.arange(len(S_te))
    out = {"routed": float(S_te[r, pick].mean()), "best_single": float(S_te[:, best].mean()),
           "oracle": float(S_te.max(1).mean()), "share_not_best": float((pick != best).mean()), "n_test": len(S_te)}
    out["gain"] = out["routed"] - out["best_single"]
    gap = out["oracle"] - out["best_single"]
    out["gap_closed"] = out["gain"] / gap if gap > 0 else 0.0
    if bench_te is not None:
        out["per_benchmark"] = {b: {k: round(v, 4) for k, v in score(S_te[bench_te == b], pick[bench_te == b], best).items()}
                                for b in sorted(set(bench_te))}
    return out


def run_methods(methods, X, S, G, models, bench, tr, te, encoder_id) -> tuple[dict, QualityPredictor | None]:
    """Every method fitted on ``tr`` and scored once on ``te``."""
    best = int(np.argmax(S[tr].mean(0)))
    res, qp = {}, None
    for method in methods:
        t0 = time.perf_counter()
        if method in ("knn", "knn-margin"):
            qp = qp or fit_knn(X, S, models, tr, encoder_id)
            if method == "knn":
                pick = np.array([models.index(e) for e in qp.choose_many(X[te], models)])
                info = {"k": qp.k, "tau": qp.tau, "prior_weight": qp.prior_weight, "z": qp.z,
                        "route_k": qp.route_k, "route_tau": qp.route_tau, "route_cv": qp.fit_info.get("route_cv"),
                        "brier_loo": qp.fit_info.get("brier"), "brier_mean_only": qp.fit_info.get("brier_expert_mean_only")}
            else:  # the previous rule: fixed margin chosen out-of-fold on cluster folds of the training half
                fold = qp.cluster_folds()
                P = np.zeros((len(tr), len(models)))
                for f in range(5):
                    a, b = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                    sub = QualityPredictor(X[tr][a], [models[m] for _ in a for m in range(len(models))],
                                           S[tr][a].reshape(-1), qp.k, qp.tau, qp.prior_weight,
                                           prompt_index=np.repeat(np.arange(len(a)), len(models)))
                    P[b] = sub.predict_many(X[tr][b], models)
                mg = pick_margin(P, S[tr], best)
                pick = margin_route(qp.predict_many(X[te], models), best, mg)
                info = {"margin": mg}
        else:
            predict, hp, mg = fit_learned(method, X, S, G, tr)
            pick = margin_route(predict(X[te]), best, mg)
            info = {"hp": hp, "margin": mg}
        r = score(S[te], pick, best, bench[te])
        r.update(info, best_single_model=models[best], fit_seconds=round(time.perf_counter() - t0, 1))
        res[method] = r
    return res, qp


def cost_curve(qp: QualityPredictor, X, S, models, te, strong: str, weak: str, steps: int = 21) -> dict:
    js, jw = models.index(strong), models.index(weak)
    Q = qp.predict_many(X[te], [strong, weak])
    order = np.argsort(-(Q[:, 0] - Q[:, 1]), kind="stable")  # most-needs-the-strong-one first
    St = S[te]
    q_s, q_w = float(St[:, js].mean()), float(St[:, jw].mean())
    pts = []
    for share in np.linspace(0, 1, steps):
        use_strong = np.zeros(len(te), bool)
        use_strong[order[: int(round(share * len(te)))]] = True
        q = float(np.where(use_strong, St[:, js], St[:, jw]).mean())
        pts.append({"strong_share": round(float(share), 3), "quality": round(q, 4),
                    "random_mix": round(q_w + share * (q_s - q_w), 4)})
    pgr = [(p["quality"] - q_w) / (q_s - q_w) if q_s != q_w else 0.0 for p in pts]
    return {"strong": strong, "weak": weak, "quality_strong": q_s, "quality_weak": q_w,
            "apgr": float(np.trapezoid(pgr, dx=1 / (steps - 1))), "apgr_random": 0.5, "points": pts}


def summarise(runs: list[dict]) -> dict:
    keys = ("routed", "best_single", "oracle", "gain", "gap_closed", "share_not_best")
    return {k: {"mean": round(float(np.mean([r[k] for r in runs])), 4), "sd": round(float(np.std([r[k] for r in runs])), 4)}
            for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--methods", default="knn,knn-margin,lr,mf,mlp")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # sklearn convergence chatter on the small MLPs
    methods = args.methods.split(",")
    prompts, all_models, S_all, bench = load(DATA)
    enc = get_encoder()
    t0 = time.perf_counter()
    X = embed_cached(enc, prompts)
    embed_s = time.perf_counter() - t0
    G = groups_of(prompts, bench)
    results: dict = {}
    for view, drop in VIEWS.items():
        keep = [j for j, m in enumerate(all_models) if m not in drop]
        models, S = [all_models[j] for j in keep], S_all[:, keep]
        vr: dict = {"models": models, "grouped_half": {m: [] for m in methods}, "leave_one_benchmark_out": {},
                    "cost_curves": []}
        for seed in range(args.repeats):
            tr, te = grouped_half(bench, G, seed)
            res, qp = run_methods(methods, X, S, G, models, bench, tr, te, enc.id)
            for m, r in res.items():
                vr["grouped_half"][m].append({"seed": seed, **r})
            line = "  ".join(f"{m} {r['routed']:.3f} ({r['gain']:+.3f}, away {r['share_not_best']:.2f})" for m, r in res.items())
            print(f"[{view}] seed {seed}: best single {next(iter(res.values()))['best_single']:.3f} "
                  f"oracle {next(iter(res.values()))['oracle']:.3f} | {line}", flush=True)
            if seed == 0 and qp is not None:
                for strong, weak in COST_PAIRS[view]:
                    vr["cost_curves"].append(cost_curve(qp, X, S, models, te, strong, weak))
        vr["summary_grouped_half"] = {m: summarise(v) for m, v in vr["grouped_half"].items()}
        for b in sorted(set(bench)):
            tr, te = np.flatnonzero(bench != b), np.flatnonzero(bench == b)
            res, _ = run_methods(methods, X, S, G, models, bench, tr, te, enc.id)
            vr["leave_one_benchmark_out"][b] = res
            print(f"[{view}] held-out {b}: " + "  ".join(f"{m} {r['gain']:+.3f} (away {r['share_not_best']:.2f})"
                                                         for m, r in res.items()), flush=True)
        results[view] = vr
    doc = {"command": "python bench/router_quality.py " + " ".join(sys.argv[1:]), "data": str(DATA),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "encoder": enc.id,
           "n_prompts": len(prompts), "embed_seconds": round(embed_s, 1), "results": results}
    out = ROOT / "bench" / "results" / "router_quality.json"
    out.write_text(json.dumps(doc, indent=1))
    for view, vr in results.items():
        for m, s in vr["summary_grouped_half"].items():
            print(f"[{view}] {m:10s} routed {s['routed']['mean']:.3f} ± {s['routed']['sd']:.3f}  best single "
                  f"{s['best_single']['mean']:.3f}  gain {s['gain']['mean']:+.4f} ± {s['gain']['sd']:.4f}  "
                  f"gap closed {s['gap_closed']['mean']:.2f}  away {s['share_not_best']['mean']:.2f}")
        for c in vr["cost_curves"]:
            print(f"[{view}] cost curve {c['strong']} vs {c['weak']}: APGR {c['apgr']:.3f} (random 0.5)")
    print("wrote", out)


if __name__ == "__main__":
    main()
