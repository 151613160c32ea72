"""The real service on a GPU, end to end: ``coe serve`` (local Ray, embedded Redis) with vLLM experts
registered through ``coe-registry``, driven over HTTP by the ``openai`` client.

What a platform engineer does on day one, scripted so that one device call runs all of it and
writes what it saw under ``--out``:

1. write Llama-shaped model folders (``coe.engines.vllm_models``; weights: vLLM's dummy loader, or
   random safetensors written here with ``--weights random``);
2. start ``coe serve --config <cfg>`` as a subprocess and wait for ``/healthz``;
3. ``coe-registry add`` N vLLM experts (HBM budget for K < N of them);
4. send OpenAI chat requests (streaming, TTFT at the client) to every expert, by name and through
   the router; hot-add one more expert and remove one while traffic runs;
5. sample the device's used memory (NVML) throughout and record the peak above the level before
   the service started, against the HBM budget;
6. scrape ``/metrics`` and stop the service with SIGINT.

Run: ``python bench/service_gpu.py e2e --shape 3b --experts 6 --hbm-experts 2 --out DIR``.
Nothing here is a timed test: it records what happened, with machine and date, in ``DIR/*.json``,
and what a run must show in its ``checks`` (every request answered, the hot-added expert answered,
the removed one gone, the device's peak within the HBM budget); ``tests/serve/test_service_gpu.py``
runs it under ``pytest -m gpu`` and asserts on them. ``--plan`` prints the service config and the
``coe-registry add`` commands it would run, and exits: no service, no GPU (a CPU test checks it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPE_VOCAB = {"8b": 128256, "3b": 128256, "1b": 128256, "tiny": 4096}
# a request that names an expert whose engine is still starting waits this long (X-Coe-Wait-Timeout):
# on one GPU the engines start one after another, a few minutes for six 3B engines
WAIT_FOR_START_S = 600


# ------------------------------------------------------------------------------------------- memory
class MemorySampler:
    """Samples the GPU's used bytes every ``period_s`` (NVML, so it sees every process on the device)."""

    def __init__(self, period_s: float = 0.05, index: int = 0):
        self.period_s = period_s
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self._h).total)
        except Exception:  # no GPU (a CPU dry run of the script): nothing to sample
            self._nvml = None
            self.total = 0
        self.baseline = self.used()
        self.peak = self.baseline
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._h).used) if self._nvml else 0

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            u = self.used()
            self.peak = max(self.peak, u)
            if not self.samples or abs(u - self.samples[-1][1]) > (256 << 20):
                self.samples.append((round(time.perf_counter() - t0, 2), u))
            self._stop.wait(self.period_s)

    def __enter__(self) -> "MemorySampler":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


class ResponsivenessProbe:
    """Polls the service's cheap endpoints from a thread while engines start (issue 23 item 2: the
    pool replica's event loop must not block on a start, a wake or a copy) and keeps each answer's
    latency; ``report()`` gives n, p50, p99 and max per endpoint, and the failures (a timeout or an
    error status counts as one). ``/v1/models`` asks the pool replica for its state; ``/readyz``
    asks every deployment."""

    PATHS = ("/v1/models", "/readyz")

    def __init__(self, base: str, period_s: float = 0.25, timeout_s: float = 10.0):
        self.base, self.period_s, self.timeout_s = base, period_s, timeout_s
        self.seen: dict[str, list[float]] = {p: [] for p in self.PATHS}
        self.failures: dict[str, list[str]] = {p: [] for p in self.PATHS}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as c:
            while not self._stop.is_set():
                for path in self.PATHS:
                    t = time.perf_counter()
                    try:
                        r = c.get(self.base + path)
                        dt = time.perf_counter() - t
                        self.seen[path].append(dt)
                        if r.status_code >= 500:
                            self.failures[path].append(f"{r.status_code} after {dt:.2f} s")
                    except Exception as e:  # noqa: BLE001 - a timeout is what this looks for
                        self.failures[path].append(f"{type(e).__name__} after {time.perf_counter() - t:.2f} s")
                self._stop.wait(self.period_s)

    def __enter__(self) -> "ResponsivenessProbe":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def report(self) -> dict[str, Any]:
        return {p: {"n": len(xs), "p50_ms": _ms(pct(xs, 50)), "p99_ms": _ms(pct(xs, 99)),
                    "max_ms": _ms(max(xs)) if xs else None, "failures": self.failures[p][:10]}
                for p, xs in self.seen.items()}


