"""Stage 1: task before topic (also through the category map and the policy), calibration tooling,
and the shipped default artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from routers.calibration import calibration_report, ece, propose_threshold
from routers.cli import app
from expert_registry.spec import Expert
from routers.router import DEFAULT_CATEGORIES, Router

# (prompt, expected) pairs that share a topic but differ in task: the task decides (docs/taxonomy.md)
CONTRAST = [
    ("Solve for x: 3x^2 - 12 = 0.", "math"),
    ("Here are the formulas from my notes: F = m*a, p = m*v, E = 0.5*m*v^2. List every symbol they use, "
     "as a JSON array; do not solve anything.", "extraction"),
    ("Act as a math teacher and explain to me, a nervous student, what a fraction is.", "roleplay"),
    ("Edit this paragraph so it reads better: 'Photosynthesis are the process where plant make food "
     "from light, it happen in the chloroplast.'", "writing"),
    ("How does photosynthesis turn light into chemical energy?", "stem"),
    ("Implement Dijkstra's shortest path algorithm in Rust.", "coding"),
    ("What were the main causes of the French Revolution?", "humanities"),
    ("Pretend you are Napoleon and tell me how you feel after Waterloo.", "roleplay"),
    ("Write a short blog post about the French Revolution for teenagers.", "writing"),
]


@pytest.fixture(scope="module")
def default_router():
    return Router.default()


def test_task_beats_topic_on_contrast_pairs(default_router):
    got = {p: max(default_router.classify(p).items(), key=lambda kv: kv[1])[0] for p, _ in CONTRAST}
    wrong = {p[:50]: (want, got[p]) for p, want in CONTRAST if got[p] != want}
    assert not wrong


def test_calibration_measures():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 20000)
    correct = rng.uniform(size=conf.size) < conf  # calibrated by construction
    assert ece(conf, correct) < 0.02
    assert ece(np.full(1000, 0.99), np.zeros(1000, bool)) > 0.9
    th = propose_threshold(conf, correct, target_accuracy=0.8, max_fallback=0.5)
    assert 0.5 < th["threshold"] < 0.8 and th["accuracy_above"] >= 0.8
    P = np.array([[0.95, 0.05], [0.6, 0.4], [0.2, 0.8]])
    rep = calibration_report(P, [1, 0, 1])
    assert rep["confidently_wrong"] == pytest.approx(1 / 3) and rep["accuracy"] == pytest.approx(2 / 3)


def test_cli_eval_reports_calibration_and_threshold(tmp_path, default_router):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in CONTRAST))
    res = CliRunner().invoke(app, ["eval", "--data", str(f), "--json", "--latency-n", "3"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert {"ece", "confidently_wrong", "proposed_threshold", "reliability"} <= set(doc["calibration"])
    assert 0.0 <= doc["calibration"]["proposed_threshold"]["threshold"] <= 1.0


def test_shipped_default_is_the_artifact_and_reproducible():
    """The default router is the shipped artifact, and rebuilding it from the shipped data and code
    gives the same router (``python -m routers.default_router --check``)."""
    from routers.default_router import main, shipped_dir

    r = Router.default()
    assert r.path == shipped_dir()
    assert main(["--check"]) == 0


# ---- task and topic through the category map and the policy (issue 14, item 3) ----------------------
def one_expert_per_category() -> tuple[dict[str, Expert], dict[str, list[str]]]:
    experts = {f"{c}-expert": Expert(name=f"{c}-expert", model="/m", capabilities={c: 0.8})
               for c in DEFAULT_CATEGORIES}
    return experts, {c: [f"{c}-expert"] for c in DEFAULT_CATEGORIES}


def test_contrast_pairs_reach_the_task_expert_end_to_end(default_router):
    experts, cmap = one_expert_per_category()
    got = {p: default_router.route(p, "coe", experts, cmap).expert for p, _ in CONTRAST}
    wrong = {p[:50]: (f"{want}-expert", got[p]) for p, want in CONTRAST if got[p] != f"{want}-expert"}
    assert not wrong


def test_a_topic_expert_can_win_a_task_prompt_about_its_topic(default_router):
    experts, cmap = one_expert_per_category()
    prompt = "Act as a math teacher and explain to me, a nervous student, what a fraction is."
    assert default_router.route(prompt, "coe", experts, cmap).expert == "roleplay-expert"  # the task decides
    # a math tutor that declares it can role-play, mapped to both: chosen for the role-play about math
    experts["math-tutor"] = Expert(name="math-tutor", model="/m", capabilities={"math": 0.9, "roleplay": 0.9})
    cmap = {**cmap, "roleplay": ["roleplay-expert", "math-tutor"], "math": ["math-expert", "math-tutor"]}
    d = default_router.route(prompt, "coe", experts, cmap)
    assert d.expert == "math-tutor" and d.category == "roleplay"
    # being mapped to a category makes an expert compete there on declared capability, not by name
    assert default_router.route("Pretend you are a pirate and greet me.", "coe", experts, cmap).expert == "math-tutor"
    experts["roleplay-expert"] = experts["roleplay-expert"].model_copy(update={"capabilities": {"roleplay": 0.95}})
    assert default_router.route("Pretend you are a pirate and greet me.", "coe", experts, cmap).expert == "roleplay-expert"
