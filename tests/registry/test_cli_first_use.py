"""Issue 31 items 4, 5 and 8, as a user of ``coe-registry`` meets them: a new expert is routed to
only once the category map lists it, and ``add`` says so with the command (or ``--map`` does it);
``list -l`` reads well at 80 columns; error messages name the flag."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .helpers import REPO, cli, make_model_folder, state
from .test_cli import ok, one_line_error

CLI = Path(sys.executable).parent / "coe-registry"


@pytest.fixture
def mapped(registry, smollm2_gguf):
    """One expert, mapped to coding and general (the state in which `add smol-copy` surprised)."""
    ok(cli(registry, "add", "smollm2", "--model", str(smollm2_gguf), "-c", "general=0.6", "-c", "coding=0.3"))
    ok(cli(registry, "map", "set", "general=smollm2", "coding=smollm2"))
    return registry


def _console(reg, *args: str) -> subprocess.CompletedProcess:
    """The console script as a user runs it, configured through the environment."""
    env = {**os.environ, "COE_REDIS_URL": reg.url, "COE_NAMESPACE": reg.namespace, "COLUMNS": "80"}
    return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_add_prints_the_map_command_and_it_makes_the_expert_routable(mapped, smollm2_gguf):
    res = _console(mapped, "add", "smol-copy", "--model", str(smollm2_gguf), "-c", "coding=0.9")
    assert res.returncode == 0, res.stderr
    assert "added expert 'smol-copy'" in res.stdout
    assert "'smol-copy' is not in the category map for coding" in res.stderr
    assert "do not reach it" in res.stderr and "--map" in res.stderr
    cmd = next(line.strip() for line in res.stderr.splitlines() if line.strip().startswith("coe-registry map set"))
    # the exact command: the experts already there stay first, and it names this namespace
    assert cmd == f"coe-registry map set coding=smollm2,smol-copy -n {mapped.namespace}"
    assert mapped.get_map()["coding"] == ["smollm2"]  # add alone does not change routing
    ran = _console(mapped, *shlex.split(cmd)[1:])
    assert ran.returncode == 0, ran.stderr
    assert mapped.get_map() == {"general": ["smollm2"], "coding": ["smollm2", "smol-copy"]}


def test_add_with_map_appends_it_to_each_category_it_declares(mapped, smollm2_gguf):
    res = ok(cli(mapped, "add", "smol-copy", "--model", str(smollm2_gguf), "-c", "coding=0.9", "-c", "math=0.4",
                 "-c", "writing=0", "--map"))
    assert "category map: coding = smollm2, smol-copy; math = smol-copy" in res.stdout
    assert "not in the category map" not in res.stderr
    # last in each list (the experts already there keep their preference); a score of 0 is no claim
    assert mapped.get_map() == {"general": ["smollm2"], "coding": ["smollm2", "smol-copy"], "math": ["smol-copy"]}
    # one transaction: a refused add leaves the map alone too
    before = state(mapped)
    one_line_error(cli(mapped, "add", "smol-copy", "--model", str(smollm2_gguf), "-c", "stem=0.5", "--map"),
                   "already exists")
    assert state(mapped) == before


def test_an_empty_map_or_no_capability_is_explained(registry, smollm2_gguf):
    g = str(smollm2_gguf)
    res = ok(cli(registry, "add", "first", "--model", g, "-c", "coding=0.9"))
    assert "note:" not in res.stderr  # no map at all: every expert competes on its capabilities
    res = ok(cli(registry, "add", "second", "--model", g, "-c", "coding=0.8", "--map"))
    assert "the category map is empty" in res.stderr and "left the map empty" in res.stderr
    assert registry.get_map() == {}
    ok(cli(registry, "map", "set", "coding=first"))
    res = ok(cli(registry, "add", "plain", "--model", g))
    assert "'plain' declares no capability" in res.stderr and "model 'plain'" in res.stderr


def test_a_missing_model_or_name_names_what_to_give(registry, tmp_path):
    before = state(registry)
    err = one_line_error(cli(registry, "add", "smol-copy", "-c", "coding=0.9"), "--model is required")
    assert "Field required" not in err and "smol-copy" in err
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: from-file\n")
    one_line_error(cli(registry, "add", "--from-file", str(spec)), "--model is required", "model: in")
    one_line_error(cli(registry, "add", "--model", str(make_model_folder(tmp_path / "m"))), "NAME is required")
    assert state(registry) == before


def _listing_registry(reg, smollm2_gguf, tmp_path):
    g = str(smollm2_gguf)
    folder = make_model_folder(tmp_path / "a-model-folder-with-a-rather-long-name-v2")
    ok(cli(reg, "add", "a-long-expert-name-for-maths", "--model", g, "--max-context", "2048", "-c", "math=0.9",
           "-c", "stem=0.7", "-c", "reasoning=0.6", "-c", "humanities=0.5", "--tag", "demo", "--tag", "quantised"))
    ok(cli(reg, "add", "tiny", "--model", str(folder), "--engine", "hf", "-c", "coding=0.2"))
    reg.set_status("tiny", "failed", "weights unreadable: " + "x" * 120)
    return folder


def _check_80_columns(text: str, reg) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    header = next(line for line in lines if line.lstrip().startswith("name"))
    assert header.split() == ["name", "status", "engine", "size", "ctx", "categories"], header
    for word in ("a-long-expert-name-for-maths", "math=0.9", "stem=0.7", "reasoning=0.6", "humanities=0.5",
                 "98.4 MB", "2048", "hf", "failed", "coding=0.2", "demo, quantised"):
        assert word in text, (word, text)  # whole: nothing folded mid-word
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text  # the model's file name, under its row
    assert "full model paths: coe-registry list --wide, or coe-registry show NAME" in text


def test_list_long_reads_well_at_80_columns_and_wide_has_the_paths(registry, smollm2_gguf, tmp_path, monkeypatch):
    folder = _listing_registry(registry, smollm2_gguf, tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    text = ok(cli(registry, "list", "-l", "--service", "http://127.0.0.1:1")).stdout
    _check_80_columns(text, registry)
    assert str(smollm2_gguf.resolve()) not in text and "…" in text  # the long reason is cut, and says so
    wide = ok(cli(registry, "list", "--wide", "--service", "http://127.0.0.1:1")).stdout
    assert str(smollm2_gguf.resolve()) in wide and str(folder.resolve()) in wide
    assert "math=0.9 stem=0.7 reasoning=0.6 humanities=0.5" in wide and "x" * 120 in wide
    shown = ok(cli(registry, "show", "tiny")).stdout
    assert str(folder.resolve()) in shown


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_list_long_on_an_80_column_terminal(registry, smollm2_gguf, tmp_path):
    """The screen a user sees: tmux, 80 columns; no line reaches the edge and wraps."""
    _listing_registry(registry, smollm2_gguf, tmp_path)
    sock = f"coe-list-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "done"
    cmd = (f"env COE_REDIS_URL={shlex.quote(registry.url)} COE_NAMESPACE={registry.namespace} "
           f"{shlex.quote(str(CLI))} list -l --service http://127.0.0.1:1; touch {shlex.quote(str(done))}; sleep 60")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30, env=env).stdout

    tmux("new-session", "-d", "-s", "t", "-x", "80", "-y", "50", cmd)
    try:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists(), tmux("capture-pane", "-p", "-t", "t")
        screen = tmux("capture-pane", "-p", "-t", "t")
        joined = tmux("capture-pane", "-p", "-J", "-t", "t")  # -J joins lines tmux wrapped
    finally:
        tmux("kill-server")
    assert screen.rstrip() == joined.rstrip(), screen  # nothing wrapped at the edge
    _check_80_columns(screen.rstrip(), registry)