# ------------------------------------------------------------------------------------------- service
@dataclass
class Service:
    """``coe serve`` as a subprocess, with the environment every later CLI call shares."""

    home: Path
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    #: the checkout whose code runs (``bench/http_overhead.py`` runs another branch's copy to compare)
    repo: Path = REPO

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: Path, num_cpus: int) -> float:
        self.env = {**os.environ, "COE_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), self.env.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coe", "serve", "--config", str(config), "--port", str(self.port),
             "--num-cpus", str(num_cpus)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=self.env, cwd=self.repo, start_new_session=True)
        self.wait_ready(timeout_s=600)
        return time.perf_counter() - t0

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"coe serve exited with {self.proc.returncode}; see {self.log}")
            try:
                r = httpx.get(f"{self.base}/healthz", timeout=2)
                if r.status_code == 200 and "coe is serving" in self.log.read_text(errors="replace"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"coe serve not ready in {timeout_s} s; see {self.log}")

    def cli(self, *args: str, module: str = "expert_registry", check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", module, *args], env=self.env, cwd=self.repo, capture_output=True,
                           text=True, timeout=300)
        if check and r.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(args)} -> {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


# ------------------------------------------------------------------------------------------- traffic
@dataclass
class Result:
    model: str
    ok: bool
    status: int | None
    ttft_s: float | None
    total_s: float
    tokens: int
    expert: str | None
    error: str | None = None
    #: what the HTTP path added to this request, from the service's ``x-coe-timing`` stamps:
    #: (pool enqueue - ingress receipt) + (client receives first token - pool's first token)
    added_s: float | None = None
    #: the service's stamps (received, enqueued, first_token) plus ``client_sent`` and ``client_first``:
    #: wall clock when the client sent the request and read the first token (``bench/http_overhead.py``)
    stamps: dict[str, float] | None = None


def added_by_http(stamps: dict[str, Any] | None, client_first_at: float) -> float | None:
    """Seconds the HTTP path added to one request, from the service's wall-clock stamps (same
    machine): ingress receipt -> pool enqueue, plus pool first token -> client."""
    if not stamps or None in (stamps.get("received"), stamps.get("enqueued"), stamps.get("first_token")):
        return None
    return (stamps["enqueued"] - stamps["received"]) + (client_first_at - stamps["first_token"])


async def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> Result:
    import openai

    t0 = time.perf_counter()
    sent = time.time()
    ttft = None
    added = None
    stamps = None
    n = 0
    expert = None
    try:
        # ignore_eos: dummy weights often say end-of-sequence first, and an answer of 0 tokens does
        # not show the expert served anything (it is counted as a failure below)
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"x-coe-timing": "1", "x-coe-wait-timeout": str(WAIT_FOR_START_S)})
        expert = raw.headers.get("x-coe-expert")
        stream = raw.parse()
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    client_first = time.time()
                    got = (chunk.model_extra or {}).get("coe_timing")
                    added = added_by_http(got, client_first)
                    stamps = ({**got, "client_sent": sent, "client_first": client_first}
                              if isinstance(got, dict) else None)
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        if n == 0:
            return Result(model, False, 200, ttft, time.perf_counter() - t0, n, expert, "answered with 0 completion tokens")
        return Result(model, True, 200, ttft, time.perf_counter() - t0, n, expert, None, added, stamps)
    except openai.APIStatusError as e:
        return Result(model, False, e.status_code, ttft, time.perf_counter() - t0, n, expert, str(e)[:300])
    except Exception as e:  # connection errors etc.
        return Result(model, False, None, ttft, time.perf_counter() - t0, n, expert, f"{type(e).__name__}: {e}"[:300])


