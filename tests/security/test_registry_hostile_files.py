"""Issue 24, low items, with the real CLI and a real Redis: a hostile import file and a malformed
stored category map. Before: ``coe-registry import`` printed a RecursionError traceback for a
recursive YAML alias and for deep nesting, and a malformed category map made every snapshot fail,
freezing the service's registry view."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.helpers import cli  # noqa: E402


def _one_line(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in result.stdout + result.stderr


def test_import_refuses_a_recursive_alias_and_deep_nesting_in_one_line(registry, tmp_path):
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("experts: &a\n  - name: x\n    model: /m\n    tags: *a\n")
    _one_line(cli(registry, "import", str(recursive)), "recursive alias")
    deep = tmp_path / "deep.yaml"
    deep.write_text("experts: " + "[" * 5000 + "]" * 5000 + "\n")
    _one_line(cli(registry, "import", str(deep)), "nested")
    assert registry.list() == []  # nothing half-written


def test_a_malformed_category_map_is_skipped_with_a_reason_not_a_frozen_view(registry):
    registry._r.set(registry.k_map, json.dumps({"coding": "not-a-list"}))
    registry._r.incr(registry.k_version)
    snap = registry.snapshot()  # raised RegistryError before: every reader's view froze
    assert snap.category_map == {} and "category map" in snap.invalid["(category map)"]
    registry.set_map({"coding": []})  # and `coe-registry map set` replaces it
    assert "(category map)" not in registry.snapshot().invalid
