"""Issue 31 item 4: an expert that declares a capability but is not in the category map does not
compete, and the decision says why (``not_candidates``), instead of it silently never being chosen."""

from __future__ import annotations

from routers.policy import RoutingPolicy

from .conftest import make_expert

CATS = ["coding", "math", "reasoning", "writing", "roleplay", "extraction", "stem", "humanities", "general"]


def probs(**kw) -> dict[str, float]:
    return {c: kw.get(c, 0.0) for c in CATS}


def _registry():
    experts = {
        "coder": make_expert("coder", capabilities={"coding": 0.7}),
        "smol-copy": make_expert("smol-copy", capabilities={"coding": 0.9}),  # added, never mapped
        "mathy": make_expert("mathy", capabilities={"math": 0.9}),
        "poet": make_expert("poet", capabilities={"writing": 0.9}),  # unmapped, but not about coding
        "chat": make_expert("chat", capabilities={"general": 0.6}),
    }
    return experts, {"coding": ["coder"], "math": ["mathy"], "general": ["chat"]}


def test_an_unmapped_expert_with_the_capability_is_named_with_the_reason():
    experts, cmap = _registry()
    choice = RoutingPolicy().choose(probs(coding=1.0), experts, cmap)
    assert choice.expert == "coder"
    assert {c.expert for c in choice.candidates} == {"coder"}
    assert choice.not_candidates == {
        "smol-copy": "not in the category map for coding (it declares coding=0.9)"}
    # once mapped, it competes (and wins on its capability); nothing is left unexplained
    choice = RoutingPolicy().choose(probs(coding=1.0), experts, {**cmap, "coding": ["coder", "smol-copy"]})
    assert choice.expert == "smol-copy" and choice.not_candidates == {}


def test_every_category_routed_on_counts_and_a_hard_constraint_is_not_repeated():
    experts, cmap = _registry()
    experts["both"] = make_expert("both", capabilities={"coding": 0.5, "math": 0.8})
    choice = RoutingPolicy().choose(probs(coding=0.55, math=0.45), experts, cmap)
    assert choice.not_candidates["both"] == ("not in the category map for coding, math "
                                             "(it declares coding=0.5, math=0.8)")
    assert "poet" not in choice.not_candidates  # writing was not routed on
    experts["smol-copy"] = experts["smol-copy"].model_copy(update={"status": "failed", "status_reason": "OOM"})
    choice = RoutingPolicy().choose(probs(coding=1.0), experts, {**cmap, "coding": ["coder", "smol-copy"]})
    assert "smol-copy" in choice.excluded and "smol-copy" not in choice.not_candidates


def test_with_no_category_map_every_expert_competes(small_router):
    """An empty map means every expert competes on its capabilities: nobody is 'not a candidate'."""
    experts, _ = _registry()
    d = small_router.route("Write a python function that reverses a linked list.", "coe/coding", experts, {})
    assert d.not_candidates == {} and "smol-copy" in {c.expert for c in d.candidates}


def test_the_routing_decision_carries_it(small_router):
    experts, cmap = _registry()
    d = small_router.route("Write a python function that reverses a linked list.", "coe/coding", experts, cmap)
    assert d.expert == "coder"
    assert d.not_candidates == {"smol-copy": "not in the category map for coding (it declares coding=0.9)"}
    assert d.model_dump(mode="json")["not_candidates"] == d.not_candidates  # what /v1/route renders
