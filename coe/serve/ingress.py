"""The HTTP ingress: FastAPI inside Ray Serve (``@serve.ingress``).

It translates OpenAI-shaped HTTP into calls on the router deployment (``route``) and the expert
pool deployment (``generate``, streamed, multiplexed by expert name) and back. Validation and
every error's shape live here; nothing below this module knows about HTTP.
"""



import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle

from coe import __version__
from coe.api.errors import APIError, bad_request, install_error_handlers, upstream_error
from coe.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageIn,
    ChatMessageOut,
    Choice,
    CoeInfo,
    ModelCard,
    ModelList,
    RouteRequest,
    Usage,
    new_id,
)
from coe.config import ServeConfig
from coe.limits import BodyLimitMiddleware, RequestLimits, RequestTimeout, request_timeout, with_deadline
from coe.security import APIKeyMiddleware, KeyStore, install_log_redaction

log = logging.getLogger("coe.serve.ingress")

app = FastAPI(title="coe", version=__version__,
              description="One OpenAI-compatible endpoint in front of many expert LLMs.")
install_error_handlers(app)

# Limits and keys come from the ServeConfig, which the replica only sees in Ingress.__init__ (after this
# module is imported), so the middlewares read them through these getters.
_RUNTIME: dict[str, Any] = {"limits": RequestLimits(), "keys": None}


def _keys() -> KeyStore:
    if _RUNTIME["keys"] is None:
        _RUNTIME["keys"] = KeyStore()
    return _RUNTIME["keys"]


app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: _RUNTIME["limits"].max_request_bytes)
# added last = outermost: a request without a valid key is refused before its body is even read
app.add_middleware(APIKeyMiddleware, store=_keys)

TIER_ORDER = {"hbm": 3, "dram": 2, "disk": 1}
# pool errors after which a router-chosen request goes to the next-best candidate: a permanent load
# failure (the expert is marked failed) or a transient one (retried inside the pool, decision 2)
FALLBACK_CODES = ("expert_load_failed", "expert_unavailable")


# ---- request helpers (pure functions; unit-testable without Ray) ------------------------------
def normalise_messages(messages: list[ChatMessageIn]) -> list[dict[str, str]]:
    """Validate messages and turn them into the ``{"role", "content"}`` dicts engines take."""
    if not messages:
        raise bad_request("'messages' must contain at least one message", "messages", "empty_messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text":
                    raise bad_request(f"messages[{i}].content: only text parts are supported, got '{part.type}'",
                                      f"messages[{i}].content", "unsupported_content")
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text()})
    if not any(m["content"].strip() for m in out if m["role"] != "system"):
        raise bad_request("the prompt is empty: give at least one non-system message with text",
                          "messages", "empty_prompt")
    return out


def routing_text(messages: list[dict[str, str]]) -> str:
    """What the router classifies: the last user message (plus the one before it for context)."""
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
    if not users:
        users = [m["content"] for m in messages if m["content"].strip()]
    return "\n".join(users[-2:]) if len(users) > 1 and len(users[-1]) < 40 else users[-1]


def coe_headers(info: CoeInfo) -> dict[str, str]:
    h = {"x-coe-expert": info.expert, "x-coe-category": info.category or "",
         "x-coe-route-ms": f"{info.route_ms:.2f}"}
    fallback_from = (info.model_extra or {}).get("fallback_from")
    if fallback_from:
        h["x-coe-fallback-from"] = str(fallback_from)
    return h


def _item_error(item: dict) -> APIError:
    """An error item of the pool's stream as the APIError the client gets."""
    return APIError(item["status"], item["message"], item.get("error_type") or "server_error", item.get("param"),
                    item.get("code"), item.get("retry_after"))


