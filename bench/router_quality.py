"""Stage 2 on real judgments: does per-prompt quality routing beat always-the-best-expert?

Data: ``../shared/data/eval-records/zeroeval.jsonl`` (read in place, never copied): 1,911 prompts
× 8 models, 0/1 correctness, benchmarks crux / math-l5 / numersense-v2 (see its README).

Splits (the README's advice; nothing is tuned on the test half):
* ``grouped_half``: within each benchmark, half of the prompt groups train and half test; a group is
  one prompt, except numersense-v2, whose 64 paraphrases of one number pair form one group (a random
  split would put near-copies on both sides). Repeated over ``--repeats`` seeds, mean ± sd.
* ``leave_one_benchmark_out``: train on two benchmarks, test on the third.

Policies scored on the test prompts by the *recorded* score of the chosen model:
* ``best_single``: the model with the best mean on the training half, always;
* ``knn``: argmax of :class:`routers.quality.QualityPredictor` (calibrated k-NN, k/tau/m chosen by
  leave-one-prompt-out Brier on the training half); ties and near-ties go to the best single model;
* ``oracle``: the best recorded score per prompt.
Quality vs cost (RouteLLM's curve): two models, strong and weak; route to strong when
``q_strong - q_weak > t``; sweeping t traces quality against the share of calls to the strong one,
compared with random mixing at the same share.

    flock /tmp/coe-heavy.lock timeout 900 python bench/router_quality.py
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


def route_eval(qp: QualityPredictor, X: np.ndarray, S: np.ndarray, models: list[str], tr, te, margin: float | None = None):
    """Mean recorded score of best-single, k-NN routing and oracle on the test rows; ``margin``
    defaults to the one the predictor chose on its own training records."""
    margin = qp.margin if margin is None else margin
    best = int(np.nanargmax(np.nanmean(S[tr], axis=0)))
    Q = qp.predict_many(X[te], models)
    pick = Q.argmax(1)
    # keep the best single model unless another is predicted better by more than the margin
    keep = Q[np.arange(len(te)), pick] - Q[:, best] <= margin
    pick[keep] = best
    St = S[te]
    pick0 = Q.argmax(1)
    return {"best_single": float(St[:, best].mean()), "best_single_model": models[best],
            "routed": float(St[np.arange(len(te)), pick].mean()), "margin": margin,
            "routed_argmax_no_margin": float(St[np.arange(len(te)), pick0].mean()), "oracle": float(St.max(1).mean()),
            "share_not_best": float((pick != best).mean()), "n_test": int(len(te)),
            "k": qp.k, "tau": qp.tau, "prior_weight": qp.prior_weight,
            "brier_loo": qp.fit_info.get("brier"), "brier_mean_only": qp.fit_info.get("brier_expert_mean_only")}


def cost_curve(qp, X, S, models, tr, te, strong: str, weak: str, steps: int = 21):
    js, jw = models.index(strong), models.index(weak)
    Q = qp.predict_many(X[te], [strong, weak])
    gap = Q[:, 0] - Q[:, 1]
    St = S[te]
    q_s, q_w = float(St[:, js].mean()), float(St[:, jw].mean())
    pts = []
    for share in np.linspace(0, 1, steps):
        n = int(round(share * len(te)))
        order = np.argsort(-gap, kind="stable")  # most-needed-strong first
        use_strong = np.zeros(len(te), bool)
        use_strong[order[:n]] = True
        q = float(np.where(use_strong, St[:, js], St[:, jw]).mean())
        pts.append({"strong_share": round(float(share), 3), "quality": round(q, 4),
                    "random_mix": round(q_w + share * (q_s - q_w), 4)})
    # APGR (RouteLLM): area under the performance-gap-recovered curve; 0.5 = random
    pgr = [(p["quality"] - q_w) / (q_s - q_w) if q_s != q_w else 0.0 for p in pts]
    apgr = float(np.trapezoid(pgr, dx=1 / (steps - 1)))
    return {"strong": strong, "weak": weak, "quality_strong": q_s, "quality_weak": q_w, "apgr": apgr,
            "apgr_random": 0.5, "points": pts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    prompts, models, S, bench = load(DATA)
    enc = get_encoder()
    t0 = time.perf_counter()
    X = embed_cached(enc, prompts)
    embed_s = time.perf_counter() - t0
    G = groups_of(prompts, bench)
    res: dict = {"grouped_half": [], "leave_one_benchmark_out": {}, "cost_curves": []}

    def fit(tr):
        rec = [(i, m) for i in tr for m in range(len(models))]
        return QualityPredictor(X[tr], [models[m] for _, m in rec], [S[i, m] for i, m in rec],
                                encoder_id=enc.id,
                                prompt_index=np.repeat(np.arange(len(tr)), len(models))).tuned()

    for rep in range(args.repeats):
        rng = np.random.default_rng(rep)
        tr, te = [], []
        for b in sorted(set(bench)):
            gs = np.unique(G[bench == b])
            rng.shuffle(gs)
            train_g = set(gs[: len(gs) // 2])
            for i in np.flatnonzero(bench == b):
                (tr if G[i] in train_g else te).append(i)
        tr, te = np.array(tr), np.array(te)
        qp = fit(tr)
        r = route_eval(qp, X, S, models, tr, te)
        r["seed"] = rep
        r["per_benchmark"] = {b: route_eval(qp, X, S, models, tr, te[bench[te] == b]) for b in sorted(set(bench))}
        res["grouped_half"].append(r)
        if rep == 0:
            for weak in ("gpt-4o-mini-2024-07-18", "Meta-Llama-3-8B-Instruct"):
                res["cost_curves"].append(cost_curve(qp, X, S, models, tr, te, "gpt-4o-2024-05-13", weak))
        print(f"seed {rep}: best single {r['best_single']:.3f} routed {r['routed']:.3f} oracle {r['oracle']:.3f} "
              f"(k={qp.k} tau={qp.tau} m={qp.prior_weight}, not-best {r['share_not_best']:.2f})", flush=True)
    gh = res["grouped_half"]
    summary = {k: {"mean": float(np.mean([g[k] for g in gh])), "sd": float(np.std([g[k] for g in gh]))}
               for k in ("best_single", "routed", "oracle")}
    summary["gain_over_best_single"] = {"mean": float(np.mean([g["routed"] - g["best_single"] for g in gh])),
                                        "sd": float(np.std([g["routed"] - g["best_single"] for g in gh]))}
    summary["gap_closed"] = float(np.mean([(g["routed"] - g["best_single"]) / (g["oracle"] - g["best_single"])
                                           for g in gh]))
    res["summary_grouped_half"] = summary
    for b in sorted(set(bench)):
        tr, te = np.flatnonzero(bench != b), np.flatnonzero(bench == b)
        res["leave_one_benchmark_out"][b] = route_eval(fit(tr), X, S, models, tr, te)
    doc = {"command": "python bench/router_quality.py " + " ".join(sys.argv[1:]), "data": str(DATA),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": os.cpu_count(), "encoder": enc.id, "n_prompts": len(prompts), "models": models,
           "embed_seconds": round(embed_s, 1), "results": res}
    out = ROOT / "bench" / "results" / "router_quality.json"
    out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(summary, indent=1))
    for b, r in res["leave_one_benchmark_out"].items():
        print(f"held-out benchmark {b}: best single {r['best_single']:.3f} routed {r['routed']:.3f} oracle {r['oracle']:.3f}")
    for c in res["cost_curves"]:
        print(f"cost curve {c['strong']} vs {c['weak']}: APGR {c['apgr']:.3f} (random 0.5)")
    print("wrote", out)


if __name__ == "__main__":
    main()
