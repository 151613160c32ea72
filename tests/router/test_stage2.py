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


# -- behaviour of the routing rule on constructed records (real encoder, written prompts) -----------
_LANGS = ["Python", "Rust", "Go", "Java", "C++", "TypeScript"]
_CODE_TASKS = ["a function that merges two sorted lists", "a parser for a simple CSV line",
               "a class for a thread-safe counter", "a binary search over a sorted array",
               "unit tests for a date formatting helper", "a function that removes duplicate emails",
               "an LRU cache with a fixed capacity", "a retry wrapper with exponential backoff",
               "a function that validates an IPv4 address", "a breadth-first search on a grid"]
_POEM_FORMS = ["a sonnet", "a haiku", "a limerick", "a free-verse poem", "a ballad", "a short elegy"]
_POEM_SUBJECTS = ["the sea at night", "autumn leaves", "a grandmother's kitchen", "the first snow",
                  "a lighthouse keeper", "lost love", "a city waking up", "an old dog asleep",
                  "the moon over the desert", "a train leaving the station"]


def _topic_prompts() -> tuple[list[str], list[str]]:
    code = [f"Write {t} in {lang}." for lang in _LANGS for t in _CODE_TASKS]
    poems = [f"Write {f} about {s}." for f in _POEM_FORMS for s in _POEM_SUBJECTS]
    return code, poems


def _split(xs: list[str], seed: int) -> tuple[list[str], list[str]]:
    idx = np.random.default_rng(seed).permutation(len(xs))
    return [xs[i] for i in idx[: len(xs) // 2]], [xs[i] for i in idx[len(xs) // 2:]]


def _recs(prompts: list[str], probs: dict[str, float], rng) -> list[EvalRecord]:
    return [EvalRecord(p, e, float(rng.random() < q)) for p in prompts for e, q in probs.items()]


def test_routing_beats_either_expert_when_each_is_strong_on_its_own_topic(encoder):
    """Expert ``coder`` is right on code 90% of the time and on poems 30%; ``poet`` the reverse,
    and ``generalist`` 60% everywhere (the best single expert). Trained on half the prompts,
    routing on the other half beats always-the-best and each specialist alone."""
    rng = np.random.default_rng(0)
    code, poems = _topic_prompts()
    code_tr, code_te = _split(code, 1)
    poem_tr, poem_te = _split(poems, 2)
    probs_code = {"coder": 0.9, "poet": 0.3, "generalist": 0.6}
    probs_poem = {"coder": 0.3, "poet": 0.9, "generalist": 0.6}
    train = _recs(code_tr, probs_code, rng) + _recs(poem_tr, probs_poem, rng)
    qp = QualityPredictor.from_records(train, encoder.encode)
    cv = qp.fit_info["route_cv"]  # cross-validation found the topic signal worth acting on, beyond its noise
    assert cv["accepted"] and cv["gain"] > cv["se"] > 0 and qp.z < 3.0
    test = [(p, probs_code) for p in code_te] + [(p, probs_poem) for p in poem_te]
    X = encoder.encode([p for p, _ in test])
    picks = qp.choose_many(X, ["coder", "poet", "generalist"])
    # expected quality (the probabilities themselves: no sampling noise in the verdict)
    routed = np.mean([probs[e] for (_, probs), e in zip(test, picks)])
    alone = {e: np.mean([probs[e] for _, probs in test]) for e in ("coder", "poet", "generalist")}
    assert routed >= max(alone.values()) + 0.2, (routed, alone)
    assert all(e == "coder" for (p, _), e in zip(test, picks) if p in code_te[:10])


def test_no_signal_keeps_the_best_single_expert(encoder):
    """Scores independent of the prompt (``a`` right 75%, ``b`` 55%, ``c`` 50%): routing must stay
    with ``a`` instead of chasing noise among neighbours."""
    rng = np.random.default_rng(3)
    code, poems = _topic_prompts()
    prompts = code + poems
    train, test = _split(prompts, 4)
    qp = QualityPredictor.from_records(_recs(train, {"a": 0.75, "b": 0.55, "c": 0.5}, rng), encoder.encode)
    assert qp.best_expert() == "a"
    picks = qp.choose_many(encoder.encode(test), ["a", "b", "c"])
    assert np.mean([e == "a" for e in picks]) >= 0.95, qp.fit_info.get("route_cv")


def test_unseen_domain_falls_back_to_the_best_single_expert(encoder):
    """Records about code and poems say nothing about cooking: there the predictor has no close
    neighbours, its estimates shrink to each expert's mean with wide error bars, and routing keeps
    the best-on-average expert even though a specialist exists elsewhere."""
    rng = np.random.default_rng(5)
    code, poems = _topic_prompts()
    train = _recs(code, {"coder": 0.95, "poet": 0.2, "generalist": 0.62}, rng) + \
        _recs(poems, {"coder": 0.2, "poet": 0.95, "generalist": 0.62}, rng)
    qp = QualityPredictor.from_records(train, encoder.encode)
    cooking = ["How long should I rest a roast chicken before carving it?",
               "What can I use instead of buttermilk in pancakes?",
               "Give me a weeknight dinner with lentils and spinach.",
               "Why did my bread come out dense and flat?"]
    best = qp.best_expert()
    picks = qp.choose_many(encoder.encode(cooking), ["coder", "poet", "generalist"])
    assert picks == [best] * len(cooking), (best, picks)


def test_added_records_change_routing_of_the_returned_predictor(encoder, tmp_path):
    """The public ``add`` (what ``coe router quality add`` and the service's feedback use) returns
    a predictor that uses the new records at once, without retuning: after records saying ``poet``
    fails on poems, poems go elsewhere; the original object is unchanged."""
    rng = np.random.default_rng(7)
    code, poems = _topic_prompts()
    base = _recs(code, {"coder": 0.9, "poet": 0.3}, rng) + _recs(poems, {"coder": 0.3, "poet": 0.9}, rng)
    qp = QualityPredictor.from_records(base, encoder.encode)
    q = encoder.encode(["Write a sonnet about a rainy harbour town."])
    assert qp.choose_many(q, ["coder", "poet"]) == ["poet"]
    bad = [EvalRecord(p, "poet", 0.0) for p in poems] * 3 + [EvalRecord(p, "coder", 1.0) for p in poems] * 3
    newer = qp.add(bad, encoder.encode)
    assert newer.choose_many(q, ["coder", "poet"]) == ["coder"]
    assert qp.choose_many(q, ["coder", "poet"]) == ["poet"] and (newer.k, newer.z) == (qp.k, qp.z)
    # the tuned rule (z, radius) survives save/load: JSON + npz, no pickle
    newer.save(tmp_path)
    back = QualityPredictor.load(tmp_path)
    assert (back.z, back.radius, back.k) == (newer.z, newer.radius, newer.k) and back.radius > 0
    assert back.choose_many(q, ["coder", "poet"]) == ["coder"]

