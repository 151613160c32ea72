"""What `coe chat` prints above an answer: the routing decision, never a literal ``None``."""

from __future__ import annotations

from coe.cli import _route_line


def test_named_expert_says_the_router_was_bypassed():
    line = _route_line({"expert": "smollm2-tutor", "category": None, "forced": "expert", "route_ms": 0.1})
    assert "smollm2-tutor" in line and "None" not in line and "bypassed" in line


def test_routed_request_shows_category_and_probability():
    line = _route_line({"expert": "tutor", "category": "math", "forced": "auto", "route_ms": 3.5,
                        "category_probs": [{"category": "math", "prob": 0.97}]})
    assert "category math p=0.97" in line and "3.5 ms" in line
