"""``coe router …``: train, explain and evaluate the router (typer + rich).

Errors a user can cause (bad data file, unknown category, missing router folder) print one line
naming the file and line, and exit with code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from routers.errors import RouterError

app = typer.Typer(help="Train, explain and evaluate the two-stage router.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
err = Console(stderr=True)
out = Console()


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
    raise typer.Exit(2)


def _load_router(path: Optional[Path]):
    from routers.router import Router

    return Router.load(path) if path else Router.default()


def _read_experts_file(path: Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A YAML/JSON file: a list of expert specs, or ``{experts: [...], category_map: {...}}``.
    Without a map, each expert is mapped to the categories it declares capabilities for."""
    import yaml

    from expert_registry.spec import parse_category_map, parse_expert

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RouterError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise RouterError(f"{path}: invalid YAML ({e})") from None
    items = doc.get("experts", []) if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise RouterError(f"{path}: expected a list of experts or a mapping with 'experts'")
    experts = {}
    for i, item in enumerate(items):
        e = parse_expert(item, source=f"{path}: experts[{i}]")
        experts[e.name] = e
    cmap = parse_category_map(doc.get("category_map"), source=f"{path}: category_map") if isinstance(doc, dict) else {}
    if not cmap:
        for e in sorted(experts.values(), key=lambda e: -max(e.capabilities.values() or [0])):
            for cat in e.capabilities:
                cmap.setdefault(cat, []).append(e.name)
    return experts, cmap


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="JSONL, one {\"prompt\", \"category\"} per line"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: state_dir('router')/trained-<hash>)"),
    quality: Optional[Path] = typer.Option(None, "--quality", help="JSONL eval records {prompt, expert, score} for the quality predictor"),
    encoder: str = typer.Option("default", help="sentence-transformers folder or name ('default': packaged MiniLM)"),
    cv: bool = typer.Option(False, "--cv", help="choose the regularisation C by 5-fold cross-validation"),
    holdout: float = typer.Option(0.2, help="stratified fraction held out to report accuracy (0: none)"),
) -> None:
    """Train a router (stage-1 classifier, optional quality predictor) on your own data."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from routers.data import fingerprint, read_eval_records, read_labeled
    from routers.encoder import get_encoder
    from routers.router import DEFAULT_C, Router

    try:
        records = read_labeled(data)
        qrecs = read_eval_records(quality) if quality else None
        enc = get_encoder(encoder)
        n_embed = len(records) + (len(qrecs) if qrecs else 0)
        with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=False) as prog:
            task = prog.add_task("embed", total=len(records))
            router = Router.train(records, enc, quality_records=qrecs, holdout=holdout,
                                  C=None if cv else DEFAULT_C, progress=lambda n: prog.advance(task, n),
                                  source=str(data))
        if out_dir is None:
            from expert_registry.paths import state_dir

            out_dir = state_dir("router") / f"trained-{fingerprint(records)[:12]}"
        path = router.save(out_dir)
    except (RouterError, ValueError) as e:
        _fail(e)
    m = router.info.get("metrics", {}).get("holdout")
    msg = f"trained on {len(records)} prompts ({n_embed} embedded), {len(router.categories)} categories -> {path}"
    if m:
        msg += f"\nholdout ({m['n']} prompts): accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"
    out.print(msg, highlight=False)


@app.command()
def explain(
    prompt: str = typer.Argument(..., help="the prompt to route"),
    model: str = typer.Option("coe", help="'coe', 'coe/<category>' or an expert name"),
    router_dir: Optional[Path] = typer.Option(None, "--router", help="router folder (default: the seed-trained default)"),
    experts_file: Optional[Path] = typer.Option(None, "--experts", help="YAML/JSON with experts (+ category_map)"),
    registry: bool = typer.Option(False, "--registry", help="read experts and the category map from the registry (Redis)"),
    max_tokens: Optional[int] = typer.Option(None, help="requested new tokens (for the context-length check)"),
    as_json: bool = typer.Option(False, "--json", help="print the RoutingDecision as JSON"),
) -> None:
    """Show stage-1 category probabilities and (with experts) stage-2 candidate scores."""
    try:
        router = _load_router(router_dir)
        experts: dict[str, Any] = {}
        cmap: dict[str, list[str]] = {}
        if experts_file:
            experts, cmap = _read_experts_file(experts_file)
        elif registry:
            from expert_registry.embedded import resolve_redis_url
            from expert_registry.store import RedisRegistry

            snap = RedisRegistry(resolve_redis_url()).snapshot()
            experts, cmap = dict(snap.experts), dict(snap.category_map)
        probs = router.classify(prompt)
        decision = None
        if experts:
            decision = router.route(prompt, model, experts, cmap, max_tokens=max_tokens,
                                    prompt_tokens=router.encoder.count_tokens(prompt))
    except Exception as e:  # noqa: BLE001 - registry/spec errors are one-liners too
        if isinstance(e, (RouterError, ValueError)) or type(e).__module__.startswith("expert_registry"):
            _fail(e)
        raise
    if as_json:
        doc = {"categories": dict(sorted(probs.items(), key=lambda kv: -kv[1]))}
        if decision is not None:
            doc["decision"] = decision.model_dump()
        out.print_json(json.dumps(doc))
        return
    t = Table(title="stage 1: category probabilities")
    t.add_column("category")
    t.add_column("prob", justify="right")
    for c, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        t.add_row(c, f"{p:.3f}")
    out.print(t)
    if decision is None:
        out.print("(no experts given: stage 1 only; use --experts FILE.yaml or --registry for stage 2)")
        return
    t2 = Table(title=f"stage 2: candidates (model={model!r})")
    for col in ("expert", "score", "capability", "quality", "cost", "residency", "via"):
        t2.add_column(col, justify="left" if col in ("expert", "via") else "right")
    for c in decision.candidates:
        t2.add_row(c.expert, f"{c.score:.3f}", f"{c.capability:.3f}", "-" if c.quality is None else f"{c.quality:.3f}",
                   f"{c.cost:g}", f"{c.residency:.2f}", ",".join(c.categories))
    out.print(t2)
    for name, why in decision.excluded.items():
        out.print(f"excluded {name}: {why}", highlight=False)
    for name, why in decision.not_candidates.items():
        out.print(f"not a candidate {name}: {why}", highlight=False)
    line = f"-> expert [bold]{decision.expert}[/bold] (category {decision.category}, {decision.forced})"
    if decision.fallback_reason:
        line += f"  fallback: {decision.fallback_reason}"
    out.print(line + f"  in {decision.route_ms:.1f} ms")


def _stage2_eval(router, path: Path) -> dict[str, Any]:
    """Routed vs always-the-best-single vs oracle on held-out evaluation records: each prompt is
    routed among the experts recorded for it, and scored by the recorded score of the choice."""
    from routers.data import read_eval_records

    if router.quality is None:
        raise RouterError("this router has no quality predictor; add records with "
                          "'coe router quality add RECORDS.jsonl --router DIR' first")
    recs = read_eval_records(path)
    by_prompt: dict[str, dict[str, list[float]]] = {}
    for r in recs:
        by_prompt.setdefault(r.prompt, {}).setdefault(r.expert, []).append(r.score)
    prompts = list(by_prompt)
    X = router.encoder.encode(prompts)
    best = router.quality.best_expert()
    scored = [{e: float(np.mean(v)) for e, v in by_prompt[p].items()} for p in prompts]
    picks: list[str | None] = [None] * len(prompts)
    by_set: dict[tuple[str, ...], list[int]] = {}  # one batched decision per set of scored experts
    for i, got in enumerate(scored):
        by_set.setdefault(tuple(got), []).append(i)
    for names, rows in by_set.items():
        for i, pick in zip(rows, router.quality.choose_many(X[rows], list(names))):
            picks[i] = pick
    routed, single, oracle, moved = [], [], [], 0
    for got, pick in zip(scored, picks):
        pick = pick or next(iter(got))
        routed.append(got[pick])
        single.append(got.get(best, np.nan))
        oracle.append(max(got.values()))
        moved += pick != best
    single_arr = np.array(single)
    return {"n_prompts": len(prompts), "n_records": len(recs), "best_single_expert": best,
            "routed": float(np.mean(routed)), "best_single": float(np.nanmean(single_arr)) if (~np.isnan(single_arr)).any() else None,
            "oracle": float(np.mean(oracle)), "share_routed_away_from_best": moved / max(1, len(prompts)),
            "z": router.quality.z, "route_k": router.quality.route_k, "route_tau": router.quality.route_tau,
            "route_cv": router.quality.fit_info.get("route_cv"), "k": router.quality.k, "tau": router.quality.tau,
            "prior_weight": router.quality.prior_weight}


@app.command("eval")
def eval_(
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL, one {\"prompt\", \"category\"} per line (stage 1)"),
    quality: Optional[Path] = typer.Option(None, "--quality", help="held-out JSONL eval records {prompt, expert, score} (stage 2)"),
    router_dir: Optional[Path] = typer.Option(None, "--router", help="router folder (default: the seed-trained default)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
    latency_n: int = typer.Option(0, help="time at most this many single queries (0: all)"),
) -> None:
    """Stage 1 (--data): accuracy, macro-F1, recall, calibration (ECE, confidently wrong, proposed
    fallback threshold), latency. Stage 2 (--quality): routed vs best single expert vs oracle."""
    from routers.calibration import calibration_report
    from routers.data import read_labeled
    from routers.router import _metrics

    if data is None and quality is None:
        _fail(RouterError("give --data (stage 1, labelled prompts) and/or --quality (stage 2, eval records)"))
    res: dict[str, Any] = {}
    try:
        router = _load_router(router_dir)
        if quality is not None:
            res["stage2"] = _stage2_eval(router, quality)
        records = read_labeled(data, labels=router.categories) if data is not None else []
    except (RouterError, ValueError) as e:
        _fail(e)
    if records:
        prompts = [r.prompt for r in records]
        y = [r.category for r in records]
        router.classify(prompts[0])  # warm-up: first ORT run allocates
        t0 = time.perf_counter()
        P = router.classify_batch(prompts)
        batch_s = time.perf_counter() - t0
        pred = [router.categories[i] for i in P.argmax(1)]
        lat = []
        for p in prompts[: latency_n or len(prompts)]:
            t = time.perf_counter()
            router.classify(p)
            lat.append((time.perf_counter() - t) * 1e3)
        m = _metrics(y, pred, router.categories)
        cal = calibration_report(P, [router.categories.index(c) for c in y])
        res.update({
            "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "per_category_recall": m["per_category_recall"], "confusion": m["confusion"],
            "calibration": cal, "current_threshold": router.policy.config.confidence_threshold,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "batch_qps": len(prompts) / batch_s,
        })
    res.update({"router": str(router.path) if router.path else None, "encoder": router.encoder.id,
                "backend": router.encoder.backend})
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
        return
    if records:
        cal = res["calibration"]
        th = cal["proposed_threshold"]
        out.print(f"{res['n']} prompts: accuracy {res['accuracy']:.3f}, macro-F1 {res['macro_f1']:.3f}; "
                  f"latency p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms; batch {res['batch_qps']:.0f} q/s")
        out.print(f"calibration: ECE {cal['ece']:.3f}, confidently wrong (p >= 0.9) {cal['confidently_wrong']:.1%}; "
                  f"proposed fallback threshold {th['threshold']:.2f} (now {res['current_threshold']:.2f}): "
                  f"{th['fallback_share']:.0%} of prompts to the fallback, accuracy above it {th['accuracy_above']:.3f}",
                  highlight=False)
        t = Table(title="recall per category")
        t.add_column("category")
        t.add_column("recall", justify="right")
        for c, r in res["per_category_recall"].items():
            t.add_row(c, f"{r:.3f}")
        out.print(t)
    if "stage2" in res:
        s2 = res["stage2"]
        single = "n/a" if s2["best_single"] is None else f"{s2['best_single']:.3f}"
        out.print(f"stage 2 on {s2['n_prompts']} prompts: routed {s2['routed']:.3f}, always {s2['best_single_expert']} "
                  f"{single}, oracle {s2['oracle']:.3f} ({s2['share_routed_away_from_best']:.0%} routed away from it)",
                  highlight=False)


quality_app = typer.Typer(help="Stage-2 evaluation records of a trained router.", no_args_is_help=True)
app.add_typer(quality_app, name="quality")


@quality_app.command("add")
def quality_add(
    records: Path = typer.Argument(..., help="JSONL eval records {prompt, expert, score}"),
    router_dir: Optional[Path] = typer.Option(None, "--router", help="router folder to update (default: the default router, needs --out)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="write the updated router here instead of in place"),
    retune: bool = typer.Option(True, help="re-choose k, tau, prior weight and the routing confidence z"),
) -> None:
    """Append evaluation records to a router's quality predictor without retraining stage 1."""
    from routers.data import read_eval_records

    try:
        if router_dir is None and out_dir is None:
            raise RouterError("the default router is read-only: give --router DIR, or --out DIR for a copy")
        router = _load_router(router_dir)
        recs = read_eval_records(records)
        updated = router.with_quality(recs, retune=retune)
        path = updated.save(out_dir or router_dir)
    except (RouterError, ValueError) as e:
        _fail(e)
    q = updated.quality
    out.print(f"added {len(recs)} records -> {path}: {len(q.experts)} records over {q.n_prompts} prompts, "
              f"{len(q.known_experts)} experts (k={q.k}, tau={q.tau:g}, prior {q.prior_weight:g}, z {q.z:g})",
              highlight=False)