async def _chain(first: list[dict], rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    for item in first:
        yield item
    async for item in rest:
        yield item


def sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict, router: DeploymentHandle, pool: DeploymentHandle):
        from coe.metrics import IngressMetrics
        from coe.serve.registry_watch import RegistryWatcher

        install_log_redaction()  # no log line of this replica echoes a key, token or password
        self.cfg = ServeConfig.model_validate(config)
        self.limits = self.cfg.limits
        _RUNTIME["limits"] = self.limits
        _RUNTIME["keys"] = KeyStore(path=self.cfg.security.api_keys_file)
        self.router = router
        self.pool = pool
        self.metrics = IngressMetrics()
        self.watcher = RegistryWatcher(self.cfg.redis_url, self.cfg.namespace, self.cfg.registry_poll_s)
        await self.watcher.start()
        self._categories: list[str] | None = None
        self.started_at = time.time()

    # ---- routing -----------------------------------------------------------------------------
    async def _route(self, model: str, messages: list[dict[str, str]], max_tokens: int | None) -> tuple[CoeInfo, Any]:
        snap = self.watcher.snapshot
        if max_tokens is not None and model in snap.experts and max_tokens >= snap.experts[model].max_context:
            e = snap.experts[model]
            raise bad_request(f"max_tokens={max_tokens} is beyond expert '{model}''s context of "
                              f"{e.max_context} tokens", "max_tokens", "context_length_exceeded")
        res = await self.router.route.remote({
            "prompt": routing_text(messages), "model": model, "max_tokens": max_tokens,
            "prompt_tokens": None, "min_version": snap.version,
        })
        if "error" in res:
            err = res["error"]
            raise APIError(err["status"], err["message"], err.get("type", "invalid_request_error"),
                           err.get("param"), err.get("code"))
        d = res["decision"]
        info = CoeInfo(expert=d["expert"], category=d.get("category"), forced=d.get("forced", "auto"),
                       route_ms=float(d.get("route_ms") or 0.0), category_probs=d.get("category_probs") or [],
                       candidates=d.get("candidates") or [], fallback_reason=d.get("fallback_reason"))
        if res.get("registry_version", 0) > snap.version:
            await self.watcher.refresh()
        spec = self.watcher.snapshot.experts.get(info.expert)
        if spec is not None and max_tokens is not None and max_tokens >= spec.max_context:
            raise bad_request(f"max_tokens={max_tokens} is beyond expert '{info.expert}''s context of "
                              f"{spec.max_context} tokens", "max_tokens", "context_length_exceeded")
        self.metrics.observe_route(info.category, info.route_ms)
        return info, spec

    async def _open_stream(self, info: CoeInfo, messages: list[dict], req: ChatCompletionRequest):
        """Start generation on the pool replica holding the expert. The start item *and the first
        chunk* are read here, so that errors (context too long, full queue, an expert that fails to
        load) become proper HTTP errors, not an error inside a 200 stream. Returns (gen, start, pending)."""
        max_tokens = req.requested_max_tokens()
        payload = {"messages": messages, "max_tokens": max_tokens, "max_tokens_explicit": max_tokens is not None,
                   "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop, "seed": req.seed}
        gen = self.pool.options(multiplexed_model_id=info.expert, stream=True).generate.remote(payload)
        try:
            first = await gen.__anext__()
            if first.get("type") == "error":
                raise _item_error(first)
            pending: list[dict] = []
            try:
                second = await gen.__anext__()
            except StopAsyncIteration:
                second = None
            if second is not None:
                if second.get("type") == "error":
                    raise _item_error(second)
                pending.append(second)
            return gen, first, pending
        except StopAsyncIteration:
            raise APIError(500, f"expert '{info.expert}' returned nothing", "server_error") from None
        except BaseException:  # error, deadline or client gone: stop the generation behind it
            gen.cancel()
            raise

    async def _open_with_fallback(self, info: CoeInfo, messages: list[dict], req: ChatCompletionRequest):
        """:meth:`_open_stream`; if the chosen expert fails to load (it is then marked failed in the
        registry) and the router chose it (not named by the client), try the router's next-best
        candidates. The answer says so: ``coe.fallback_reason``/``fallback_from``, ``x-coe-fallback-from``."""
        try:
            return (*await self._open_stream(info, messages, req), info)
        except APIError as e:
            if e.code not in FALLBACK_CODES or info.forced == "expert":
                raise
            err, failed = e, [info.expert]
        snap = self.watcher.snapshot
        for cand in info.candidates:
            alt = cand.get("expert")
            spec = snap.experts.get(alt) if alt else None
            if not alt or alt in failed or (spec is not None and spec.status != "ready"):
                continue
            what = "is temporarily unavailable" if err.code == "expert_unavailable" else "failed to load"
            reason = f"expert '{failed[0]}' {what} ({err.message}); answered by the next-best candidate '{alt}'"
            alt_info = CoeInfo.model_validate({**info.model_dump(), "expert": alt, "fallback_reason": reason,
                                               "fallback_from": failed[0]})
            try:
                gen, first, pending = await self._open_stream(alt_info, messages, req)
            except APIError as e2:
                if e2.code not in FALLBACK_CODES:
                    raise
                failed.append(alt)
                continue
            log.warning("%s", reason)
            return gen, first, pending, alt_info
        raise err

    async def _within(self, deadline: float, timeout_s: float, coro):
        """Await ``coro`` before the request's deadline (504 ``request_timeout`` after it)."""
        try:
            return await asyncio.wait_for(coro, max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise APIError(504, f"the request did not finish within {timeout_s:g} s (limits.request_timeout_s "
                                "or X-Coe-Timeout)", "server_error", None, "request_timeout") from None

    # ---- endpoints ---------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        timeout_s = request_timeout(self.limits, request.headers.get("x-coe-timeout"))
        deadline = time.monotonic() + timeout_s
        try:
            if req.n != 1:
                raise bad_request(f"n={req.n} is not supported; coe returns one choice (n=1)", "n", "unsupported_value")
            messages = normalise_messages(req.messages)
            info, _spec = await self._within(deadline, timeout_s,
                                             self._route(req.model, messages, req.requested_max_tokens()))
            gen, first, pending, info = await self._within(deadline, timeout_s,
                                                           self._open_with_fallback(info, messages, req))
        except APIError as e:
            self.metrics.observe_error(e.status)
            raise
        except Exception as e:  # a replica died or is restarting: a clean 503, not a 500
            known = upstream_error(e)
            if known is None:
                raise
            self.metrics.observe_error(known.status)
            raise known from None
        headers = coe_headers(info)
        items = with_deadline(_chain(pending, gen), max(0.001, deadline - time.monotonic()), cancel=gen.cancel)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(items, first, info, req.model, include_usage, t0),
                                     media_type="text/event-stream", headers=headers)
        text, finish, usage = [], "stop", Usage(prompt_tokens=first.get("prompt_tokens", 0))
        try:
            async for item in items:
                if item.get("type") == "error":
                    raise _item_error(item)
                text.append(item["text"])
                usage.prompt_tokens = item.get("prompt_tokens") or usage.prompt_tokens
                usage.completion_tokens = item.get("completion_tokens", usage.completion_tokens)
                if item.get("finish_reason"):
                    finish = item["finish_reason"]
        except APIError as e:
            self.metrics.observe_error(e.status)
            raise
        except Exception as e:  # deadline passed, or the pool replica died mid-generation
            known = upstream_error(e)
            if known is None:
                raise
            self.metrics.observe_error(known.status)
            raise known from None
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        body = ChatCompletionResponse(model=req.model, choices=[Choice(message=ChatMessageOut(content="".join(text)),
                                      finish_reason=finish)], usage=usage, coe=info)
        self.metrics.observe_request(info.expert, info.category, "ok", usage.prompt_tokens, usage.completion_tokens,
                                     time.perf_counter() - t0)
        return JSONResponse(body.model_dump(mode="json"), headers=headers)

    async def _sse(self, gen, first: dict, info: CoeInfo, model: str, include_usage: bool,
                   t0: float) -> AsyncIterator[str]:
        cid, created = new_id("chatcmpl"), int(time.time())
        usage = Usage(prompt_tokens=first.get("prompt_tokens", 0))
        status = "ok"

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                        **extra})

        try:
            yield chunk({"role": "assistant", "content": ""}, coe=info.model_dump(mode="json"))
            finish = "stop"
            try:
                async for item in gen:
                    if item.get("type") == "error":
                        status = "error"
                        self.metrics.observe_error(item["status"])
                        yield sse({"error": {"message": item["message"], "type": item.get("error_type"),
                                             "param": item.get("param"), "code": item.get("code")}})
                        break
                    usage.prompt_tokens = item.get("prompt_tokens") or usage.prompt_tokens
                    usage.completion_tokens = item.get("completion_tokens", usage.completion_tokens)
                    if item["text"]:
                        yield chunk({"content": item["text"]})
                    if item.get("finish_reason"):
                        finish = item["finish_reason"]
            except asyncio.CancelledError:
                raise
            except Exception as e:  # deadline passed or the pool replica died: end the stream cleanly
                known = upstream_error(e)
                if known is None:
                    log.exception("stream from expert %s failed", info.expert)
                    known = APIError(500, f"internal error: {type(e).__name__}", "server_error")
                status = "timeout" if isinstance(e, RequestTimeout) else "error"
                self.metrics.observe_error(known.status)
                yield sse({"error": {"message": known.message, "type": known.type, "param": known.param,
                                     "code": known.code}})
            if status == "ok":
                yield chunk({}, finish)
                if include_usage:
                    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage.model_dump()})
            yield sse("[DONE]")
        except asyncio.CancelledError:  # client went away: closing gen cancels the generation
            status = "cancelled"
            raise
        finally:
            self.metrics.observe_request(info.expert, info.category, status, usage.prompt_tokens,
                                         usage.completion_tokens, time.perf_counter() - t0)

    @app.post("/v1/route")
    async def route(self, req: RouteRequest) -> JSONResponse:
        """Explain a routing decision without generating."""
        messages = normalise_messages(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        info, spec = await self._route(req.model, messages, max_tokens)
        body = {"object": "coe.route", "model": req.model, "coe": info.model_dump(mode="json"),
                "expert": spec.model_dump(mode="json", include={"name", "max_context", "capabilities", "tags"})
                if spec is not None else None}
        return JSONResponse(body, headers=coe_headers(info))

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        snap = self.watcher.snapshot
        if self._categories is None:
            self._categories = await self.router.categories.remote()
        tiers, states, phases = await self._pool_view()
        ready = sorted(n for n, e in snap.experts.items() if e.status == "ready")
        cards = [ModelCard(id="coe", kind="router", experts=ready,
                           description="route each request to the best expert automatically")]
        for cat in sorted(set(self._categories) | set(snap.category_map)):
            cards.append(ModelCard(id=f"coe/{cat}", kind="category", experts=list(snap.category_map.get(cat, [])),
                                   description=f"force category '{cat}'; the router picks among its experts"))
        for name in sorted(snap.experts):
            e = snap.experts[name]
            status = e.status if e.status != "ready" else states.get(name, "ready")
            cards.append(ModelCard(id=name, kind="expert", tier=tiers.get(name, "unloaded"), status=status,
                                   status_reason=e.status_reason or phases.get(name), max_context=e.max_context,
                                   capabilities=dict(e.capabilities),
                                   created=int(e.created_at.timestamp())))
        return JSONResponse(ModelList(data=cards).model_dump(mode="json", exclude_none=True))

    async def _pool_snapshots(self) -> list[dict]:
        """The pool's snapshot, asked of it through Ray (decision 3: no live statistics in Redis).
        One replica answers; on several nodes, Ray's metrics endpoint has every replica's series."""
        try:
            return [await asyncio.wait_for(self.pool.stats.remote(), 5.0)]
        except Exception as e:  # noqa: BLE001 - a pool restarting: models and metrics still answer
            log.debug("pool stats unavailable: %s", e)
            return []

    async def _pool_view(self) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """Best tier, a status and a loading phase per expert, from the pool's snapshot."""
        tiers: dict[str, str] = {}
        states: dict[str, str] = {}
        phases: dict[str, str] = {}
        for snap in await self._pool_snapshots():
            for name, e in (snap.get("experts") or {}).items():
                t = str(e.get("tier"))
                if TIER_ORDER.get(t, 0) >= TIER_ORDER.get(tiers.get(name, ""), 0):
                    tiers[name] = t
                st = str(e.get("status") or "")
                if st and st.split(".")[-1].lower() not in ("ready", "none", ""):
                    states[name] = st.split(".")[-1].lower()
                if e.get("phase") or e.get("error"):
                    phases[name] = str(e.get("phase") or e.get("error"))
        return tiers, states, phases

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while serving; ``status`` is "degraded" while Redis is unreachable (routing then uses
        the last registry snapshot and the watcher reconnects with backoff)."""
        snap = self.watcher.snapshot
        reg = self.watcher.health()
        return JSONResponse({"status": "ok" if reg["reachable"] else "degraded", "version": __version__,
                             "registry_version": snap.version, "experts": len(snap.experts),
                             "registry": reg, "auth": "on" if _keys().configured else "off",
                             "uptime_s": round(time.time() - self.started_at, 1)})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(self.metrics.render(await self._pool_snapshots()), media_type=CONTENT_TYPE_LATEST)
