"""``coe router train/explain/eval`` through typer's CliRunner, and bad data files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from routers.cli import app
from routers.data import read_eval_records, read_labeled
from routers.errors import DataError

runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, small_data):
    p = tmp_path_factory.mktemp("d") / "train.jsonl"
    p.write_text("".join(json.dumps({"prompt": r.prompt, "category": r.category}) + "\n" for r in small_data[::2]))
    return p


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, small_router):
    return small_router.save(tmp_path_factory.mktemp("r") / "router")


def test_bad_data_files_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "category": "coding"}\n\n{"prompt": "b", "category": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        read_labeled(p)
    p.write_text('{"prompt": "a", "category": "coding"}\n{"prompt": "b", "category": "cooking"}\n')
    with pytest.raises(DataError, match=r":2: unknown category 'cooking'"):
        read_labeled(p, labels=["coding", "math"])
    p.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r":1: field 'category'"):
        read_labeled(p)
    p.write_text('{"prompt": "a", "expert": "x", "score": 1.5}\n')
    with pytest.raises(DataError, match=r":1: field 'score'"):
        read_eval_records(p)


def test_cli_train_then_eval(data_file, tmp_path):
    out = tmp_path / "mine"
    r = runner.invoke(app, ["train", "--data", str(data_file), "--out", str(out), "--holdout", "0"])
    assert r.exit_code == 0, r.output
    assert (out / "router.json").exists() and (out / "classifier.npz").exists()
    r = runner.invoke(app, ["eval", "--data", str(data_file), "--router", str(out), "--json", "--latency-n", "10"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    for key in ("accuracy", "macro_f1", "per_category_recall", "confusion", "p50_ms", "p99_ms", "batch_qps"):
        assert key in res
    assert res["accuracy"] > 0.8  # its own training data
    assert len(res["confusion"]["matrix"]) == len(res["confusion"]["labels"])


def test_cli_eval_rejects_unknown_category_and_malformed_line(trained_dir, tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"prompt": "a", "category": "coding"}\n{"prompt": "b", "category": "astrology"}\n')
    r = runner.invoke(app, ["eval", "--data", str(p), "--router", str(trained_dir), "--json"])
    assert r.exit_code == 2 and "e.jsonl:2" in r.output and "astrology" in r.output
    p.write_text('{"prompt": "a", "category": "coding"}\nnot json\n')
    r = runner.invoke(app, ["train", "--data", str(p), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "e.jsonl:2" in r.output


def test_cli_explain_stage1_only_and_with_experts(trained_dir, tmp_path):
    r = runner.invoke(app, ["explain", "Write a bash script that renames all .txt files", "--router", str(trained_dir)])
    assert r.exit_code == 0, r.output
    assert "coding" in r.output and "stage 1 only" in r.output
    y = tmp_path / "experts.yaml"
    y.write_text(
        "experts:\n"
        "  - {name: coder, model: /m/coder, capabilities: {coding: 0.9}}\n"
        "  - {name: chat, model: /m/chat, capabilities: {general: 0.6}}\n"
        "category_map: {coding: [coder], general: [chat]}\n")
    r = runner.invoke(app, ["explain", "Write a bash script that renames all .txt files", "--router",
                            str(trained_dir), "--experts", str(y), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["decision"]["expert"] == "coder" and doc["decision"]["candidates"][0]["expert"] == "coder"
    r = runner.invoke(app, ["explain", "hi", "--router", str(trained_dir), "--experts", str(y), "--model", "coe/nope"])
    assert r.exit_code == 2 and "coe/coding" in r.output
