"""Router stage-1 latency, throughput and accuracy: torch baseline, the previous int8 graph, the
shipped fused int8 graph.

Measures, in one run and on the same ~150-token prompts:
* single-query latency (p50/p99) of stage 1 (encoder + classifier), one prompt at a time, the ONNX
  variants *interleaved* prompt by prompt so that they see the same background load;
* batch throughput (queries/s) over all prompts, for a few batch sizes;
* held-out accuracy (stratified 20% of the seed set, seed 0) with each variant's features, and,
  if ``bench/data/router_check.jsonl`` exists, accuracy on that independent check set (router
  trained on the whole seed set), so that speed is never paid for in accuracy.

Variants:
* ``baseline_torch``: ``SentenceTransformer.encode``, torch fp32, final embedding (what one writes first);
* ``prev_int8_256``: the previous router graph: SDPA export, unfused, dynamic int8, 256-token budget;
* ``fused_int8_256``: eager-attention export, fused by onnxruntime.transformers, then int8; 256 tokens;
* ``fused_int8_128``: the same with a 128-token head+tail budget;
* ``shipped``: ``Router.default()`` = fused int8 + 96-token head+tail budget, 2 threads;
* ``shipped_1_thread``: the same with one onnxruntime thread.
All ONNX sessions run with spinning off (``COE_ROUTER_SPIN`` unset), so interleaved sessions do not
steal each other's cores.

Writes bench/results/router_latency.json (command, machine, date, load averages) and prints a
short table last.

    python bench/router_latency.py [--n 200] [--no-accuracy] [--no-baseline]
"""

from __future__ import annotations

import argparse
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

from routers.data import read_seed  # noqa: E402
from routers.encoder import Encoder, default_model_path  # noqa: E402
from routers.router import Router  # noqa: E402

CHECK = ROOT / "bench" / "data" / "router_check.jsonl"


class PrevEncoder(Encoder):
    """The previous graph (export v2): SDPA attention, all layers traced, no fusion before int8."""

    def _onnx_dir(self) -> Path:
        d = super()._onnx_dir()
        return d.with_name(d.name + "-prev-unfused")

    def _optimize(self, fp32: Path, out: Path) -> bool:
        return False

    def _export_module(self):
        return self._features_module()


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


def _stats(lat: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(np.mean(lat))}


def timed_interleaved(fns: dict, prompts: list[str], warm: int = 10) -> dict:
    """Single-query latency of several variants, prompt by prompt in turn (same background load)."""
    for p in prompts[:warm]:
        for fn in fns.values():
            fn(p)
    lat: dict[str, list[float]] = {k: [] for k in fns}
    for p in prompts:
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(p)
            lat[k].append((time.perf_counter() - t) * 1e3)
    return {k: _stats(v) for k, v in lat.items()}


def batch_qps(fn, prompts: list[str], batch_size: int) -> float:
    fn(prompts[:batch_size], batch_size)  # warm
    t = time.perf_counter()
    fn(prompts, batch_size)
    return len(prompts) / (time.perf_counter() - t)


def read_check() -> list[tuple[str, str]]:
    if not CHECK.exists():
        return []
    rows = [json.loads(l) for l in CHECK.read_text().splitlines() if l.strip()]
    return [(r["prompt"], r["category"]) for r in rows]