async def replay_http(base: str, trace: list[Any], names: list[str], max_tokens: int) -> tuple[list[Result], float]:
    """The trace through the service's HTTP endpoint (openai client, streaming), arrivals as traced."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=600)
    t0 = time.perf_counter()

    async def at(r: Any) -> Result:
        await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t0)))
        return await one_request(client, names[r.expert], r.prompt, max_tokens)

    out = await asyncio.gather(*(at(r) for r in trace))
    wall = time.perf_counter() - t0
    await client.close()
    return list(out), wall


async def replay_pool(trace: list[Any], names: list[str], max_tokens: int) -> tuple[list[Result], float]:
    """The same trace straight to the ExpertPool deployment through a Serve handle (no HTTP, no
    ingress, no router): the pool-level comparator, on the very engines the service runs."""
    from ray import serve

    from coe.engines.base import ChatMessage, SamplingParams
    from coe.generate_request import GenerateRequest

    handle = serve.get_deployment_handle("ExpertPool", app_name="coe")
    t0 = time.perf_counter()

    async def at(r: Any) -> Result:
        await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t0)))
        name = names[r.expert]
        req = GenerateRequest(messages=[ChatMessage(role="user", content=r.prompt)],
                              sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        s = time.perf_counter()
        ttft, n, err = None, 0, None
        try:
            async for item in handle.options(multiplexed_model_id=name, stream=True).generate.remote(req):
                kind = item.get("type")
                if kind == "error":
                    err = str(item.get("message"))[:300]
                elif kind == "chunk":
                    if ttft is None and item.get("text"):
                        ttft = time.perf_counter() - s
                    n = item.get("completion_tokens") or n + 1
        except Exception as e:
            err = f"{type(e).__name__}: {e}"[:300]
        return Result(name, err is None, None, ttft, time.perf_counter() - s, n, name, err)

    out = await asyncio.gather(*(at(r) for r in trace))
    return list(out), time.perf_counter() - t0


def throughput(rs: list[Result], wall: float) -> dict[str, Any]:
    d = summarize(rs)
    d["wall_s"] = round(wall, 2)
    d["output_tok_s"] = round(d["tokens"] / wall, 1) if wall else None
    return d


def overhead(base: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Issue 13 item 6: the same seeded traces through HTTP and through the pool handle.

    * low load (``--low-rate`` req/s, one resident expert): added latency per request = HTTP TTFT
      minus pool TTFT (p50 against p50, p99 against p99 of the two runs);
    * the serving workload (Zipf over all experts at ``--rate``): output tokens/s, HTTP / pool."""
    import ray

    sys.path.insert(0, str(REPO / "bench"))
    from serve_gpu import make_trace

    join_service_ray(Path(args.workdir) / "home")
    vocab = SHAPE_VOCAB[args.shape]
    low = [dataclass_replace(r, expert=0) for r in make_trace(args.low_requests, args.low_rate, 1, vocab_size=vocab,
                                                              prompt_tokens=128, seed=11)]
    res: dict[str, Any] = {}
    pool_low, _ = asyncio.run(replay_pool(low, names, args.max_tokens))
    http_low, _ = asyncio.run(replay_http(base, low, names, args.max_tokens))
    pl, hl = summarize(pool_low), summarize(http_low)
    res["low_load"] = {"rate": args.low_rate, "pool": pl, "http": hl}
    added = [r.added_s for r in http_low if r.added_s is not None]
    if added:  # the measure: per-request stamps, ingress receipt -> enqueue + first token -> client
        res["low_load"]["per_request_added_ms"] = {"n": len(added), "p50": round(1000 * pct(added, 50), 2),
                                                   "p99": round(1000 * pct(added, 99), 2),
                                                   "max": round(1000 * max(added), 2)}
    if pl["ttft_p50_s"] is not None and hl["ttft_p50_s"] is not None:
        res["low_load"]["added_ms_p50"] = round(1000 * (hl["ttft_p50_s"] - pl["ttft_p50_s"]), 1)
        res["low_load"]["added_ms_p99"] = round(1000 * (hl["ttft_p99_s"] - pl["ttft_p99_s"]), 1)
    trace = make_trace(args.serve_requests, args.rate, len(names), zipf_s=1.0, prompt_tokens=128,
                       vocab_size=vocab, seed=0)
    asyncio.run(replay_pool(trace[: len(names) * 2], names, 8))  # warm-up, not measured
    p_rs, p_wall = asyncio.run(replay_pool(trace, names, args.max_tokens))
    h_rs, h_wall = asyncio.run(replay_http(base, trace, names, args.max_tokens))
    p, h = throughput(p_rs, p_wall), throughput(h_rs, h_wall)
    res["serving"] = {"rate": args.rate, "requests": len(trace), "pool": p, "http": h,
                      "http_over_pool": round(h["output_tok_s"] / p["output_tok_s"], 3)
                      if p["output_tok_s"] and h["output_tok_s"] else None}
    ray.shutdown()
    return res


