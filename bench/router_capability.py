"""Does per-query capability scoring beat always sending everything to the single best expert?

Synthetic but honest evaluation records over the seed set (nothing here is tuned on the test half):
* expert ``coder-math``  : mean 0.85 on coding + math prompts, 0.45 elsewhere
* expert ``wordsmith``   : mean 0.85 on writing + roleplay prompts, 0.45 elsewhere
* expert ``generalist``  : mean 0.62 everywhere
each score = mean + N(0, 0.12) noise, clipped to [0, 1] (fixed seed). The seed set is split 50/50
(stratified); the quality predictor is trained on records of the first half only, and routing is
scored on the second half by the *recorded* score of the expert it picks. Compared with: the best
single expert (best mean on the training half), and the oracle (best recorded score per prompt).

Router variants: (a) declared capabilities only (honest, coarse: 0.8 on the strong categories,
0.5 elsewhere, generalist 0.6), (b) learned quality only (all declared equal), (c) both (default
weights). Writes bench/results/router_capability.json.

    python bench/router_capability.py
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from expert_registry.spec import Expert  # noqa: E402
from routers.data import read_seed  # noqa: E402
from routers.quality import QualityPredictor  # noqa: E402
from routers.router import Router  # noqa: E402

CATS = ["coding", "math", "reasoning", "writing", "roleplay", "extraction", "stem", "humanities", "general"]
STRONG = {"coder-math": {"coding", "math"}, "wordsmith": {"writing", "roleplay"}}


def true_mean(expert: str, cat: str) -> float:
    if expert == "generalist":
        return 0.62
    return 0.85 if cat in STRONG[expert] else 0.45


def main() -> None:
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    seed = read_seed()
    y = [r.category for r in seed]
    tr, te = train_test_split(np.arange(len(seed)), test_size=0.5, stratify=y, random_state=0)
    names = ["coder-math", "wordsmith", "generalist"]
    scores = np.clip(np.array([[true_mean(e, r.category) for e in names] for r in seed])
                     + rng.normal(0, 0.12, (len(seed), len(names))), 0, 1)

    router = Router.default()
    X = router.embed([r.prompt for r in seed])
    qp = QualityPredictor(np.repeat(X[tr], len(names), axis=0), names * len(tr), scores[tr].reshape(-1),
                          encoder_id=router.encoder.id)

    declared = {
        "coder-math": {c: (0.8 if c in STRONG["coder-math"] else 0.5) for c in CATS},
        "wordsmith": {c: (0.8 if c in STRONG["wordsmith"] else 0.5) for c in CATS},
        "generalist": {c: 0.6 for c in CATS},
    }
    cmap = {c: list(names) for c in CATS}

    def experts(caps):
        return {n: Expert(name=n, model=f"/m/{n}", capabilities=caps[n]) for n in names}

    variants = {
        "declared_capabilities_only": (Router(router.classifier, router.encoder), experts(declared)),
        "learned_quality_only": (Router(router.classifier, router.encoder, quality=qp),
                                 experts({n: {c: 0.5 for c in CATS} for n in names})),
        "capabilities_plus_quality": (Router(router.classifier, router.encoder, quality=qp), experts(declared)),
    }
    best_single = names[int(scores[tr].mean(0).argmax())]
    res = {
        "best_single_expert": best_single,
        "best_single_expert_score": float(scores[te, names.index(best_single)].mean()),
        "oracle_score": float(scores[te].max(1).mean()),
        "per_expert_test_mean": {n: float(scores[te, i].mean()) for i, n in enumerate(names)},
    }
    for vname, (r, exps) in variants.items():
        picks = []
        for i in te:
            d = r.route(seed[i].prompt, "coe", exps, cmap, _embedding=X[i])
            picks.append(names.index(d.expert))
        picks = np.array(picks)
        res[vname] = {
            "score": float(scores[te, picks].mean()),
            "pick_share": {n: float((picks == k).mean()) for k, n in enumerate(names)},
        }
    for vname in variants:
        v = res[vname]
        gap = res["oracle_score"] - res["best_single_expert_score"]
        v["gain_vs_best_single"] = v["score"] - res["best_single_expert_score"]
        v["share_of_oracle_gap_closed"] = v["gain_vs_best_single"] / gap if gap > 0 else None
    doc = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": {"n_train_prompts": int(len(tr)), "n_test_prompts": int(len(te)), "noise_sd": 0.12,
                  "experts": {n: {c: true_mean(n, c) for c in CATS} for n in names}},
        "results": res,
    }
    out = ROOT / "bench" / "results" / "router_capability.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
