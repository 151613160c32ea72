"""What the HTTP path adds to a request (issue 13 item 6), on the CPU service.

Starts the real service (``coe serve`` with ``demo: true``: local Ray, embedded Redis, the
SmolLM2 demo experts on the CPU) from a checkout (``--repo``, default this one, so the same
script measures another branch's code too), sends streaming chat requests one after another at
``--rate`` req/s at most with ``x-coe-timing: 1``, and splits each request's latency with the
service's wall-clock stamps (``coe_timing`` on the first token chunk, same machine):

* ``ingress_to_enqueue``: ingress receipt -> the pool replica starts the request (route, key and
  limit checks, the Serve handle call, tokenising the prompt);
* ``first_token_to_client``: the pool's first token -> the client has parsed it (pool -> ingress
  stream, SSE, Serve's HTTP proxy, the ``openai`` client);
* ``added``: their sum, the issue's measure (targets p50 <= 15 ms, p99 <= 50 ms);
* ``ttft``: time to first token at the client (includes generation);
* ``client_to_ingress``: the client sends -> the ingress's handler starts (Serve's proxy, the
  middlewares, body parsing): real, but outside the issue's measure.

``timelines_ms`` keeps every stamp of each request in ms after the client sent it: a copy of the
service with more stamps in its ``coe_timing`` shows where its time goes (how
``bench/results/http-overhead-cpu-2026-11-29/breakdown.json`` was made).

Two request kinds: ``named`` (``model`` is an expert: no classifier) and ``routed``
(``model: coe``: stage 1 encoder + stage 2). The first ``--warmup`` requests of each kind are
not counted. Each run is stored under its ``--label`` in ``--out`` (one JSON, labels merged), so
``--label before --repo <main copy>`` and ``--label after`` land side by side.

Run (under the shared lock): ``flock /tmp/coe-heavy.lock timeout 900 .venv/bin/python
bench/http_overhead.py --label after``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from service_gpu import Result, Service, machine, one_request, pct  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "Solve 12 * 7 and explain the steps.",
    "Summarise the causes of the First World War in two sentences.",
    "Give me three tips for a job interview.",
    "What does photosynthesis produce?",
    "Translate 'good morning' into Spanish.",
]
SEGMENTS = ("ingress_to_enqueue", "first_token_to_client", "added", "ttft", "client_to_ingress")


def segments(r: Result) -> dict[str, float] | None:
    """One request's segments in ms, from the service's stamps and the client's clock."""
    s = r.stamps
    if not r.ok or not s or None in (s.get("received"), s.get("enqueued"), s.get("first_token")):
        return None
    a = s["enqueued"] - s["received"]
    b = s["client_first"] - s["first_token"]
    return {"ingress_to_enqueue": 1e3 * a, "first_token_to_client": 1e3 * b, "added": 1e3 * (a + b),
            "ttft": 1e3 * r.ttft_s, "client_to_ingress": 1e3 * (s["received"] - s["client_sent"])}


def timeline(r: Result) -> dict[str, float]:
    """Every stamp of one request in ms after the client sent it, in time order (a service built
    with more stamps than the three of ``x-coe-timing`` shows where its time goes)."""
    s = r.stamps or {}
    t0 = s.get("client_sent")
    pairs = [(k, v) for k, v in s.items() if isinstance(v, (int, float)) and t0 is not None]
    return {k: round(1e3 * (v - t0), 2) for k, v in sorted(pairs, key=lambda kv: kv[1])}


def stats(rows: list[dict[str, float]]) -> dict[str, Any]:
    """p50 / p99 / max per segment (ms) over the measured requests."""
    out: dict[str, Any] = {"n": len(rows)}
    for k in SEGMENTS:
        xs = [r[k] for r in rows]
        out[k] = {"p50": round(pct(xs, 50), 2), "p99": round(pct(xs, 99), 2), "max": round(max(xs), 2)} if xs else None
    return out


async def sequential(base: str, model: str, n: int, rate: float, max_tokens: int) -> list[Result]:
    """``n`` streaming requests, one after another, started at most ``rate`` per second."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)
    out = []
    try:
        for i in range(n):
            t = time.perf_counter()
            out.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))
            await asyncio.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t)))
    finally:
        await client.close()
    return out


def config(path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"demo": True, "pool": {"device": "cpu", "num_cpus": 1},
                                    "router": {"num_cpus": 1}}))
    return path


def git_rev(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - a plain copy (git archive) has no history
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(args.repo).resolve()
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    svc = Service(home=home, port=args.port, log=home / f"serve-{args.label}.log", repo=repo)
    res: dict[str, Any] = {"label": args.label, "repo": str(repo), "commit": args.commit or git_rev(repo),
                           "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                           "rate_per_s": args.rate, "max_tokens": args.max_tokens,
                           "warmup_requests_per_kind": args.warmup, "kinds": {}}
    res["machine"]["cpus"] = __import__("os").cpu_count()
    try:
        res["serve_start_s"] = round(svc.start(config(home / "coe.yaml"), args.num_cpus), 1)
        for kind, model in (("named", args.model), ("routed", "coe")):
            rs = asyncio.run(sequential(svc.base, model, args.warmup + args.requests, args.rate, args.max_tokens))
            measured = rs[args.warmup:]
            rows = [s for s in map(segments, measured) if s is not None]
            res["kinds"][kind] = {"model": model, "requests": len(measured), "ok": sum(r.ok for r in measured),
                                  "errors": sorted({f"{r.status}: {r.error}" for r in rs if not r.ok})[:5],
                                  "experts": sorted({r.expert for r in measured if r.expert}),
                                  **stats(rows), "raw_ms": [{k: round(v, 3) for k, v in s.items()} for s in rows],
                                  "timelines_ms": [timeline(r) for r in measured]}
    except Exception as e:  # recorded: a run cut short still says what it saw
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        res["serve_exit"] = svc.stop()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="name of this run in the output (e.g. before / after)")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose coe runs (default: this one)")
    p.add_argument("--commit", default=None, help="recorded with the run (default: the checkout's HEAD)")
    p.add_argument("--model", default="smollm2-135m", help="the expert named by the 'named' requests")
    p.add_argument("--requests", type=int, default=40, help="measured requests per kind")
    p.add_argument("--warmup", type=int, default=5, help="requests per kind sent first and not counted")
    p.add_argument("--rate", type=float, default=2.0, help="at most this many requests start per second")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--num-cpus", type=int, default=4, help="Ray's logical CPUs (pool 1 + router 1 + ingress)")
    p.add_argument("--home", default="/tmp/coe-http-overhead", help="COE_HOME (router and demo weights cached)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"
                                        / f"http-overhead-cpu-{time.strftime('%Y-%m-%d')}.json"))
    args = p.parse_args()
    if args.rate <= 0 or args.rate > 2.0:
        p.error("--rate must be in (0, 2]: the issue's low load")
    res = run(args)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"what": "issue 13 item 6 on the CPU service: "
                                                            "bench/http_overhead.py", "runs": {}}
    doc["runs"][args.label] = res
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: {kk: v.get(kk) for kk in ("n", "ok", *SEGMENTS)} for k, v in res["kinds"].items()}
                     | {"error": res.get("error")}, indent=1))


if __name__ == "__main__":
    main()
