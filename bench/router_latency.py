"""Router latency and accuracy: plain PyTorch MiniLM (baseline) vs the shipped int8 ONNX encoder.

Measures, in one run and on the same prompts:
* single-query latency (p50/p99) of stage 1 for ~150-token prompts, one at a time;
* batch throughput (queries/s) over all of them;
* held-out accuracy (stratified 20% of the seed set, seed 0) with each backend's features,
  so that the speed-up is not paid for in accuracy.
Writes bench/results/router_latency.json (command, machine, date, load average).

    python bench/router_latency.py [--n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routers.data import read_seed  # noqa: E402
from routers.encoder import Encoder, default_model_path  # noqa: E402
from routers.router import Router  # noqa: E402


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def prompts_of_tokens(enc: Encoder, n: int, tokens: int = 150) -> list[str]:
    """~``tokens``-token prompts built from seed prompts of one category (realistic text)."""
    seed = read_seed()
    by_cat: dict[str, list[str]] = {}
    for r in seed:
        by_cat.setdefault(r.category, []).append(r.prompt)
    cats = sorted(by_cat)
    out = []
    i = 0
    while len(out) < n:
        pool = by_cat[cats[i % len(cats)]]
        text, j = "", i
        while enc.count_tokens(text) < tokens:
            text = (text + "\n" + pool[j % len(pool)]).strip()
            j += 7
        ids = enc._tok.encode(text, add_special_tokens=False).ids[: tokens - 2]
        out.append(enc._tok.decode(ids))
        i += 1
    return out


def timed(fn, prompts, warm=5):
    for p in prompts[:warm]:
        fn(p)
    lat = []
    for p in prompts:
        t = time.perf_counter()
        fn(p)
        lat.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(np.mean(lat))}


def holdout_accuracy(enc: Encoder) -> dict:
    from sklearn.model_selection import train_test_split

    seed = read_seed()
    y = [r.category for r in seed]
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    r = Router.train([seed[i] for i in tr], enc, holdout=0.0)
    pred = [r.categories[i] for i in r.classify_batch([seed[i].prompt for i in te]).argmax(1)]
    acc = float(np.mean([p == y[i] for p, i in zip(pred, te)]))
    return {"holdout_accuracy": acc, "n_test": len(te)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="single queries timed per variant")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "router_latency.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()

    from sentence_transformers import SentenceTransformer

    fast = Encoder(backend="onnx-int8")
    prompts = prompts_of_tokens(fast, args.n)
    tok_counts = [fast.count_tokens(p) for p in prompts]

    # baseline: what one would write first — SentenceTransformer.encode on torch, default threads
    st = SentenceTransformer(str(default_model_path()), device="cpu")
    base = timed(lambda p: st.encode([p]), prompts)
    t = time.perf_counter()
    st.encode(prompts, batch_size=32)
    base["batch_qps"] = len(prompts) / (time.perf_counter() - t)
    base["what"] = "SentenceTransformer.encode, torch fp32, final embedding, torch threads=%d" % __import__("torch").get_num_threads()

    router = Router.default()  # int8 ONNX, layers 1-4, + classifier (the full stage 1)
    res = timed(router.classify, prompts)
    t = time.perf_counter()
    router.classify_batch(prompts, batch_size=32)
    res["batch_qps"] = len(prompts) / (time.perf_counter() - t)
    res["what"] = f"Router.default().classify (stage 1 incl. classifier), backend {router.encoder.backend}, {router.encoder.id}, {fast.threads} ORT threads"

    # same, with one ORT thread: on a 2-core box shared with other work this can have the better tail
    one = Encoder(backend="onnx-int8", threads=1)
    clf = router.classifier
    res1 = timed(lambda p: clf.predict_proba(one.encode([p])), prompts)
    t = time.perf_counter()
    clf.predict_proba(one.encode(prompts, batch_size=32))
    res1["batch_qps"] = len(prompts) / (time.perf_counter() - t)
    res1["what"] = "as optimized, 1 ORT thread"

    fp32 = Encoder(backend="onnx")
    onnx32 = timed(lambda p: fp32.encode([p]), prompts[: max(50, args.n // 4)])
    onnx32["what"] = "encoder only, ONNX fp32, layers 1-4"

    doc = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "prompt_tokens": {"min": min(tok_counts), "max": max(tok_counts), "mean": float(np.mean(tok_counts))},
        "n_single": len(prompts),
        "baseline_torch": base, "optimized": res, "optimized_1_thread": res1, "onnx_fp32_encoder": onnx32,
        "ratios": {"p50_speedup": base["p50_ms"] / res["p50_ms"], "p99_speedup": base["p99_ms"] / res["p99_ms"],
                   "batch_qps_ratio": res["batch_qps"] / base["batch_qps"]},
        "targets": {"p50_ms": 10, "p99_ms": 25, "batch_qps": 200},
    }
    if not args.no_accuracy:
        doc["accuracy"] = {"int8_onnx": holdout_accuracy(fast), "torch_fp32": holdout_accuracy(Encoder(backend="torch"))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("baseline_torch", "optimized", "optimized_1_thread", "onnx_fp32_encoder", "ratios", "load_avg_before", "load_avg_after")}, indent=2))
    if "accuracy" in doc:
        print(json.dumps(doc["accuracy"], indent=2))


if __name__ == "__main__":
    main()
