"""Stage 2: from category probabilities to one expert.

1. Candidates: the experts the registry's category map lists for the *top categories* — taken in
   order of probability until their mass reaches ``mix_mass`` (at most ``mix_top_k``, each at
   least ``mix_min_prob``) — so an expert mapped only to the runner-up category still competes
   on a prompt that is 55% coding / 40% math. An expert that declares a capability in one of
   those categories but is not mapped to it does not compete; the decision's ``not_candidates``
   says so ("not in the category map for coding"), so a newly added expert's silence is explained.
2. Hard constraints remove candidates (reason kept in ``excluded``): status ``failed``, not in
   ``allowed``, ``max_context < prompt_tokens + max_tokens``, ``cost_per_1k_tokens > max_cost``.
3. Score of each eligible candidate::

       capability = sum_c p(c) * cap(expert, c)
           cap = the expert's declared capabilities[c]; if undeclared, ``map_capability`` when the
           map lists the expert under c, else 0
       merit      = capability                                    if no quality records
                  = (1 - quality_weight) * capability + quality_weight * quality(prompt)
       score      = merit - cost_weight * cost / max_cost_among_candidates
                          + residency_weight * residency (0..1, from the pool)
                          + quality_pick_bonus  for the one candidate the quality rule picks

   ``quality(prompt)`` is the predictor's absolute estimate (what feedback moves). The *quality
   rule* (:meth:`routers.quality.QualityPredictor.confident_pick`) is the decision measured on real
   judgments (``coe router eval --quality``): among the candidates with records it names the expert
   whose paired advantage over the best-on-average one is positive with confidence, or nobody. Its
   bonus (default 1.0, more than any other term) makes the service route as the evaluation did;
   0 turns it off.

4. If the top category's probability is below ``confidence_threshold`` the request goes to the
   first eligible expert of the ``fallback_category`` (``general``) instead; the reason is
   recorded in the decision. The same fallback applies when no mapped candidate is eligible.

Defaults (``PolicyConfig``) are chosen so that capability differences of ~0.1 dominate, a hot
expert wins near-ties (residency 0.1), and the most expensive candidate pays 0.15.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict, Field

from expert_registry.spec import Expert
from routers.decision import CandidateScore, RoutingDecision
from routers.errors import NoEligibleExpert


class PolicyConfig(BaseModel):
    """Weights and thresholds of stage 2 (all documented in the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    confidence_threshold: float = Field(0.30, ge=0.0, le=1.0)
    mix_top_k: int = Field(3, ge=1)
    mix_mass: float = Field(0.90, gt=0.0, le=1.0)
    mix_min_prob: float = Field(0.05, ge=0.0, le=1.0)
    quality_weight: float = Field(0.5, ge=0.0, le=1.0)
    quality_pick_bonus: float = Field(1.0, ge=0.0)
    cost_weight: float = Field(0.15, ge=0.0)
    residency_weight: float = Field(0.10, ge=0.0)
    map_capability: float = Field(0.5, ge=0.0, le=1.0)
    fallback_category: str = "general"


def ineligible_reason(
    expert: Expert,
    allowed: set[str] | None,
    prompt_tokens: int | None,
    max_tokens: int | None,
    max_cost_per_1k: float | None,
) -> str | None:
    """Why ``expert`` cannot take this request (hard constraints), or None when it can."""
    if expert.status != "ready":
        return f"status {expert.status}" + (f": {expert.status_reason}" if expert.status_reason else "")
    if allowed is not None and expert.name not in allowed:
        return "not in the allowed experts"
    if prompt_tokens is not None:
        out = max_tokens if max_tokens is not None else expert.generation.max_tokens
        need = int(prompt_tokens) + int(out)
        if need > expert.max_context:
            return f"context too long: {prompt_tokens} prompt + {out} new tokens > max_context {expert.max_context}"
    if max_cost_per_1k is not None and expert.cost_per_1k_tokens > max_cost_per_1k:
        return f"cost {expert.cost_per_1k_tokens:g}/1k tokens > max {max_cost_per_1k:g}"
    return None


AUTO_MODEL = "coe"  # the model name that asks the router to choose ("coe/<category>" forces a category)


def names_expert(model: str | None, experts: Mapping[str, Expert]) -> bool:
    """Whether ``model`` names a registered expert (routed by :func:`route_named`: no classifier).
    One rule for the router, its deployment and the ingress, which routes such requests itself."""
    return bool(model) and model != AUTO_MODEL and model in experts


def route_named(
    expert: Expert,
    allowed: set[str] | None = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    max_cost_per_1k: float | None = None,
    t0: float | None = None,
) -> RoutingDecision:
    """The decision for an expert the client named: no classifier, but the hard constraints still
    hold (:class:`NoEligibleExpert` otherwise). Pure and cheap, so the service's ingress takes it
    without a call to the router (``Router.route`` uses it too: one rule)."""
    t0 = time.perf_counter() if t0 is None else t0
    reason = ineligible_reason(expert, allowed, prompt_tokens, max_tokens, max_cost_per_1k)
    if reason:
        raise NoEligibleExpert(f"expert '{expert.name}' cannot serve this request: {reason}", {expert.name: reason})
    return RoutingDecision(expert=expert.name, category=None, forced="expert", route_ms=(time.perf_counter() - t0) * 1e3)


class Choice(NamedTuple):
    """What :meth:`RoutingPolicy.choose` decided (a named tuple: it also unpacks in this order)."""

    expert: str
    category: str
    candidates: list[CandidateScore]  # best first
    excluded: dict[str, str]  # expert -> why a hard constraint removed it
    fallback_reason: str | None  # why the top category's best was not taken, if it was not
    not_candidates: dict[str, str]  # expert -> why it did not compete (not mapped to a category it declares)


class RoutingPolicy:
    """Chooses an expert from category probabilities, the registry snapshot and request constraints."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()

    def mixed_categories(self, probs: Mapping[str, float]) -> list[str]:
        """Top categories by probability whose experts become candidates."""
        cfg = self.config
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        out: list[str] = []
        mass = 0.0
        for cat, p in ranked:
            if out and (len(out) >= cfg.mix_top_k or mass >= cfg.mix_mass or p < cfg.mix_min_prob):
                break
            out.append(cat)
            mass += p
        return out

    def capability(self, expert: Expert, probs: Mapping[str, float], category_map: Mapping[str, Sequence[str]]) -> float:
        caps = expert.capabilities
        total = 0.0
        for cat, p in probs.items():
            if p <= 0.0:
                continue
            if cat in caps:
                c = caps[cat]
            elif expert.name in category_map.get(cat, ()):
                c = self.config.map_capability
            else:
                c = 0.0
            total += p * c
        return float(total)

    def choose(
        self,
        probs: Mapping[str, float],
        experts: Mapping[str, Expert],
        category_map: Mapping[str, Sequence[str]],
        *,
        quality: Callable[[list[str]], Mapping[str, float | None]] | None = None,
        quality_pick: Callable[[list[str]], str | None] | None = None,
        residency: Mapping[str, float] | None = None,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
        allowed: set[str] | None = None,
        max_cost_per_1k: float | None = None,
        apply_threshold: bool = True,
    ) -> Choice:
        """The expert for these category probabilities (steps 1-4 of the module docstring)."""
        cfg = self.config
        top_cat = max(probs, key=probs.get)
        mixed = self.mixed_categories(probs)

        def why_not(name: str) -> str | None:
            if name not in experts:
                return "not registered"
            return ineligible_reason(experts[name], allowed, prompt_tokens, max_tokens, max_cost_per_1k)

        excluded: dict[str, str] = {}
        cands = _eligible(_mapped_candidates(mixed, probs, experts, category_map), why_not, excluded)
        general_first: str | None = None
        for name in category_map.get(cfg.fallback_category, ()):
            reason = why_not(name)
            if reason is None:
                general_first = name
                break
            excluded.setdefault(name, reason)

        fallback_reason: str | None = None
        if apply_threshold and probs[top_cat] < cfg.confidence_threshold:
            fallback_reason = (f"low confidence: top category '{top_cat}' p={probs[top_cat]:.2f} "
                               f"< threshold {cfg.confidence_threshold:.2f}")
        elif not cands:
            fallback_reason = f"no eligible expert mapped to {', '.join(repr(c) for c in mixed)}"
        if fallback_reason and general_first is not None:
            cands.setdefault(general_first, []).append(cfg.fallback_category)
        elif fallback_reason and not cands:
            # nothing in the map can take it: any registered expert that satisfies the constraints
            cands = _eligible({name: [] for name in experts}, why_not, excluded)
            fallback_reason += f"; no eligible '{cfg.fallback_category}' expert, used the best registered one"
        elif fallback_reason:
            fallback_reason += f"; no eligible '{cfg.fallback_category}' expert, kept the best candidate"
        if not cands:
            detail = "; ".join(f"{n}: {r}" for n, r in sorted(excluded.items())) or "no experts registered"
            raise NoEligibleExpert(f"no expert can serve this request ({detail})", excluded)

        scored = self._scores(cands, probs, experts, category_map, quality, residency or {}, quality_pick)
        unmapped = _not_candidates(mixed, experts, category_map, set(cands), excluded)
        if fallback_reason and general_first is not None:
            return Choice(general_first, cfg.fallback_category, scored, excluded, fallback_reason, unmapped)
        return Choice(scored[0].expert, top_cat, scored, excluded, fallback_reason, unmapped)

    def _scores(self, cands: Mapping[str, list[str]], probs: Mapping[str, float], experts: Mapping[str, Expert],
                category_map: Mapping[str, Sequence[str]],
                quality: Callable[[list[str]], Mapping[str, float | None]] | None,
                residency: Mapping[str, float],
                quality_pick: Callable[[list[str]], str | None] | None = None) -> list[CandidateScore]:
        """Step 3: every eligible candidate's score, best first."""
        cfg = self.config
        names = list(cands)
        qual = dict(quality(names)) if quality is not None else {}
        with_records = [n for n in names if qual.get(n) is not None]
        pick = (quality_pick(with_records) if quality_pick is not None and cfg.quality_pick_bonus > 0
                and len(with_records) > 1 else None)
        costs = {n: float(experts[n].cost_per_1k_tokens) for n in names}
        max_cost = max(costs.values()) if costs else 0.0
        scored: list[CandidateScore] = []
        for name in names:
            cap = self.capability(experts[name], probs, category_map)
            q = qual.get(name)
            merit = cap if q is None else (1 - cfg.quality_weight) * cap + cfg.quality_weight * q
            res = float(min(1.0, max(0.0, residency.get(name, 0.0))))
            cost_term = costs[name] / max_cost if max_cost > 0 else 0.0
            score = merit - cfg.cost_weight * cost_term + cfg.residency_weight * res
            score += cfg.quality_pick_bonus if name == pick else 0.0
            scored.append(CandidateScore(expert=name, score=round(score, 6), capability=round(cap, 6),
                                         quality=None if q is None else round(q, 6), cost=costs[name],
                                         residency=res, categories=cands[name], quality_pick=name == pick))
        scored.sort(key=lambda c: -c.score)
        return scored


def _mapped_candidates(mixed: Sequence[str], probs: Mapping[str, float], experts: Mapping[str, Expert],
                       category_map: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Step 1: the experts mapped to the mixed categories (with the categories that brought each
    in), in category order then map order; with no category map at all, every registered expert
    (competing on capability)."""
    if not any(category_map.get(c) for c in probs):
        return {name: [] for name in experts}
    cands: dict[str, list[str]] = {}
    for cat in mixed:
        for name in category_map.get(cat, ()):
            cands.setdefault(name, []).append(cat)
    return cands


def _not_candidates(mixed: Sequence[str], experts: Mapping[str, Expert], category_map: Mapping[str, Sequence[str]],
                    competed: set[str], excluded: Mapping[str, str]) -> dict[str, str]:
    """Why an expert that declares a capability (> 0) in a category routed on did not compete: step 1
    takes only the experts the category map lists for those categories, so a newly added expert is
    not routed to until the map names it (``coe-registry add --map`` or ``map set``). Experts that
    competed, or that a hard constraint removed (see ``excluded``), are not repeated here."""
    out: dict[str, str] = {}
    for name, e in experts.items():
        if name in competed or name in excluded:
            continue
        cats = [c for c in mixed if e.capabilities.get(c, 0.0) > 0 and name not in category_map.get(c, ())]
        if cats:
            declared = ", ".join(f"{c}={e.capabilities[c]:g}" for c in cats)
            out[name] = f"not in the category map for {', '.join(cats)} (it declares {declared})"
    return out


def _eligible(cands: dict[str, list[str]], why_not: Callable[[str], str | None],
              excluded: dict[str, str]) -> dict[str, list[str]]:
    """Step 2: ``cands`` without those a hard constraint excludes (their reason goes to ``excluded``,
    where a reason found earlier is kept)."""
    out: dict[str, list[str]] = {}
    for name, cats in cands.items():
        reason = why_not(name)
        if reason is None:
            out[name] = cats
        else:
            excluded.setdefault(name, reason)
    return out
