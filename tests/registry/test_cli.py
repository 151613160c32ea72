"""coe-registry as a user runs it: good paths, and every bad input -> one line, exit 2, no change."""

from __future__ import annotations

import json

import pytest
import yaml

from expert_registry.store import RedisRegistry

from .helpers import cli, make_garbage_gguf, make_model_folder, make_truncated_gguf, run_py, state


def ok(result):
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def populated(registry, smollm2_gguf, tmp_path):
    """Two experts (a GGUF and a folder) and a category map naming both."""
    folder = make_model_folder(tmp_path / "folder-model")
    ok(cli(registry, "add", "smollm2", "--model", str(smollm2_gguf), "-c", "general=0.6",
           "-c", "coding=0.3", "--tag", "demo", "--temperature", "0.2"))
    ok(cli(registry, "add", "tiny", "--model", str(folder), "--engine", "hf"))
    ok(cli(registry, "map", "set", "general=smollm2,tiny", "coding=tiny"))
    return registry


def test_add_records_model_facts(populated: RedisRegistry, smollm2_gguf):
    e = populated.get("smollm2")
    assert e.size_bytes == smollm2_gguf.stat().st_size
    assert e.max_context == 8192 and e.params_b == 0.135
    assert e.capabilities == {"general": 0.6, "coding": 0.3} and e.tags == ["demo"]
    assert e.generation.temperature == 0.2 and e.generation.max_tokens == 256
    assert e.model == str(smollm2_gguf.resolve())
    t = populated.get("tiny")
    assert t.engine == "hf" and t.max_context == 4096 and t.size_bytes > 0
    assert populated.get_map() == {"general": ["smollm2", "tiny"], "coding": ["tiny"]}


def test_read_commands_json(populated):
    listed = json.loads(ok(cli(populated, "list", "--json")).stdout)
    assert [e["name"] for e in listed] == ["smollm2", "tiny"]
    shown = json.loads(ok(cli(populated, "show", "tiny", "--json")).stdout)
    assert shown["engine"] == "hf"
    assert json.loads(ok(cli(populated, "map", "show", "--json")).stdout)["coding"] == ["tiny"]
    table = ok(cli(populated, "list")).stdout
    assert "smollm2" in table and "98.4 MB" in table


def test_add_from_file_and_update(registry, tiny_model_dir, smollm2_gguf, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny-real", "model": str(tiny_model_dir), "dtype": "float32",
                                    "capabilities": {"math": 0.4}, "generation": {"max_tokens": 64}}))
    ok(cli(registry, "add", "--from-file", str(spec), "--max-tokens", "32", "-c", "coding=0.2"))
    e = registry.get("tiny-real")
    assert e.generation.max_tokens == 32 and e.capabilities == {"math": 0.4, "coding": 0.2}
    assert e.max_context == 2048 and e.size_bytes > 1_000_000
    ok(cli(registry, "update", "tiny-real", "-c", "math=0.9", "--system-prompt", "You are terse."))
    e2 = registry.get("tiny-real")
    assert e2.capabilities == {"math": 0.9, "coding": 0.2} and e2.system_prompt == "You are terse."
    assert e2.created_at == e.created_at and e2.updated_at > e.updated_at
    # a new model is checked and its facts re-recorded
    ok(cli(registry, "update", "tiny-real", "--model", str(smollm2_gguf)))
    e3 = registry.get("tiny-real")
    assert e3.size_bytes == smollm2_gguf.stat().st_size and e3.max_context == 8192 and e3.params_b == 0.135
    one_line_error(cli(registry, "update", "tiny-real", "--model", str(tmp_path / "gone.gguf")), "gone.gguf")
    assert registry.get("tiny-real") == e3


def test_remove_force_cleans_map(populated):
    ok(cli(populated, "remove", "tiny", "--force"))
    assert [e.name for e in populated.list()] == ["smollm2"]
    assert populated.get_map() == {"general": ["smollm2"]}  # "coding" was left empty -> dropped