def accuracy(enc: Encoder, check: list[tuple[str, str]]) -> dict:
    """Held-out accuracy (stratified 20%, seed 0) and, if given, check-set accuracy (trained on all)."""
    from sklearn.model_selection import train_test_split

    seed = read_seed()
    y = [r.category for r in seed]
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    X = enc.encode([r.prompt for r in seed])
    r = Router.train([seed[i] for i in tr], enc, holdout=0.0)
    pred = [r.categories[i] for i in r.classifier.predict_proba(X[te]).argmax(1)]
    out = {"holdout_accuracy": float(np.mean([p == y[i] for p, i in zip(pred, te)])), "n_test": len(te),
           "n_seed": len(seed)}
    if check:
        full = Router.train(seed, enc, holdout=0.0)
        known = [(p, c) for p, c in check if c in full.categories]
        pc = full.classify_batch([p for p, _ in known]).argmax(1)
        out["check_accuracy"] = float(np.mean([full.categories[i] == c for i, (_, c) in zip(pc, known)]))
        out["n_check"] = len(known)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="single queries timed per variant")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the slow torch baseline")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "router_latency.json"))
    args = ap.parse_args()
    os.environ.pop("COE_ROUTER_SPIN", None)
    load_before = os.getloadavg()

    router = Router.default()  # shipped: fused int8 ONNX, layers 1-4, 96-token budget, + classifier
    enc = router.encoder
    clf = router.classifier
    prev = PrevEncoder(backend="onnx-int8", max_tokens=256)
    fused256 = Encoder(backend="onnx-int8", max_tokens=256)
    fused128 = Encoder(backend="onnx-int8", max_tokens=128)
    one = Encoder(backend="onnx-int8", threads=1)
    prompts = prompts_of_tokens(enc, args.n)
    tok_counts = [enc.count_tokens(p) for p in prompts]

    variants = {
        "prev_int8_256": (prev, "previous graph: SDPA export, unfused, dynamic int8, 256-token budget"),
        "fused_int8_256": (fused256, "eager export, fused (Attention/SkipLayerNorm/BiasGelu/EmbedLayerNorm) then int8, 256 tokens"),
        "fused_int8_128": (fused128, "fused then int8, 128-token head+tail budget"),
        "shipped": (enc, f"Router.default(): fused int8, {enc.id}, {enc.threads} ORT threads"),
        "shipped_1_thread": (one, "as shipped, 1 ORT thread"),
    }
    results: dict = {}
    if not args.no_baseline:
        from sentence_transformers import SentenceTransformer
        import torch

        st = SentenceTransformer(str(default_model_path()), device="cpu")
        base = timed_interleaved({"b": lambda p: st.encode([p])}, prompts[: max(50, args.n // 2)])["b"]
        base["batch_qps"] = {32: batch_qps(lambda ps, bs: st.encode(ps, batch_size=bs), prompts, 32)}
        base["what"] = f"SentenceTransformer.encode, torch fp32, final embedding, torch threads={torch.get_num_threads()}"
        base["load_avg_1m"] = os.getloadavg()[0]
        results["baseline_torch"] = base

    load_single = os.getloadavg()[0]
    single = timed_interleaved(
        {k: (lambda p, e=e: clf.predict_proba(e.encode([p]))) for k, (e, _) in variants.items()}, prompts)
    load_single_after = os.getloadavg()[0]
    for k, (e, what) in variants.items():
        r = single[k]
        r["what"] = what
        r["load_avg_1m"] = [load_single, load_single_after]
        sizes = (8, 16, 32) if k == "shipped" else (16,)
        r["batch_qps"] = {bs: batch_qps(lambda ps, b, e=e: clf.predict_proba(e.encode(ps, batch_size=b)), prompts, bs)
                          for bs in sizes}
        results[k] = r
    load_after = os.getloadavg()

    doc = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_avg_before": load_before, "load_avg_after": load_after,
        "prompt_tokens": {"min": min(tok_counts), "max": max(tok_counts), "mean": float(np.mean(tok_counts))},
        "n_single": len(prompts),
        "results": results,
        "targets": {"p50_ms": 10, "p99_ms": 25, "batch_qps": 200, "holdout_accuracy": 0.90},
    }
    if not args.no_accuracy:
        check = read_check()
        doc["accuracy"] = {
            "prev_int8_256": accuracy(prev, check),
            "fused_int8_128": accuracy(fused128, check),
            "shipped_fused_int8_96": accuracy(enc, check),
            "torch_fp32_96": accuracy(Encoder(backend="torch"), check),
        }
        doc["accuracy_note"] = ("check set: bench/data/router_check.jsonl, independent of the seed set, "
                                "router trained on the whole seed set; not used for tuning")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")

    print(f"\nrouter stage 1, {doc['prompt_tokens']['mean']:.0f}-token prompts, {machine()['cores']} cores, "
          f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f}  ({args.out})")
    print(f"{'variant':18s} {'p50 ms':>7s} {'p99 ms':>7s}  batch q/s (batch size)")
    for k, r in results.items():
        qps = "  ".join(f"{v:.0f} ({b})" for b, v in r["batch_qps"].items())
        print(f"{k:18s} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}  {qps}")
    for k, a in doc.get("accuracy", {}).items():
        extra = f"  check {a['check_accuracy']:.3f} (n={a['n_check']})" if "check_accuracy" in a else ""
        print(f"accuracy {k:24s} held-out {a['holdout_accuracy']:.3f} (n={a['n_test']}){extra}")


if __name__ == "__main__":
    main()
