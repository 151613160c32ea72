"""Issue 12 item 7 and issue 19 item 4, replayed on a real `coe serve` process (the signal goes to
that process, so it runs as a subprocess: its own Ray, the session's Redis, SmolLM2 on the CPU).

* from the moment the port opens until ready, `/healthz` and `/readyz` polled every ~20 ms answer
  JSON, never Ray's plain-text 404 (the proxy's own errors are rewritten, coe/serve/proxy_errors.py),
  and `/healthz` (liveness) answers 200 throughout: "starting", then "ok" (issue 31);
* (issue 24 item 3) it records the Ray head it started in ``$COE_HOME/ray/address`` (0600), where
  ``coe drain`` finds it, and removes the file when it stops;
* SIGTERM drains (drain timeout 12 s here): `/readyz` turns 503 at once, a new request gets 503
  `shutting_down` with Retry-After, a stream in flight completes, a stream still running at the
  deadline ends with an SSE error event and `data: [DONE]`, the process exits 0 and leaves none
  of the processes it started behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from security_helpers import err
from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DRAIN_S = 12.0
START_S = 420.0


@dataclass
class Service:
    proc: subprocess.Popen
    base: str
    log: Path
    startup: list[tuple[str, int, str, str]] = field(default_factory=list)  # path, status, type, text

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _poll_until_ready(svc: Service) -> None:
    """/healthz and /readyz, alternately, every ~20 ms, from the first answer until ready."""
    deadline = time.monotonic() + START_S
    with httpx.Client(timeout=30) as c:
        while time.monotonic() < deadline:
            assert svc.proc.poll() is None, svc.output()
            for path in ("/healthz", "/readyz"):
                try:
                    r = c.get(svc.base + path)
                except httpx.HTTPError:
                    continue  # not listening yet
                svc.startup.append((path, r.status_code, r.headers.get("content-type", ""), r.text[:300]))
                if path == "/readyz" and r.status_code == 200:
                    return
            time.sleep(0.02)
    pytest.fail(f"coe serve was not ready in {START_S:.0f} s:\n{svc.output()}")


@pytest.fixture(scope="module")
def service(redis_url: str, smollm_dir: Path, tmp_path_factory) -> Iterator[Service]:
    from expert_registry.spec import Expert, GenerationDefaults
    from expert_registry.store import RedisRegistry

    ns = f"drain-{uuid.uuid4().hex[:8]}"
    reg = RedisRegistry(redis_url, namespace=ns)
    reg.add(Expert(name="smollm2", model=str(smollm_dir), engine="hf", dtype="float32", max_context=2048,
                   generation=GenerationDefaults(max_tokens=16, temperature=0.0, top_p=1.0),
                   capabilities={"general": 0.5}, tags=["test"]))
    reg.set_map({c: ["smollm2"] for c in ("general", "writing", "math", "stem", "coding", "reasoning", "roleplay",
                                          "extraction", "humanities")})
    tmp = tmp_path_factory.mktemp("drain")
    port = free_port()
    cfg = tmp / "coe.yaml"
    cfg.write_text(json.dumps({"host": "127.0.0.1", "port": port, "redis_url": redis_url, "namespace": ns,
                               "pool": {"device": "cpu", "num_cpus": 0.5},
                               "shutdown": {"drain_timeout_s": DRAIN_S}}))
    log = tmp / "serve.out"
    coe = Path(sys.executable).with_name("coe")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(coe), "serve", "--config", str(cfg), "--num-cpus", "2",
                                 "--dashboard-port", str(free_port())],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    svc = Service(proc, f"http://127.0.0.1:{port}", log)
    try:
        _poll_until_ready(svc)
        yield svc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)  # second one: stop without waiting for the drain
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        reg.purge()
        reg.close()


def test_the_port_answers_json_during_the_whole_start_up(service):
    answers = service.startup
    assert answers and answers[-1][0] == "/readyz" and answers[-1][1] == 200
    plain = [a for a in answers if "application/json" not in a[2]]
    assert not plain, plain[:5]
    # before the app serves, what the port says is "starting" (503), never "not found"
    assert all(a[1] != 404 for a in answers), [a for a in answers if a[1] == 404][:5]
    # issue 31: liveness never fails during a normal start: /healthz is 200 "starting", then "ok"
    live = [(a[1], (re.search(r'"status":\s*"(\w+)"', a[3]) or [None, None])[1]) for a in answers
            if a[0] == "/healthz"]
    assert live and all(code == 200 and status in ("starting", "ok", "degraded") for code, status in live), live[:5]


class Stream(threading.Thread):
    """One streamed chat request, read in the background: its SSE events, in order."""

    def __init__(self, base: str, max_tokens: int):
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.events: list[dict | str] = []
        self.times: list[float] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": "smollm2", "stream": True, "max_tokens": self.max_tokens, "ignore_eos": True,
                "temperature": 0.0, "messages": [{"role": "user", "content": "Tell me a very long story."}]}
        try:
            with httpx.stream("POST", self.base + "/v1/chat/completions", json=body, timeout=300) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.times.append(time.monotonic())
        except BaseException as e:  # noqa: BLE001 - asserted by the test
            self.error = e

    def tokens(self) -> int:
        return sum(1 for e in self.events if isinstance(e, dict) and e.get("choices")
                   and e["choices"][0]["delta"].get("content"))

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.tokens() < n:
            assert self.error is None and time.monotonic() < deadline, (self.error, self.events[-3:])
            time.sleep(0.05)


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_coe_serve_records_its_own_ray_for_coe_drain(service, coe_home):
    f = coe_home / "ray" / "address"
    st = f.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
    rec = json.loads(f.read_text())
    assert rec["pid"] == service.proc.pid
    # the address is the GCS of the Ray head this `coe serve` started (one of its own processes)
    from coe.ray_local import listeners

    host, port = rec["address"].rsplit(":", 1)
    gcs = [s for s in listeners(service.proc.pid) if s.process == "gcs_server"]
    assert host == "127.0.0.1" and any(s.port == int(port) for s in gcs), (rec, gcs)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(service, coe_home):
    base = service.base
    # the long stream: more tokens than the drain lets it write; its rate sizes the short one
    long = Stream(base, 1900)
    long.start()
    long.wait_tokens(3)
    t0, n0 = time.monotonic(), long.tokens()
    time.sleep(2.0)
    rate = (long.tokens() - n0) / (time.monotonic() - t0)
    assert rate > 0, long.events[-3:]
    assert 1900 / rate > 3 * DRAIN_S, f"SmolLM2 runs at {rate:.0f} tokens/s: the long stream would not be cut"
    short = Stream(base, max(10, int(rate * 2.5)))  # ~3-5 s while sharing the batch: ends inside the drain
    short.start()
    short.wait_tokens(1)
    children = _descendants(service.proc.pid)
    assert any("raylet" in (p.name() or "") or "gcs" in (p.name() or "") for p in children), \
        [p.name() for p in children]

    t_term = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    # readiness goes first (a load balancer stops sending), new requests are refused with 503
    deadline = time.monotonic() + 5
    while (r := httpx.get(base + "/readyz", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "readyz still 200 five seconds after SIGTERM"
        time.sleep(0.05)
    assert r.status_code == 503 and r.json()["status"] == "draining", r.text
    r = httpx.post(base + "/v1/chat/completions", json={"model": "smollm2", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert r.status_code == 503, r.text
    assert err(r)["code"] == "shutting_down" and int(r.headers["retry-after"]) >= 1
    assert httpx.get(base + "/healthz", timeout=10).json()["draining"] is True  # alive, not ready

    # the short stream finishes normally during the drain
    short.join(DRAIN_S + 30)
    assert short.error is None and short.status == 200, short.error
    assert short.events[-1] == "[DONE]", short.events[-3:]
    finish = [e["choices"][0]["finish_reason"] for e in short.events[:-1] if isinstance(e, dict) and e.get("choices")]
    assert finish[-1] == "length" and not any("error" in e for e in short.events if isinstance(e, dict))
    assert short.times[-1] - t_term < DRAIN_S

    # the long one is cut at the drain deadline: an OpenAI-shaped error event, then [DONE]
    long.join(DRAIN_S + 30)
    assert long.error is None and long.status == 200, long.error
    assert long.events[-1] == "[DONE]", long.events[-3:]
    assert set(long.events[-2]) == {"error"}, long.events[-3:]
    assert long.events[-2]["error"]["code"] == "shutting_down"
    assert set(long.events[-2]["error"]) == {"message", "type", "param", "code"}
    assert DRAIN_S - 1 <= long.times[-1] - t_term <= DRAIN_S + 10, long.times[-1] - t_term
    assert long.tokens() < 1900

    # the process stops cleanly: exit 0, nothing it started is left running
    assert service.proc.wait(120) == 0, service.output()
    out = service.output()
    assert "drained in" in out and "1 cut" in out, out
    assert not (coe_home / "ray" / "address").exists()  # `coe drain` finds no service any more
    time.sleep(2)
    left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]