def test_export_import_round_trip(populated, redis_url, tmp_path):
    dump = tmp_path / "registry.yaml"
    ok(cli(populated, "export", "--output", str(dump)))
    target = RedisRegistry(redis_url, populated.namespace + "-copy")
    try:
        ok(cli(target, "import", str(dump)))
        again = yaml.safe_load(ok(cli(target, "export")).stdout)
        first = yaml.safe_load(dump.read_text())
        assert again["experts"] == first["experts"] and again["category_map"] == first["category_map"]
        assert target.snapshot().experts == populated.snapshot().experts
        # importing again: every name clashes -> refused whole
        before = state(target)
        one_line_error(cli(target, "import", str(dump)), "already exist", "--overwrite")
        assert state(target) == before
    finally:
        target.purge()


def test_bad_inputs_change_nothing(populated, smollm2_gguf, tmp_path, monkeypatch):
    reg = populated
    before = state(reg)
    g = str(smollm2_gguf)
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(yaml.safe_dump({"name": "x", "model": g, "colour": "blue"}))
    broken_cfg = make_model_folder(tmp_path / "broken")
    (broken_cfg / "config.json").write_text("{oops")
    bad_import = tmp_path / "import.yaml"
    bad_import.write_text(yaml.safe_dump({"experts": [
        {"name": "ok-one", "model": g}, {"name": "bad-one", "model": g, "capabilities": {"math": 3}}]}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (("add", "Bad Name!", "--model", g), ["invalid expert name", "Bad Name!"]),
        (("add", "x" * 65, "--model", g), ["invalid expert name"]),
        (("add", "smollm2", "--model", g), ["already exists", "smollm2"]),
        (("add", "x", "--model", str(tmp_path / "missing.gguf")), ["does not exist", "missing.gguf"]),
        (("add", "x", "--model", str(tmp_path / "missing-dir")), ["does not exist"]),
        (("add", "x", "--model", str(make_garbage_gguf(tmp_path / "junk.gguf"))), ["junk.gguf", "GGUF"]),
        (("add", "x", "--model", str(make_truncated_gguf(smollm2_gguf, tmp_path / "cut.gguf"))), ["cut.gguf"]),
        (("add", "x", "--model", str(broken_cfg)), ["config.json"]),
        (("add", "x", "--model", "some-org/not-cached"), ["HF_HUB_OFFLINE"]),
        (("add", "--from-file", str(bad_spec)), ["unknown field 'colour'"]),
        (("add", "x", "--model", g, "--colour", "blue"), ["--colour"]),
        (("add", "x", "--model", g, "-c", "coding=1.5"), ["capabilities.coding"]),
        (("add", "x", "--model", g, "-c", "coding=-0.1"), ["capabilities.coding"]),
        (("add", "x", "--model", g, "--engine", "tgi"), ["engine"]),
        (("update", "smollm2", "-c", "math=2"), ["capabilities.math"]),
        (("update", "nobody", "--temperature", "0.1"), ["nobody"]),
        (("remove", "tiny"), ["category map", "tiny", "--force"]),
        (("remove", "nobody"), ["error: no expert named 'nobody'"]),
        (("map", "set", "math=tiny,ghost"), ["ghost"]),
        (("import", str(bad_import)), ["bad-one", "capabilities.math"]),
        (("import", str(tmp_path / "no-such.yaml")), ["no-such.yaml"]),
    ]
    for args, needles in cases:
        one_line_error(cli(reg, *args), *needles)
        assert state(reg) == before, args


def test_unreachable_redis_says_which_url(tmp_path):
    result = cli(RedisRegistry("redis://127.0.0.1:1/0", "x"), "list")
    one_line_error(result, "redis://127.0.0.1:1/0")


def test_console_script_subprocess_uses_env(registry):
    """As a real process, configured only through COE_REDIS_URL / COE_NAMESPACE."""
    env = {"COE_REDIS_URL": registry.url, "COE_NAMESPACE": registry.namespace}
    res = run_py("from expert_registry.cli import main; import sys; sys.argv=['coe-registry','add','x',"
                 "'--model','/m.gguf','--skip-model-check','-c','math=0.5']; main()", env=env)
    assert res.returncode == 0, res.stderr
    assert registry.get("x").capabilities == {"math": 0.5}
    res = run_py("from expert_registry.cli import main; import sys; sys.argv=['coe-registry','add','x',"
                 "'--model','/m.gguf','--skip-model-check']; main()", env=env)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "already exists" in res.stderr


def test_unknown_categories_are_refused_with_the_known_set(registry, smollm2_gguf):
    """Decision 6: a category the router cannot route (a typo such as `code`) is refused at the door."""
    g = str(smollm2_gguf)
    before = state(registry)
    # no service has published a set yet: the default taxonomy is used, and the error says so
    err = one_line_error(cli(registry, "add", "x", "--model", g, "-c", "cooking=0.9"),
                         "unknown category 'cooking'", "coding, math", "default taxonomy", "coe router train")
    assert "general" in err
    one_line_error(cli(registry, "map", "set", "code=x"), "unknown category 'code'")
    assert state(registry) == before
    res = ok(cli(registry, "add", "x", "--model", g, "-c", "coding=0.9"))
    assert "default taxonomy" in res.stderr and res.stderr.startswith("warning:")
    # a service whose router knows other categories has published them: they, and only they, count
    registry.publish_categories(["cooking", "coding"], "/routers/kitchen")
    ok(cli(registry, "update", "x", "-c", "cooking=0.8"))
    ok(cli(registry, "map", "set", "cooking=x"))
    one_line_error(cli(registry, "map", "set", "math=x"), "unknown category 'math'", "coding, cooking",
                   "/routers/kitchen")
    assert registry.get_map() == {"cooking": ["x"]}


def test_list_fits_80_columns_and_prints_what_is_stored(registry, smollm2_gguf, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    g = str(smollm2_gguf)
    added = ok(cli(registry, "add", "a-long-expert-name-for-maths", "--model", g, "--max-context", "2048",
                   "-c", "math=0.9", "-c", "stem=0.7", "-c", "reasoning=0.6", "-c", "humanities=0.5",
                   "--tag", "demo", "--tag", "quantised")).stdout
    assert "ctx 2048" in added and "ctx 8192" not in added  # what is stored, not what the file says
    assert registry.get("a-long-expert-name-for-maths").max_context == 2048
    for args in (("list",), ("list", "-l")):
        text = ok(cli(registry, *args)).stdout
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert "a-long-expert-name-for-maths" in text and "status" in text  # never folded mid-word
        assert "98.4 MB" in text and "2048" in text and "math=0.9" in text


def test_demo_experts_record_their_size(registry):
    from coe.demo import ensure_demo, smollm2_gguf

    ensure_demo(registry)
    assert {e.size_bytes for e in registry.list()} == {smollm2_gguf().stat().st_size}


def test_starting_the_embedded_redis_is_announced(tmp_path):
    """With no Redis given, the first command starts one and says so, with how to stop it."""
    import tempfile

    home = tempfile.mkdtemp(prefix="coe-cli-")  # short: the unix socket lives in it
    env = {"COE_HOME": home, "COE_REDIS_URL": ""}
    code = "from expert_registry.cli import main; import sys; sys.argv=['coe-registry','list','--json']; main()"
    try:
        first, second = run_py(code, env=env), run_py(code, env=env)
        assert first.returncode == 0 and "started the embedded Redis" in first.stderr
        assert "coe-registry server stop" in first.stderr
        assert second.returncode == 0 and second.stderr == ""  # reused quietly
    finally:
        run_py("from expert_registry.embedded import stop_embedded; stop_embedded()", env=env)


def test_dummy_weights_expert_needs_only_a_config(registry, tmp_path):
    """A vLLM expert with ``load_format: dummy`` reads no weights (GPU dry runs with real shapes),
    so a folder holding only config + tokenizer is accepted; without dummy it is refused."""
    from coe.engines.vllm_models import build_dummy_folder

    folder = build_dummy_folder(tmp_path / "llama-tiny", "tiny")
    one_line_error(cli(registry, "add", "real", "--model", str(folder), "--engine", "vllm"), "no *.safetensors")
    out = ok(cli(registry, "add", "shapes", "--model", str(folder), "--engine", "vllm", "--load-format", "dummy"))
    assert "config-only" in out.stdout
    assert registry.get("shapes").engine_settings.load_format == "dummy"
