"""Stage 2: the quality predictor on the real encoder, the JSONL reader, and the stage-2 CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from routers.cli import app
from routers.data import EvalRecord, read_eval_records
from routers.quality import QualityPredictor

ZEROEVAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval-records" / "zeroeval.jsonl"
if not ZEROEVAL.exists():
    ZEROEVAL = Path("/work/shared/data/eval-records/zeroeval.jsonl")


def test_jsonl_reader_keeps_unicode_line_separators_inside_strings(tmp_path):
    f = tmp_path / "r.jsonl"
    lines = [{"prompt": "first\u2028still the first prompt", "expert": "a", "score": 1.0},
             {"prompt": "second\x85prompt\u2029end", "expert": "b", "score": 0.5}]
    f.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    recs = read_eval_records(f)
    assert [r.prompt for r in recs] == [x["prompt"] for x in lines]
    assert [r.line for r in recs] == [1, 2]


def _records() -> list[EvalRecord]:
    code = ["Write a Python function that reverses a linked list.", "Implement quicksort in Go.",
            "Fix the bug in this JavaScript loop that never ends.", "Write a SQL query for the top 5 customers."]
    poems = ["Write a poem about the sea at night.", "Compose a sonnet about lost love.",
             "Write a haiku about autumn rain.", "A limerick about a cat who loves cheese, please."]
    recs = []
    for p in code:
        recs += [EvalRecord(p, "coder", 0.9), EvalRecord(p, "poet", 0.2)]
    for p in poems:
        recs += [EvalRecord(p, "coder", 0.3), EvalRecord(p, "poet", 0.95)]
    return recs


def test_predictor_uses_true_cosine_and_embeds_each_prompt_once(encoder):
    recs = _records()
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        return encoder.encode(texts)

    qp = QualityPredictor.from_records(recs, encode, tune=False, k=3, tau=0.1, prior_weight=1.0)
    assert calls == [list(dict.fromkeys(r.prompt for r in recs))]  # 8 prompts embedded once, not 16
    assert np.allclose(np.linalg.norm(qp.embeddings, axis=1), 1.0, atol=1e-4)  # 4 blocks -> unit norm
    q = encoder.encode(["Implement a binary search tree in Rust with insert and delete."])[0]
    got = qp.predict(q, ["coder", "poet", "nobody"])
    assert got["coder"] > got["poet"] and got["nobody"] is None
    p = qp.predict(encoder.encode(["Write a short poem about mountains in winter."])[0], ["coder", "poet"])
    assert p["poet"] > p["coder"]
    # predictions stay between the neighbours' scores and the prior: never outside [0, 1]
    assert all(0.0 <= v <= 1.0 for v in list(got.values())[:2])


def test_predictor_roundtrip_and_add_without_retraining_stage1(encoder, tmp_path, small_router):
    router = small_router.with_quality(_records()[:8], retune=False)
    router = router.with_quality(_records()[8:], retune=False)
    assert router.quality.n_prompts == 8 and len(router.quality.experts) == 16
    d = router.save(tmp_path / "r")
    assert not list(d.glob("*.pkl")) and (d / "quality.npz").exists()
    from routers.router import Router

    loaded = Router.load(d)
    q = encoder.encode(["Write a Rust function that parses a CSV line."])[0]
    assert loaded.quality.predict(q, ["coder", "poet"]) == router.quality.predict(q, ["coder", "poet"])
    assert np.array_equal(loaded.classifier.coef, small_router.classifier.coef)  # stage 1 untouched


@pytest.mark.skipif(not ZEROEVAL.exists(), reason="shared eval records not present")
def test_real_judgments_routing_never_loses_much_to_the_best_single_model(encoder):
    """On public judgments of 8 models, 150 prompts per benchmark (numersense grouped by number
    pair), trained on one half: routing is at least as good as always-the-best model, within noise."""
    import re

    rows = [json.loads(x) for x in ZEROEVAL.read_text().split("\n") if x.strip()]
    by_bench: dict[str, list[str]] = {}
    for r in rows:
        ps = by_bench.setdefault(r["benchmark"], [])
        if r["prompt"] not in ps:
            ps.append(r["prompt"])
    rng = np.random.default_rng(0)
    train, test = set(), set()
    for b, ps in by_bench.items():
        key = (lambda p: ",".join(sorted(re.findall(r"\d+\.\d+", p)))) if b == "numersense-v2" else (lambda p: p)
        groups = sorted({key(p) for p in ps})
        rng.shuffle(groups)
        half = set(groups[: len(groups) // 2])
        pick = [ps[i] for i in rng.permutation(len(ps))[:150]]
        for p in pick:
            (train if key(p) in half else test).add(p)
    tr = [EvalRecord(r["prompt"], r["expert"], r["score"]) for r in rows if r["prompt"] in train]
    qp = QualityPredictor.from_records(tr, encoder.encode)
    assert qp.fit_info["brier"] <= qp.fit_info["brier_expert_mean_only"]  # beats the per-expert mean
    scores: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["prompt"] in test:
            scores.setdefault(r["prompt"], {})[r["expert"]] = r["score"]
    prompts = list(scores)
    X = encoder.encode(prompts)
    best = qp.best_expert()
    routed = np.mean([scores[p][qp.choose(x, list(scores[p]))] for p, x in zip(prompts, X)])
    single = np.mean([scores[p][best] for p in prompts])
    assert routed >= single - 0.02, (routed, single)


def test_cli_quality_add_then_eval_quality(tmp_path, small_router):
    recs = _records()
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"prompt": r.prompt, "expert": r.expert, "score": r.score}) + "\n" for r in recs))
    d = small_router.save(tmp_path / "router")
    runner = CliRunner()
    res = runner.invoke(app, ["quality", "add", str(f), "--router", str(d), "--no-retune"])
    assert res.exit_code == 0, res.output
    assert "added 16 records" in res.output
    res = runner.invoke(app, ["eval", "--quality", str(f), "--router", str(d), "--json"])
    assert res.exit_code == 0, res.output
    s2 = json.loads(res.output)["stage2"]
    assert s2["n_prompts"] == 8 and s2["oracle"] >= s2["routed"] >= s2["best_single"] - 1e-9
    # without a quality predictor: one line, exit 2
    bare = small_router.save(tmp_path / "bare")
    res = runner.invoke(app, ["eval", "--quality", str(f), "--router", str(bare)])
    assert res.exit_code == 2 and "no quality predictor" in res.output