def join_service_ray(home: Path) -> None:
    """Connect this process to the Ray that ``coe serve`` started under ``home`` (its COE_HOME): the
    address it recorded in ``home/ray/address`` (loopback only, single machine), never a cluster Ray
    would find by itself."""
    import ray

    from coe.ray_local import read_address_file, single_machine_mode

    single_machine_mode()
    ray.init(address=read_address_file(home).address, namespace="coe", log_to_driver=False)


def dashboard_view(home: Path) -> dict[str, Any]:
    """What the Ray dashboard shows of the service: the Serve application's status (dashboard API,
    with Ray's token) and the ``ray_coe_*`` series on Ray's Prometheus export (the dashboard's
    Metrics view reads those)."""
    import httpx
    import ray

    from coe.ray_local import token_path

    out: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {token_path().read_text().strip()}"} if token_path().exists() else {}
    try:
        apps = httpx.get("http://127.0.0.1:8265/api/serve/applications/", headers=headers, timeout=10).json()
        out["serve_applications"] = {name: {"status": a.get("status"),
                                            "deployments": {d: v.get("status") for d, v in
                                                            (a.get("deployments") or {}).items()}}
                                     for name, a in (apps.get("applications") or {}).items()}
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        out["serve_applications_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        join_service_ray(home)
        ports = {n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")}
        names: set[str] = set()
        for port in ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            names |= {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln.startswith("ray_coe")}
        out["ray_metric_names"] = sorted(names)
        ray.shutdown()
    except Exception as e:  # noqa: BLE001
        out["ray_metrics_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(rs: list[Result]) -> dict[str, Any]:
    ok = [r for r in rs if r.ok]
    return {
        "requests": len(rs), "ok": len(ok),
        "errors": sorted({f"{r.status}: {r.error}" for r in rs if not r.ok})[:10],
        "ttft_p50_s": pct([r.ttft_s for r in ok], 50), "ttft_p99_s": pct([r.ttft_s for r in ok], 99),
        "latency_p50_s": pct([r.total_s for r in ok], 50),
        "tokens": sum(r.tokens for r in ok),
        "experts_answering": sorted({r.expert for r in ok if r.expert}),
        "http_added_ms_p50": _ms(pct([r.added_s for r in ok], 50)),
        "http_added_ms_p99": _ms(pct([r.added_s for r in ok], 99)),
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else round(1000 * s, 2)


# ------------------------------------------------------------------------------------------- e2e
def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
                            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    except Exception as e:  # pragma: no cover
        info["torch"] = f"unavailable: {e}"
    for mod in ("vllm", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def write_random_weights(folder: Path, device: str) -> None:
    """Random bf16 safetensors for the folder's config (what an engine without a dummy loader reads)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(folder.glob("*.safetensors")):
        return
    cfg = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def _hbm_budget(weight_bytes: int, awake: int, experts: int) -> int:
    from coe.pool import PoolConfig

    d = PoolConfig()
    active = weight_bytes + int(d.engine_defaults.kv_cache_bytes or 0) + d.engine_overhead_bytes
    return int((active * awake + d.sleeping_engine_bytes * (experts - awake)) * 1.05)


def service_config(args: argparse.Namespace, weight_bytes: int, path: Path) -> Path:
    import yaml

    cfg: dict[str, Any] = {
        "pool": {"device": args.device, "num_cpus": 1, "options": {
            # the HBM budget counts whole engine footprints (weights + KV + overhead awake, the
            # context asleep): room for hbm_experts awake, the others asleep, at the pool's defaults
            "hbm_budget_bytes": _hbm_budget(weight_bytes, args.hbm_experts, args.experts),
            "max_batch_size": args.max_batch_size}},
        "router": {"num_cpus": 1},
        # requests wait for engines that are still starting (WAIT_FOR_START_S) within their deadline
        "limits": {"request_timeout_s": WAIT_FOR_START_S + 300, "loading_wait_max_s": WAIT_FOR_START_S},
    }
    cfg.update(json.loads(args.config_json or "{}"))
    path.write_text(yaml.safe_dump(cfg))
    return path


def add_args(name: str, folder: Path, args: argparse.Namespace, category: str) -> list[str]:
    a = ["add", name, "--model", str(folder), "--engine", args.engine, "--dtype", args.dtype,
         "--max-context", str(args.max_context), "-c", f"{category}=0.9", "--chat-template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"]
    if args.weights == "dummy":
        a += ["--load-format", "dummy"]  # random weights of the real shapes, made by vLLM
    a += json.loads(args.add_json or "[]")
    return a


async def traffic(base: str, models: list[str], n: int, rate: float, max_tokens: int, vocab: int,
                  seed: int) -> list[Result]:
    import openai

    from coe.engines.vllm_models import word_prompt

    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=600)
    tasks = []
    for i in range(n):
        m = models[i % len(models)]
        tasks.append(asyncio.create_task(one_request(client, m, word_prompt(64, vocab, rng), max_tokens)))
        await asyncio.sleep(rng.expovariate(rate) if rate > 0 else 0)
    out = await asyncio.gather(*tasks)
    await client.close()
    return list(out)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in one line; None when the run can go ahead."""
    if args.experts < 2:
        return "--experts must be at least 2 (one is removed while the others take traffic)"
    if not 1 <= args.hbm_experts <= args.experts:
        return f"--hbm-experts must be between 1 and --experts ({args.experts}), got {args.hbm_experts}"
    if args.engine == "vllm" and args.device == "cpu":
        return "--engine vllm needs --device cuda (dry-run on the CPU with --engine hf --weights random)"
    if args.engine == "hf" and args.weights == "dummy":
        return "--weights dummy is vLLM's loader; --engine hf needs --weights random"
    if args.num_cpus < 3:  # Ray's logical CPUs: pool 1 + router 1 + ingress 0.1, or the app never deploys
        return f"--num-cpus must be at least 3 (the pool and the router take one each), got {args.num_cpus}"
    if args.requests < 1 or args.rate < 0 or args.max_tokens < 1:
        return "--requests and --max-tokens must be positive, --rate not negative"
    return None


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The service config and every ``coe-registry add`` the run makes, without running anything."""
    import tempfile

    import yaml

    from coe.engines.vllm_models import SHAPES, llama_param_count

    folder = Path(args.workdir) / f"llama-{args.shape}"
    weight_bytes = llama_param_count(SHAPES[args.shape]) * (4 if args.dtype == "float32" else 2)
    from coe.config import ServeConfig

    with tempfile.TemporaryDirectory() as d:
        path = service_config(args, weight_bytes, Path(d) / "coe.yaml")
        ServeConfig.from_yaml(path)  # what `coe serve --config` reads: a typo fails here, not on the GPU
        cfg = yaml.safe_load(path.read_text())
    names = [f"x{i}" for i in range(args.experts)]
    return {"config": cfg, "weight_bytes": weight_bytes, "hbm_budget_bytes": cfg["pool"]["options"]["hbm_budget_bytes"],
            "adds": [add_args(n, folder, args, CATEGORIES[i % len(CATEGORIES)]) for i, n in enumerate(names)],
            "hot_add": add_args("hot", folder, args, "math"), "removed": names[-1]}


CATEGORIES = ["math", "coding", "writing", "reasoning", "stem", "humanities", "extraction", "roleplay"]


def checks(res: dict[str, Any]) -> dict[str, bool]:
    """What a run must show (``tests/serve/test_service_gpu.py`` asserts each)."""
    live = res.get("live_changes") or {}
    groups = [res.get("mixed"), res.get("routed"), live.get("background")]
    first = res.get("first_requests") or []
    budget, peak = res.get("hbm_budget_bytes"), res.get("memory_peak_above_baseline_bytes")
    probe = res.get("responsiveness_during_starts") or {}
    return {
        "no_error": "error" not in res,
        "every_request_succeeded": bool(first) and all(r.get("ok") for r in first)
        and all(g is not None and g.get("requests", 0) > 0 and g.get("ok") == g.get("requests") for g in groups),
        "hot_added_expert_answered": bool((live.get("hot_first") or {}).get("ok"))
        and (live.get("hot_first") or {}).get("expert") == "hot",
        "removed_expert_gone": bool(live.get("removed_gone")),
        "device_peak_within_budget": budget is not None and peak is not None and peak <= budget,
        # issue 23 item 2: while engines start, the pool's state answers within 1 s, every time
        "responsive_during_starts": bool(probe) and all(
            v["n"] > 0 and not v["failures"] and (v["max_ms"] or 0) <= 1000 for v in probe.values())
        and not (res.get("steps") or {}).get("list_service_said_not_running", True),
    }


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from coe.engines.vllm_models import SHAPES, build_dummy_folder, llama_param_count

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": machine(), "args": vars(args), "steps": {}}
    shape = SHAPES[args.shape]
    folder = build_dummy_folder(work / f"llama-{args.shape}", args.shape, max_position_embeddings=args.max_context)
    if args.weights == "random":
        t = time.perf_counter()
        write_random_weights(folder, args.device)
        res["steps"]["write_weights_s"] = round(time.perf_counter() - t, 1)
    weight_bytes = llama_param_count(shape) * (4 if args.dtype == "float32" else 2)
    res["weight_bytes"] = weight_bytes
    cfg = service_config(args, weight_bytes, work / "coe.yaml")
    res["config"] = cfg.read_text()
    import yaml

    res["hbm_budget_bytes"] = (yaml.safe_load(res["config"])["pool"]["options"] or {}).get("hbm_budget_bytes")
    svc = Service(home=work / "home", port=args.port, log=out / "serve.log")
    steps = res["steps"]
    path = out / f"service_gpu_{args.shape}_{args.experts}x.json"

    def save() -> None:  # after every phase, so a run cut short still leaves what it saw
        path.write_text(json.dumps(res, indent=1, default=str))

    def on_term(signum: int, _frame: Any) -> None:
        raise TimeoutError(f"stopped by signal {signum} (time limit)")

    signal.signal(signal.SIGTERM, on_term)
    with MemorySampler() as mem:
        res["memory_baseline_bytes"] = mem.baseline
        try:
            steps["serve_start_s"] = round(svc.start(cfg, args.num_cpus), 1)
            cats = CATEGORIES
            names = [f"x{i}" for i in range(args.experts)]
            with ResponsivenessProbe(svc.base) as probe:  # while the engines start, one after another
                for i, n in enumerate(names):
                    t = time.perf_counter()
                    svc.cli(*add_args(n, folder, args, cats[i % len(cats)]))
                    steps[f"add_{n}_s"] = round(time.perf_counter() - t, 2)
                t = time.perf_counter()
                listed = svc.cli("list", "--service", svc.base)
                steps["list_service_s"] = round(time.perf_counter() - t, 2)
                steps["list"] = listed.stdout[-3000:]
                # warm every expert once (their first requests wait for the starts), then mixed traffic
                t = time.perf_counter()
                warm = asyncio.run(traffic(svc.base, names, len(names), 0, 8, shape["vocab_size"], 1))
                steps["first_requests_s"] = round(time.perf_counter() - t, 1)
            res["responsiveness_during_starts"] = probe.report()
            steps["list_service_said_not_running"] = "service not running" in steps["list"]
            res["first_requests"] = [r.__dict__ for r in warm]
            save()
            t = time.perf_counter()
            mixed = asyncio.run(traffic(svc.base, names, args.requests, args.rate, args.max_tokens,
                                        shape["vocab_size"], 2))
            steps["mixed_s"] = round(time.perf_counter() - t, 1)
            res["mixed"] = summarize(mixed)
            save()
            routed = asyncio.run(traffic(svc.base, ["coe"], 8, 2.0, 16, shape["vocab_size"], 3))
            res["routed"] = summarize(routed)

            # hot add + remove while traffic runs
            async def watch(name: str, t0: float, seen: list, stop: asyncio.Event) -> None:
                """What /v1/models says of ``name`` while it starts (status and phase changes)."""
                async with httpx.AsyncClient(timeout=10) as c:
                    while not stop.is_set():
                        try:
                            cards = (await c.get(f"{svc.base}/v1/models")).json().get("data", [])
                            card = next((m for m in cards if m.get("id") == name), None)
                            now = (card.get("status"), card.get("phase")) if card else (None, None)
                            if not seen or seen[-1][1:] != list(now):
                                seen.append([round(time.perf_counter() - t0, 2), *now])
                        except Exception:  # noqa: BLE001 - a missed sample is not a failure
                            pass
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), 0.5)

            async def gone(name: str, timeout_s: float) -> tuple[bool, int | None]:
                """Whether ``name`` left /v1/models, and what a request naming it gets then."""
                end = time.monotonic() + timeout_s
                async with httpx.AsyncClient(timeout=30) as c:
                    while time.monotonic() < end:
                        cards = (await c.get(f"{svc.base}/v1/models")).json().get("data", [])
                        if all(m.get("id") != name for m in cards):
                            r = await c.post(f"{svc.base}/v1/chat/completions", json={
                                "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
                            return True, r.status_code
                        await asyncio.sleep(0.5)
                return False, None

            async def live() -> dict[str, Any]:
                bg = asyncio.create_task(traffic(svc.base, names[:-1], 24, 2.0, 16, shape["vocab_size"], 4))
                await asyncio.sleep(1.0)
                t0 = time.perf_counter()
                seen: list = []
                stop = asyncio.Event()
                watcher = asyncio.create_task(watch("hot", t0, seen, stop))
                await asyncio.to_thread(svc.cli, *add_args("hot", folder, args, "math"))
                added = time.perf_counter() - t0
                listed = (await asyncio.to_thread(svc.cli, "list", "--json", "--service", svc.base, check=False)).stdout
                first = await traffic(svc.base, ["hot"], 1, 0, 8, shape["vocab_size"], 5)
                add_to_first = time.perf_counter() - t0
                stop.set()
                await watcher
                await asyncio.to_thread(svc.cli, "remove", names[-1], "--force")
                removed, status_after = await gone(names[-1], 60)
                rs = await bg
                try:
                    hot_listed = next((e for e in json.loads(listed) if e.get("name") == "hot"), None)
                except ValueError:
                    hot_listed = None
                return {"add_cli_s": round(added, 2), "add_to_first_token_s": round(add_to_first, 1),
                        "hot_first": first[0].__dict__, "hot_seen_in_models": seen,
                        "hot_in_registry_list": {k: (hot_listed or {}).get(k) for k in ("status", "service_status",
                                                                                         "service_phase")},
                        "removed": names[-1], "removed_gone": removed and status_after == 404,
                        "removed_request_status": status_after, "background": summarize(rs)}

            res["live_changes"] = asyncio.run(live())
            save()
            if args.overhead:
                res["overhead"] = overhead(svc.base, names[:-1] + ["hot"], args)
            models = httpx.get(f"{svc.base}/v1/models", timeout=10).json()
            res["models_after"] = [m for m in models.get("data", []) if m.get("kind") == "expert"]
            metrics = httpx.get(f"{svc.base}/metrics", timeout=10).text
            (out / "metrics.txt").write_text(metrics)
            res["metric_names"] = sorted({ln.split("{")[0].split(" ")[0] for ln in metrics.splitlines()
                                          if ln.startswith("coe")})
            res["dashboard"] = dashboard_view(svc.home)
            save()
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            res["memory_peak_bytes"] = mem.peak
            res["memory_peak_above_baseline_bytes"] = mem.peak - mem.baseline
            res["memory_samples"] = mem.samples[-400:]
            res["serve_exit"] = svc.stop()
    res["checks"] = checks(res)
    save()
    print(json.dumps({k: v for k, v in res.items() if k not in ("memory_samples", "first_requests")},
                     indent=1, default=str)[:6000])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("e2e", help="coe serve + coe-registry + openai client on the GPU")
    e.add_argument("--shape", default="3b", choices=sorted(SHAPE_VOCAB))
    e.add_argument("--experts", type=int, default=6)
    e.add_argument("--hbm-experts", type=int, default=2)
    e.add_argument("--weights", choices=["dummy", "random"], default="dummy")
    e.add_argument("--device", default="cuda", help="cpu (with --engine hf) dry-runs the script without a GPU")
    e.add_argument("--engine", default="vllm")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--requests", type=int, default=60)
    e.add_argument("--rate", type=float, default=4.0)
    e.add_argument("--max-tokens", type=int, default=32)
    e.add_argument("--max-batch-size", type=int, default=32)
    e.add_argument("--max-context", type=int, default=2048)
    e.add_argument("--port", type=int, default=8000)
    e.add_argument("--num-cpus", type=int, default=12)
    e.add_argument("--workdir", default="/tmp/coe-gpu")
    e.add_argument("--config-json", default=None, help="JSON merged into the service config")
    e.add_argument("--add-json", default=None, help="JSON list of extra `coe-registry add` arguments")
    e.add_argument("--overhead", action="store_true", help="HTTP vs pool handle on the same traces (issue 13 item 6)")
    e.add_argument("--low-rate", type=float, default=1.0)
    e.add_argument("--low-requests", type=int, default=20)
    e.add_argument("--serve-requests", type=int, default=300)
    e.add_argument("--out", default="bench/results")
    e.add_argument("--plan", action="store_true", help="print the config and the coe-registry commands; run nothing")
    args = p.parse_args()
    if args.cmd == "e2e":
        bad = check_args(args)
        if bad:
            p.error(bad)
        if args.plan:
            print(json.dumps(plan(args), indent=1))
            return
        e2e(args)


if __name__ == "__main__":
    main()
