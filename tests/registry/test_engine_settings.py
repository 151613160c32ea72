"""Per-expert engine settings and the entry schema version, as a user of coe-registry meets them."""

from __future__ import annotations

import json

import yaml

from expert_registry.spec import SCHEMA_VERSION

from .helpers import cli, make_model_folder
from .test_cli import ok, one_line_error


def test_engine_settings_are_set_validated_and_shown(registry, tmp_path):
    folder = make_model_folder(tmp_path / "m")
    ok(cli(registry, "add", "v", "--model", str(folder), "--engine", "vllm", "--kv-cache", "2GiB", "--eager",
           "--quantization", "fp8", "--max-num-seqs", "32", "--tool-call-parser", "hermes"))
    shown = yaml.safe_load(ok(cli(registry, "show", "v")).stdout)
    assert shown["schema_version"] == SCHEMA_VERSION
    assert shown["engine_settings"] == {"kv_cache_bytes": 2 << 30, "gpu_memory_utilization": None,
                                        "enforce_eager": True, "quantization": "fp8", "max_num_seqs": 32,
                                        "load_format": None, "tool_call_parser": "hermes"}
    ok(cli(registry, "update", "v", "--no-eager", "--kv-cache", "512MiB"))
    es = registry.get("v").engine_settings
    assert (es.enforce_eager, es.kv_cache_bytes, es.quantization, es.max_num_seqs) == (False, 512 << 20, "fp8", 32)

    one_line_error(cli(registry, "update", "v", "--kv-cache", "2 parsecs"), "--kv-cache", "not a size")
    one_line_error(cli(registry, "update", "v", "--quantization", "int3"), "engine_settings.quantization")
    one_line_error(cli(registry, "update", "v", "--tool-call-parser", "Not A Parser!"),
                   "engine_settings.tool_call_parser")
    one_line_error(cli(registry, "update", "v", "--gpu-memory-utilization", "1.5"),
                   "engine_settings.gpu_memory_utilization")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "w", "model": str(folder), "engine_settings": {"trust_remote": True}}))
    one_line_error(cli(registry, "add", "-f", str(spec)), "unknown field 'engine_settings.trust_remote'")
    assert registry.get("v").engine_settings.kv_cache_bytes == 512 << 20  # refused changes changed nothing


def test_an_entry_from_a_newer_coe_is_reported_by_name(registry, tmp_path):
    folder = make_model_folder(tmp_path / "m")
    ok(cli(registry, "add", "old", "--model", str(folder)))
    raw = json.loads(registry._r.hget(registry.k_experts, "old"))
    raw.update(schema_version=SCHEMA_VERSION + 1, new_field_of_the_future=1)
    registry._r.hset(registry.k_experts, "old", json.dumps(raw))
    # the rest of the registry stays readable (issue 12 item 5); the entry is named, not hidden
    out = ok(cli(registry, "list"))
    text = " ".join((out.stdout + out.stderr).split())
    for needle in ("'old'", "newer coe", f"schema {SCHEMA_VERSION + 1}"):
        assert needle in text, text
    assert "old" in registry.snapshot().invalid


def test_an_entry_without_a_schema_version_still_reads(registry, tmp_path):
    folder = make_model_folder(tmp_path / "m")
    ok(cli(registry, "add", "v1", "--model", str(folder)))
    raw = json.loads(registry._r.hget(registry.k_experts, "v1"))
    del raw["schema_version"], raw["engine_settings"]  # what a version-1 coe wrote
    registry._r.hset(registry.k_experts, "v1", json.dumps(raw))
    assert registry.get("v1").engine_settings.kv_cache_bytes is None
    ok(cli(registry, "update", "v1", "--eager"))
    assert json.loads(registry._r.hget(registry.k_experts, "v1"))["schema_version"] == SCHEMA_VERSION
