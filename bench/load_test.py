"""Bounded load test of a running coe on loopback: N concurrent clients for T seconds, mixed
streaming and non-streaming chat completions (httpx, asyncio). Every request's outcome is recorded.

Pass criteria (``ok`` in the JSON): zero 5xx and zero lost requests, i.e. every request got a
complete response (200 with a whole body / a stream ending in ``[DONE]``) or a 429. A client that
gets a 429 waits ``Retry-After`` (capped at ``--max-backoff``) before its next request.

    # against a coe that is already serving
    python bench/load_test.py --url http://127.0.0.1:8000 --clients 300 --duration 60

    # or let the script start a real `coe serve` (subprocess) with tiny random-weight experts,
    # its own COE_HOME and embedded Redis, on a free loopback port, and stop it afterwards
    python bench/load_test.py --launch --clients 300 --duration 60

Writes ``bench/results/load-<machine>-<date>.json`` (command, machine, date, config, counts per
status, p50/p90/p99 latency, time to first token, throughput) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

PROMPTS = [
    "Hi there, how are you today?",
    "Solve for x: 3x + 7 = 22. Show the algebra.",
    "Write a haiku about autumn leaves.",
    "Explain what a hash map is in one paragraph.",
    "What is the capital of France?",
    "Summarise the plot of Hamlet in two sentences.",
    "Extract the dates from: the meeting moved from May 3 to June 7.",
    "Why is the sky blue?",
]


@dataclass
class Outcome:
    t_start: float
    latency_s: float
    status: int  # HTTP status; 0 = lost (no response: connection error, timeout, cut stream)
    stream: bool
    model: str
    ttft_s: float | None = None
    completion_tokens: int = 0
    expert: str | None = None
    retry_after: str | None = None
    error: str | None = None


@dataclass
class Config:
    url: str
    clients: int
    duration_s: float
    stream_fraction: float
    max_tokens: int
    models: list[str]
    request_timeout_s: float
    max_backoff_s: float
    api_key: str | None = field(default=None, repr=False)
    seed: int = 0


# ------------------------------------------------------------------------------------------ client
async def one_request(client: httpx.AsyncClient, cfg: Config, rng: random.Random) -> Outcome:
    stream = rng.random() < cfg.stream_fraction
    model = rng.choice(cfg.models)
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(max(1, cfg.max_tokens // 2), cfg.max_tokens), "temperature": 0.7}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    out = Outcome(t_start=time.time(), latency_s=0.0, status=0, stream=stream, model=model)
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            out.status = r.status_code
            out.retry_after = r.headers.get("retry-after")
            out.expert = r.headers.get("x-coe-expert")
            if r.status_code == 200:
                data = r.json()
                out.completion_tokens = int(data["usage"]["completion_tokens"])
                if not data["choices"]:
                    out.status, out.error = 0, "200 without choices"
            else:
                out.error = _err_text(r.text)
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                out.status = r.status_code
                out.retry_after = r.headers.get("retry-after")
                out.expert = r.headers.get("x-coe-expert")
                if r.status_code != 200:
                    out.error = _err_text((await r.aread()).decode(errors="replace"))
                else:
                    done = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        payload = line[6:]
                        if payload == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:  # an error after the stream started: a server failure
                            out.status, out.error = 500, _err_text(payload)
                            break
                        if out.ttft_s is None and any((c.get("delta") or {}).get("content")
                                                      for c in chunk.get("choices") or []):
                            out.ttft_s = time.perf_counter() - t0
                        if chunk.get("usage"):
                            out.completion_tokens = int(chunk["usage"]["completion_tokens"])
                    if not done and out.status == 200:
                        out.status, out.error = 0, "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
        out.status, out.error = 0, f"{type(e).__name__}: {e}"[:300]
    out.latency_s = time.perf_counter() - t0
    return out


def _err_text(text: str) -> str:
    with contextlib.suppress(Exception):
        e = json.loads(text)["error"]
        return f"{e.get('code')}: {e.get('message')}"[:300]
    return text[:300]


async def client_loop(i: int, client: httpx.AsyncClient, cfg: Config, stop_at: float, outcomes: list[Outcome]) -> None:
    rng = random.Random(cfg.seed * 100_003 + i)
    await asyncio.sleep(rng.random() * min(2.0, cfg.duration_s / 10))  # ramp up over ~2 s
    while time.monotonic() < stop_at:
        o = await one_request(client, cfg, rng)
        outcomes.append(o)
        if o.status == 429:
            try:
                wait = float(o.retry_after or 1)
            except ValueError:
                wait = 1.0
            await asyncio.sleep(min(wait, cfg.max_backoff_s, max(0.0, stop_at - time.monotonic())))
        elif o.status == 0:
            await asyncio.sleep(0.1)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return round(v[lo] + (v[hi] - v[lo]) * (k - lo), 4)


def summarise(outcomes: list[Outcome], wall_s: float) -> dict:
    by_status = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == 200]

    def lat(sel: list[Outcome]) -> dict:
        xs = [o.latency_s for o in sel]
        return {"n": len(xs), "p50_s": pct(xs, 0.5), "p90_s": pct(xs, 0.9), "p99_s": pct(xs, 0.99),
                "max_s": round(max(xs), 4) if xs else None,
                "mean_s": round(statistics.fmean(xs), 4) if xs else None}

    ttft = [o.ttft_s for o in ok if o.stream and o.ttft_s is not None]
    rejected = [o for o in outcomes if o.status == 429]
    errors = Counter(f"{o.status} {o.error}" for o in outcomes if o.status not in (200, 429))
    return {
        "requests": len(outcomes),
        "by_status": {str(k): v for k, v in sorted(by_status.items())},
        "ok": len(ok),
        "rejected_429": len(rejected),
        "server_errors_5xx": sum(v for k, v in by_status.items() if k >= 500),
        "client_errors_4xx_other": sum(v for k, v in by_status.items() if 400 <= k < 500 and k != 429),
        "lost": by_status.get(0, 0),
        "429_with_retry_after": sum(1 for o in rejected if o.retry_after),
        "latency_ok": lat(ok),
        "latency_ok_stream": lat([o for o in ok if o.stream]),
        "latency_ok_nonstream": lat([o for o in ok if not o.stream]),
        "latency_429": lat(rejected),
        "ttft_stream": {"n": len(ttft), "p50_s": pct(ttft, 0.5), "p99_s": pct(ttft, 0.99)},
        "throughput": {
            "wall_s": round(wall_s, 2),
            "ok_requests_per_s": round(len(ok) / wall_s, 2) if wall_s else None,
            "all_responses_per_s": round(len(outcomes) / wall_s, 2) if wall_s else None,
            "completion_tokens_per_s": round(sum(o.completion_tokens for o in ok) / wall_s, 1) if wall_s else None,
        },
        "experts": dict(Counter(o.expert for o in ok)),
        "error_samples": dict(errors.most_common(10)),
    }


async def run_load(cfg: Config) -> tuple[dict, list[Outcome]]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.clients + 16, max_keepalive_connections=cfg.clients + 16)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, limits=limits, timeout=timeout) as client:
        t0 = time.monotonic()
        stop_at = t0 + cfg.duration_s
        await asyncio.gather(*(client_loop(i, client, cfg, stop_at, outcomes) for i in range(cfg.clients)))
        wall = time.monotonic() - t0
    return summarise(outcomes, wall), outcomes


# ------------------------------------------------------------------------------------------ launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    mem = None
    with contextlib.suppress(OSError, AttributeError):
        m = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
        mem = round(int(m.group(1)) / 1024 / 1024, 1)
    return {"os": platform.platform(), "cpu": cpu,
            "cpus_visible": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "mem_gib": mem, "python": platform.python_version()}


class Launched:
    """A real ``coe serve`` subprocess with tiny random-weight experts, on its own COE_HOME."""

    def __init__(self, experts: int, num_cpus: int, pool_options: dict, limits: dict, ingress: dict):
        self.experts, self.num_cpus = experts, num_cpus
        self.pool_options, self.limits, self.ingress = pool_options, limits, ingress
        self.home = Path(tempfile.mkdtemp(prefix="coe-load-"))
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "serve.log"

    def start(self, timeout_s: float = 600) -> str:
        env = dict(os.environ, COE_HOME=str(self.home), HF_HUB_OFFLINE="1")
        env.pop("COE_REDIS_URL", None)
        env.pop("COE_NAMESPACE", None)
        cache = Path(os.environ.get("COE_TEST_CACHE") or REPO / ".coe-test-home")
        (cache / "router").mkdir(parents=True, exist_ok=True)
        (self.home / "router").symlink_to(cache / "router", target_is_directory=True)  # trained router reused
        os.environ.update(COE_HOME=str(self.home))
        from coe.engines.synthetic import build_llama_folder
        from expert_registry.embedded import ensure_embedded
        from expert_registry.spec import Expert, GenerationDefaults
        from expert_registry.store import RedisRegistry

        folder = build_llama_folder(self.home / "tiny-model", seed=0)
        reg = RedisRegistry(ensure_embedded().url)
        names = [f"tiny-{i}" for i in range(self.experts)]
        cats = ["general", "math", "coding", "writing", "stem", "reasoning", "roleplay", "extraction", "humanities"]
        for i, n in enumerate(names):
            reg.add(Expert(name=n, model=str(folder), engine="hf", dtype="float32", max_context=512,
                           generation=GenerationDefaults(max_tokens=16, temperature=0.7, top_p=1.0),
                           capabilities={c: 0.5 for c in cats[i::self.experts]}, tags=["load-test"]))
        reg.set_map({c: [names[j % len(names)]] for j, c in enumerate(cats)})
        cfg = {"host": "127.0.0.1", "port": self.port,
               "pool": {"device": "cpu", "num_cpus": 0.5, "options": self.pool_options}}
        if self.limits:
            cfg["limits"] = self.limits
        if self.ingress:
            cfg["ingress"] = self.ingress
        (self.home / "serve.yaml").write_text(json.dumps(cfg))
        coe = shutil.which("coe", path=str(Path(sys.executable).parent)) or "coe"
        self.proc = subprocess.Popen([coe, "serve", "-c", str(self.home / "serve.yaml"), "--num-cpus",
                                      str(self.num_cpus), "--dashboard-port", str(_free_port())],
                                     env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coe serve exited with {self.proc.returncode}; see {self.log}:\n"
                                   + self.log.read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    # one request per expert so that the measured minute does not include first loads
                    for n in names:
                        httpx.post(url + "/v1/chat/completions", timeout=300,
                                   json={"model": n, "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 2})
                    return url
            time.sleep(1)
        raise RuntimeError(f"coe serve did not become healthy in {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(Exception):
            from expert_registry.embedded import stop_embedded

            stop_embedded()
        shutil.rmtree(self.home, ignore_errors=True)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("COE_URL_BASE", "http://127.0.0.1:8000"))
    ap.add_argument("--launch", action="store_true", help="start a real `coe serve` with tiny experts first")
    ap.add_argument("--experts", type=int, default=3, help="tiny experts to register with --launch")
    ap.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs for --launch")
    ap.add_argument("--pool-options", default='{"max_wait_ms": 50, "max_queue_per_expert": 64, "max_batch_size": 8}',
                    help="PoolConfig fields (JSON) for --launch")
    ap.add_argument("--limits", default="{}", help="limits section (JSON) for --launch")
    ap.add_argument("--ingress", default="{}", help="ingress section (JSON) for --launch")
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--stream-fraction", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--models", default="coe,coe/math,coe/coding,tiny-0",
                    help="comma-separated model names to mix (with --url, use your experts' names)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="client-side timeout per request")
    ap.add_argument("--max-backoff", type=float, default=5.0, help="cap on honouring Retry-After")
    ap.add_argument("--api-key", default=os.environ.get("COE_API_KEY"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    args = ap.parse_args(argv)

    launched = None
    url = args.url
    try:
        if args.launch:
            launched = Launched(args.experts, args.num_cpus, json.loads(args.pool_options), json.loads(args.limits),
                                json.loads(args.ingress))
            print(f"starting coe serve with {args.experts} tiny experts (log: {launched.log}) …", flush=True)
            url = launched.start()
            print(f"coe is serving at {url}", flush=True)
        cfg = Config(url=url, clients=args.clients, duration_s=args.duration, stream_fraction=args.stream_fraction,
                     max_tokens=args.max_tokens, models=[m for m in args.models.split(",") if m],
                     request_timeout_s=args.request_timeout, max_backoff_s=args.max_backoff, api_key=args.api_key,
                     seed=args.seed)
        print(f"load: {cfg.clients} clients for {cfg.duration_s:.0f} s against {url} …", flush=True)
        load_before = os.getloadavg()
        summary, outcomes = asyncio.run(run_load(cfg))
        load_after = os.getloadavg()
    finally:
        if launched is not None:
            launched.stop()

    passed = summary["server_errors_5xx"] == 0 and summary["lost"] == 0
    now = datetime.now(timezone.utc)
    m = machine()
    m["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    m["loadavg_1_5_15_after"] = [round(x, 2) for x in load_after]
    doc = {
        "bench": "load_test",
        "ok": passed,
        "criteria": "zero 5xx and zero lost requests (every request answered: 200 or 429)",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])]),
        "date": now.isoformat(timespec="seconds"),
        "machine": m,
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {
            "launch": bool(args.launch), "experts": args.experts if args.launch else None,
            "ray_num_cpus": args.num_cpus if args.launch else None,
            "pool_options": json.loads(args.pool_options) if args.launch else None,
            "limits": json.loads(args.limits) if args.launch else None,
            "ingress": json.loads(args.ingress) if args.launch else None},
        "summary": summary,
        "note": args.note,
    }
    out = args.out or RESULTS / f"load-{'cpu' if not m['cpu'] else re.sub(r'[^a-z0-9]+', '-', m['cpu'].lower())[:40].strip('-')}-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    s = summary
    print(json.dumps({"ok": passed, "requests": s["requests"], "by_status": s["by_status"], "lost": s["lost"],
                      "p50_s": s["latency_ok"]["p50_s"], "p99_s": s["latency_ok"]["p99_s"],
                      "ok_rps": s["throughput"]["ok_requests_per_s"]}, indent=2))
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
