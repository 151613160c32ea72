"""Stage 1 on phrasing it was not trained on: a cross-style protocol that cannot flatter the router.

Data (all written for this project): the hand-written seed set (``routers/data/seed``), the
template-generated set (``routers/data/synth``, ``python -m routers.synth``: every task crossed with
every topic, two template "writers" A/B and seven surface "voices"), an independent check set
(``bench/data/router_check.jsonl``, another writer, never trained on) and a hand-written long-form
set (``bench/data/router_crossstyle_hand.jsonl``: formal multi-sentence prompts with pasted
material and task-vs-topic contrasts, never trained on).

Splits reported:
* ``in_style``: stratified 20% of seed + synth, trained on the other 80% (the flattering number);
* ``cross_style``: trained on seed + synth writer A in voices plain/terse/polite/system, tested on
  synth writer B in voices context/nonnative/constraints (other templates *and* other voices);
* ``default_on_unseen_writers``: the shipped default (seed + all synth) on the check set and the
  hand-written set, plus the seed-only router on them for comparison.
For each: accuracy, macro-F1, ECE, share of confidently-wrong (p >= 0.9), per-category recall.

    flock /tmp/coe-heavy.lock timeout 900 python bench/router_crossstyle.py
Writes bench/results/router_crossstyle.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routers.calibration import calibration_report  # noqa: E402
from routers.classifier import CategoryClassifier  # noqa: E402
from routers.data import read_labeled, read_seed, read_synth  # noqa: E402
from routers.encoder import get_encoder  # noqa: E402
from routers.router import DEFAULT_C, DEFAULT_CATEGORIES, _metrics  # noqa: E402

CHECK = ROOT / "bench" / "data" / "router_check.jsonl"
HAND = ROOT / "bench" / "data" / "router_crossstyle_hand.jsonl"
CACHE = Path(os.environ.get("COE_BENCH_EMB_CACHE", "/tmp/coe-router-emb-cache.npz"))


def embed_cached(enc, texts: list[str]) -> np.ndarray:
    """Embeddings with an on-disk cache keyed by encoder id + text (benchmark reruns are cheap)."""
    keys = [hashlib.sha1(f"{enc.id}|{t}".encode()).hexdigest() for t in texts]
    cache: dict[str, np.ndarray] = {}
    if CACHE.exists():
        z = np.load(CACHE)
        cache = dict(zip(z["keys"].tolist(), z["X"]))
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        X = enc.encode([texts[i] for i in missing])
        for i, x in zip(missing, X):
            cache[keys[i]] = x
        ks = sorted(cache)
        np.savez(CACHE, keys=np.array(ks), X=np.stack([cache[k] for k in ks]))
    return np.stack([cache[k] for k in keys])


def evaluate(clf: CategoryClassifier, X: np.ndarray, y: list[str]) -> dict:
    P = clf.predict_proba(X)
    pred = [clf.labels[i] for i in P.argmax(1)]
    m = _metrics(y, pred, clf.labels)
    m.pop("confusion")
    cal = calibration_report(P, [clf.labels.index(c) for c in y])
    m.update({k: cal[k] for k in ("ece", "confidently_wrong", "mean_confidence")})
    m["errors"] = [{"true": t, "pred": p, "p": round(float(P[i].max()), 3)}
                   for i, (t, p) in enumerate(zip(y, pred)) if t != p][:40]
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", type=float, default=DEFAULT_C)
    ap.add_argument("--no-grouped", dest="grouped", action="store_false",
                    help="fit the temperature on plain (not template-grouped) out-of-fold logits")
    args = ap.parse_args()
    enc = get_encoder()
    seed = read_seed()
    synth = read_synth()
    check = read_labeled(CHECK)
    hand = read_labeled(HAND)
    t0 = time.perf_counter()
    Xs = embed_cached(enc, [r.prompt for r in seed])
    Xy = embed_cached(enc, [r.prompt for r in synth])
    Xc = embed_cached(enc, [r.prompt for r in check])
    Xh = embed_cached(enc, [r.prompt for r in hand])
    embed_s = time.perf_counter() - t0
    ys, yy = [r.category for r in seed], [r.category for r in synth]
    yc, yh = [r.category for r in check], [r.category for r in hand]
    labels = DEFAULT_CATEGORIES
    gs = [f"seed:{i}" for i in range(len(seed))]
    gy = [r.family for r in synth]

    def fit(X, y, g):
        return CategoryClassifier.fit(X, y, labels, C=args.C, seed=0, groups=g if args.grouped else None)
    res: dict = {}

    # in-style: random stratified 80/20 over seed + synth
    from sklearn.model_selection import train_test_split

    Xa, ya, ga = np.vstack([Xs, Xy]), ys + yy, gs + gy
    tr, te = train_test_split(np.arange(len(ya)), test_size=0.2, stratify=ya, random_state=0)
    clf = fit(Xa[tr], [ya[i] for i in tr], [ga[i] for i in tr])
    res["in_style"] = evaluate(clf, Xa[te], [ya[i] for i in te])

    # cross-style: writer A + voices set 1 -> writer B + voices set 2
    train_voices, test_voices = {"plain", "terse", "polite", "system"}, {"context", "nonnative", "constraints"}
    a = [i for i, r in enumerate(synth) if r.writer == "A" and r.voice in train_voices]
    b = [i for i, r in enumerate(synth) if r.writer == "B" and r.voice in test_voices]
    clf = fit(np.vstack([Xs, Xy[a]]), ys + [yy[i] for i in a], gs + [gy[i] for i in a])
    res["cross_style"] = {"train": f"seed + synth writer A, voices {sorted(train_voices)} ({len(seed) + len(a)})",
                          "test": f"synth writer B, voices {sorted(test_voices)} ({len(b)})",
                          **evaluate(clf, Xy[b], [yy[i] for i in b])}
    res["cross_style_model_on_hand"] = evaluate(clf, Xh, yh)
    res["cross_style_model_on_check"] = evaluate(clf, Xc, yc)

    # the default (seed + all synth) and the old seed-only router on the two unseen writers
    for name, (X, y, g) in {"seed_only": (Xs, ys, gs), "default": (Xa, ya, ga)}.items():
        clf = fit(X, y, g)
        res[f"{name}_on_check"] = evaluate(clf, Xc, yc)
        res[f"{name}_on_hand"] = evaluate(clf, Xh, yh)

    doc = {"command": "python bench/router_crossstyle.py " + " ".join(sys.argv[1:]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "encoder": enc.id, "C": args.C, "grouped_temperature": args.grouped,
           "n": {"seed": len(seed), "synth": len(synth), "check": len(check), "hand": len(hand)},
           "embed_seconds": round(embed_s, 1), "results": res}
    out = ROOT / "bench" / "results" / "router_crossstyle.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"{'split':32s} {'n':>5s} {'acc':>6s} {'mF1':>6s} {'ECE':>6s} {'confW':>6s}")
    for k, m in res.items():
        print(f"{k:32s} {m['n']:5d} {m['accuracy']:6.3f} {m['macro_f1']:6.3f} {m['ece']:6.3f} {m['confidently_wrong']:6.3f}")
    print("wrote", out)


if __name__ == "__main__":
    main()
