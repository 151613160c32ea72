"""Shape rules of the code base that a reviewer would otherwise have to re-check by hand."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("coe", "routers", "expert_registry")
MAX_FUNCTION_LINES = 80  # issue 15: a function longer than this does more than one job


def test_no_function_is_longer_than_80_lines():
    """Counted from ``def`` to the last line of the body, docstring and comments included."""
    long = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)
