"""The HTTP ingress: FastAPI inside Ray Serve (``@serve.ingress``).

It translates OpenAI-shaped HTTP into calls on the router deployment (``route``) and the expert
pool deployment (``generate``, streamed, multiplexed by expert name) and back. Validation and
every error's shape live here; nothing below this module knows about HTTP.
"""



import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle

from coe import __version__
from coe.api.drain import DrainMiddleware, DrainState, until_cut
from coe.api.errors import (APIError, bad_request, from_report, hide_paths, install_error_handlers, internal_error,
                            upstream_error)
from coe.api.feedback import FeedbackRequest
from coe.api.request_id import RequestIdMiddleware, request_id_of
from coe.api.assemble import ChoicesBuilder, logprobs_out
from coe.api.protocol import (
    ChatCompletionRequest,
    RequestFieldError,
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
from coe.affinity import ConversationAffinity, conversation_key, is_continuation
from coe.config import ServeConfig
from coe.engines.features import engine_kind, engines_supporting, expert_unsupported, field_name
from coe.errors import ErrorReport
from coe.generate_request import GenerateRequest
from coe.limits import (BodyLimitMiddleware, openai_error, RequestLimits, RequestTimeout, loading_wait, request_timeout,
                        with_deadline)
from coe.serve.pool_view import cluster_view, merged_residency
from coe.keys import KeyLimits, KeyRing, KeyStoreUnavailable, RedisKeyStore, StoredKey, allowed_experts, set_service_ring
from coe.security import APIKeyMiddleware, bearer_token, install_log_redaction, route_path
from coe.tenant_limits import LimitExceeded, Reservation, TenantLimiter, estimate_tokens, prompt_token_bound
from routers.policy import names_expert, route_named

log = logging.getLogger("coe.serve.ingress")

app = FastAPI(title="coe", version=__version__,
              description="One OpenAI-compatible endpoint in front of many expert LLMs.")
install_error_handlers(app)

# Limits and keys come from the ServeConfig, which the replica only sees in Ingress.__init__ (after this
# module is imported), so the middlewares read them through these getters.
_RUNTIME: dict[str, Any] = {"limits": RequestLimits(), "drain": DrainState()}


def _keys() -> KeyRing:
    """The replica's key ring (:func:`coe.keys.service_ring`; environment keys until configured)."""
    import coe.keys

    return coe.keys.service_ring()


async def _rate_before_body(scope: dict) -> tuple[int, dict, list] | None:
    """A key whose requests-per-minute window is full gets its 429 before its body is read."""
    tenants, key = _RUNTIME.get("tenants"), scope.get("coe.key")
    if tenants is None or not key or not (key.get("limits") or {}).get("rpm"):
        return None
    wait = await asyncio.to_thread(tenants.rpm_full, key["id"], KeyLimits.model_validate(key["limits"]))
    if wait is None:
        return None
    return (429, openai_error(f"key '{key['name']}' is at its limit of {key['limits']['rpm']} requests per minute",
                              "key_rpm_limit", "rate_limit_error"), [(b"retry-after", str(wait).encode())])


app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: _RUNTIME["limits"].max_request_bytes,
                   idle_timeout_s=lambda: _RUNTIME["limits"].body_idle_timeout_s,
                   total_timeout_s=lambda: _RUNTIME["limits"].body_timeout_s, before_body=_rate_before_body)
# added later = further out: a request without a valid key is refused before its body is even read
app.add_middleware(APIKeyMiddleware, store=_keys)
# while the service stops: 503 shutting_down before anything else is done (coe/api/drain.py)
app.add_middleware(DrainMiddleware, state=lambda: _RUNTIME["drain"], route_path=route_path)
app.add_middleware(RequestIdMiddleware)  # outermost: even a refused request gets its x-request-id

TIER_ORDER = {"hbm": 3, "dram": 2, "disk": 1}
# pool errors after which a router-chosen request goes to the next-best candidate: a permanent load
# failure (the expert is marked failed), a transient one (retried inside the pool, decision 2), or an
# engine still starting after `coe-registry add` (routed requests do not wait for it)
FALLBACK_CODES = ("expert_load_failed", "expert_unavailable", "expert_loading")
FALLBACK_WHY = {"expert_unavailable": "is temporarily unavailable", "expert_loading": "is still loading"}


# ---- request helpers (pure functions; unit-testable without Ray) ------------------------------
def normalise_messages(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """Validate messages and turn them into the dicts the routing step reads (role, content)."""
    if not messages:
        raise bad_request("'messages' must contain at least one message", "messages", "empty_messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text":
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got '{part.type}' "
                                        "(no coe engine takes images, audio or files)", "invalid_request_error",
                                   f"messages[{i}].content", "unsupported_parameter")
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text()})
    if not any(m["content"].strip() for m in out if m["role"] not in ("system", "assistant", "tool")):
        raise bad_request("the prompt is empty: give at least one non-system message with text",
                          "messages", "empty_prompt")
    return out


def routing_text(messages: list[dict[str, Any]]) -> str:
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
    if info.conversation:
        h["x-coe-conversation"] = info.conversation.split(":", 1)[0]
    if info.replica:  # the pool replica (and its Ray node) that generated the answer
        h["x-coe-replica"] = info.replica
        h["x-coe-node"] = info.node or ""
    return h


def _item_error(item: dict) -> APIError:
    """An error item of the pool's stream (a typed :class:`ErrorReport`) as the APIError the client gets."""
    return from_report(ErrorReport.model_validate(item["error"]))


async def _chain(first: list[dict], rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def join_head(events: AsyncIterator[str], n: int, after_first: Any = None) -> AsyncIterator[str]:
    """``events`` with its first ``n`` (the opening role chunks) sent in one message with the one
    after them (the first token): the client reads the same bytes, with one message less through
    Serve's proxy before its first token. ``after_first`` (the feedback record's write) runs once
    that message is handed on, so that it does not compete with it (issue 13 item 6), or when the
    stream ends before it."""
    head = ""
    try:
        async for event in events:
            if n > 0:
                head, n = head + event, n - 1
                continue
            yield head + event
            head = ""
            if after_first is not None:
                call, after_first = after_first, None
                call()
        if head:
            yield head
    finally:
        if after_first is not None:
            after_first()
        await events.aclose()  # its own finally (metrics, the key's settlement) runs now, not at GC


def sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


def _tool_calls_delta(tool_calls: list[Any]) -> dict[str, Any]:
    """A stream delta carrying whole tool calls (each with its ``index``, as OpenAI streams them)."""
    return {"tool_calls": [dict(tc.model_dump(), index=k) for k, tc in enumerate(tool_calls)]}


def _error_event(err: APIError) -> str:
    """An error inside a stream that has already answered 200: one SSE event with the OpenAI error
    object (the stream then ends with ``[DONE]``)."""
    return sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def to_generate_request(req: ChatCompletionRequest, request_id: str | None) -> GenerateRequest:
    """Check every field and convert: a field no engine honours, an unknown field or a bad
    combination is a 400 (``unsupported_parameter`` / ``invalid_value``) naming it."""
    try:
        req.check_supported()
        return req.to_generate_request(request_id)
    except RequestFieldError as e:
        raise bad_request(str(e), e.param, e.code) from None
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "sampling") or None
        raise bad_request(f"invalid value for '{param}': {first.get('msg', 'invalid value')}", param,
                          "invalid_value") from None


def feature_constraint(experts: dict[str, Any], device: str, model: str, features: list[str],
                       permitted: set[str] | None, defaults: Any = None) -> set[str] | None:
    """The experts that may answer (each feature honoured, see ``expert_unsupported``; the key
    permits it); None when nothing constrains. A named expert that cannot, or nothing left at
    all, is a 4xx here. ``defaults``: the pool's engine defaults (a tool-call parser set there
    counts for every expert)."""
    if not features and permitted is None:
        return None
    allowed: set[str] = set()
    missing: dict[str, tuple[str, str, str]] = {}  # name -> (engine, field, why)
    for name, e in experts.items():
        if permitted is not None and name not in permitted:
            continue
        miss = expert_unsupported(e, device, features, defaults)
        if miss:
            missing[name] = (engine_kind(e, device), *miss)
        else:
            allowed.add(name)
    if model in experts and model not in allowed:
        if model in missing:
            kind, field, why = missing[model]
            raise APIError(400, f"'{field}' is not supported by expert '{model}': {why}",
                           "invalid_request_error", field, "unsupported_parameter")
        raise APIError(403, f"this API key may not use expert '{model}'", "permission_error", "model",
                       "model_not_permitted")
    if not allowed and missing:
        field = next(iter(missing.values()))[1]
        raise APIError(400, _none_supports(missing, features), "invalid_request_error", field,
                       "unsupported_parameter")
    if not allowed:
        raise APIError(403, "this API key may not use any registered expert", "permission_error", "model",
                       "model_not_permitted")
    return allowed


def _none_supports(missing: dict[str, tuple[str, str, str]], features: list[str]) -> str:
    """The 400 message when no expert may take a request's feature (``missing``: name -> (engine,
    field, why)): each engine and each other reason once, and which engines would honour it."""
    _, field, _ = next(iter(missing.values()))
    kinds = sorted({k for k, f, w in missing.values() if f == field and w.startswith("engine '")})
    other = list(dict.fromkeys(w for _, f, w in missing.values() if f == field and not w.startswith("engine '")))
    reasons = []
    if kinds:
        feature = next((x for x in features if field_name(x) == field), field)
        support = ", ".join(k for k in engines_supporting(feature) if k not in kinds) or "none"
        many = len(kinds) > 1
        reasons.append(f"their engine{'s' if many else ''} ({', '.join(kinds)}) {'do' if many else 'does'} not "
                       f"support it (engines that do: {support})")
    return f"'{field}' is not supported by any expert this request may use: {'; '.join(reasons + other)}"


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict, router: DeploymentHandle, pool: DeploymentHandle):
        import redis

        from coe.metrics import IngressMetrics
        from coe.serve.registry_watch import RegistryWatcher

        install_log_redaction()  # no log line of this replica echoes a key, token or password
        self.cfg = ServeConfig.model_validate(config)
        self.limits = self.cfg.limits
        _RUNTIME["limits"] = self.limits
        self.keys = KeyRing(RedisKeyStore(self.cfg.redis_url, self.cfg.namespace))
        set_service_ring(self.keys)
        self.tenants = _RUNTIME["tenants"] = TenantLimiter(redis.Redis.from_url(self.cfg.redis_url, socket_timeout=2,
                                                          socket_connect_timeout=2), self.cfg.namespace)
        self.router = router
        self.pool = pool
        self.device = self.cfg.pool.resolved_device()  # resolves engine "auto" for the feature check
        self.metrics = IngressMetrics()
        self.affinity = ConversationAffinity(self.cfg.conversation)
        self.watcher = RegistryWatcher(self.cfg.redis_url, self.cfg.namespace, self.cfg.registry_poll_s)
        await self.watcher.start()
        from coe.feedback import FeedbackStore

        # who answered each request, for POST /v1/feedback (bounded, expiring: coe/feedback.py)
        self.feedback = (FeedbackStore(self.cfg.redis_url, self.cfg.namespace, self.cfg.feedback)
                         if self.cfg.feedback.enabled else None)
        self._background: set[asyncio.Task] = set()
        self._categories: list[str] | None = None
        self.started_at = time.time()
        rc = self.cfg.router
        # beyond what the router deployment takes at once, requests would only queue in front of it
        # (seconds under overload) before their 429: refuse them here instead, before any routing work
        self.max_routing_waiters = self.limits.max_routing_waiters or rc.num_replicas * max(64, 4 * rc.max_batch_size)
        self._routing = 0
        self._demand: Counter[str] = Counter()  # named experts asked for since the last flush
        self._demand_task = asyncio.create_task(self._flush_demand())
        from coe.serve.readiness import WarmUp

        self.warm = WarmUp()
        self._warm_task = asyncio.create_task(self._warm_up())
        self.drain_state = DrainState(retry_after_s=max(1, self.limits.retry_after_min_s))
        _RUNTIME["drain"] = self.drain_state

    # ---- graceful shutdown (called by `coe serve` on SIGTERM/SIGINT and `coe drain`, through
    # DeploymentHandle.broadcast so that every replica drains) -----------------------------------
    async def drain(self, timeout_s: float | None = None) -> dict:
        """Refuse new requests, wait for those in flight up to ``timeout_s`` (default: the
        config's ``shutdown.drain_timeout_s``), cut the rest (coe/api/drain.py)."""
        return await self.drain_state.drain(self.cfg.shutdown.drain_timeout_s if timeout_s is None else timeout_s)

    async def drain_status(self) -> dict:
        return self.drain_state.status()

    # ---- readiness ---------------------------------------------------------------------------
    async def _warm_up(self) -> None:
        """Route a one-token request to every category and run it on the chosen expert (see
        :mod:`coe.serve.readiness`); retried until the router and pool answer."""
        from coe.serve.readiness import WarmUp

        while True:
            w = WarmUp()
            self.warm = w
            try:
                await self._warm_once(w)
                w.done = True
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # router or pool still starting: try again shortly
                w.step = f"waiting for the router and the expert pool ({type(e).__name__})"
                await asyncio.sleep(2.0)

    async def _warm_once(self, w: Any) -> None:
        # the system line makes the warm-up a conversation of its own: conversation affinity must
        # not tie a user's "Hello" to whichever expert warmed up last
        messages = [{"role": "system", "content": f"coe warm-up {new_id('warmup')}"},
                    {"role": "user", "content": "Hello"}]
        w.step = "routing one request per category"
        for cat in await self.router.categories.remote():
            try:
                info, _ = await self._route(f"coe/{cat}", messages, 1)
            except APIError:  # nothing can serve this category: not routable
                continue
            others = [c.get("expert") for c in info.candidates if c.get("expert") not in (None, info.expert)]
            w.plan[cat] = [info.expert, *others]
            req = ChatCompletionRequest(model=f"coe/{cat}", messages=[ChatMessageIn(role="user", content="Hello")],
                                        max_tokens=1, temperature=0.0)
            if info.expert in w.warmed or info.expert in w.failed:
                continue
            w.step = f"loading and warming expert '{info.expert}' ({len(w.warmed) + 1} so far)"
            try:
                gen, _first, _pending = await self._open_stream(info, req.to_generate_request())
                async for _ in gen:
                    pass
                w.warmed.add(info.expert)
            except APIError as e:  # a failed expert is marked in the registry; readiness shows it
                w.failed[info.expert] = e.message

    # ---- routing -----------------------------------------------------------------------------
    async def _route(self, model: str, messages: list[dict[str, Any]], max_tokens: int | None,
                     features: list[str] = (), permitted: set[str] | None = None,
                     session: str | None = None, request_id: str | None = None,
                     explain: dict[str, Any] | None = None, tenant: str | None = None,
                     remember: bool = True) -> tuple[CoeInfo, Any]:
        """The routing decision as the ``coe`` info, and the chosen expert's spec. ``explain``, when
        given, receives the experts that did not compete and why (``excluded``: a hard constraint;
        ``not_candidates``: not in the category map for a category they declare): ``/v1/route``."""
        snap = self.watcher.snapshot
        if max_tokens is not None and model in snap.experts and max_tokens >= snap.experts[model].max_context:
            e = snap.experts[model]
            raise bad_request(f"max_tokens={max_tokens} is beyond the context of expert '{model}' "
                              f"({e.max_context} tokens)", "max_tokens", "context_length_exceeded")
        allowed = feature_constraint(snap.experts, self.device, model, list(features), permitted,
                                     self.cfg.pool.options.engine_defaults)
        if names_expert(model, snap.experts):  # the client named an expert: no classifier, no router call
            res = self._route_named(snap.experts[model], max_tokens, allowed, snap.version)
        else:
            if self._routing >= self.max_routing_waiters:
                raise APIError(429, f"coe is at capacity ({self._routing} requests waiting for the router); retry "
                                    "later", "rate_limit_error", None, "overloaded",
                               max(1, self.limits.retry_after_min_s))
            self._routing += 1
            try:
                res = await self.router.route.remote({
                    "prompt": routing_text(messages), "model": model, "max_tokens": max_tokens,
                    "prompt_tokens": None, "min_version": snap.version,
                    "allowed": sorted(allowed) if allowed is not None else None, "request_id": request_id,
                })
            finally:
                self._routing -= 1
        if "error" in res:
            err = ErrorReport.model_validate(res["error"])
            if err.code == "no_eligible_expert" and permitted is not None and not features:
                raise APIError(403, f"this API key may not use any expert of '{model}'", "permission_error",
                               "model", "model_not_permitted")
            if err.code == "no_eligible_expert" and features:
                raise APIError(400, f"'{features[0]}' is not supported by any expert of '{model}' "
                                    f"({hide_paths(err.message)})", "invalid_request_error", features[0],
                               "unsupported_parameter")
            raise from_report(err)  # the router's reasons may quote expert failures: paths are cut there
        d = res["decision"]
        if explain is not None:
            explain.update(excluded=d.get("excluded") or {}, not_candidates=d.get("not_candidates") or {})
        info = CoeInfo(expert=d["expert"], category=d.get("category"), forced=d.get("forced", "auto"),
                       route_ms=float(d.get("route_ms") or 0.0), category_probs=d.get("category_probs") or [],
                       candidates=d.get("candidates") or [], fallback_reason=d.get("fallback_reason"))
        if info.forced != "expert":
            self._stick(info, messages, session, tenant, remember)
        if res.get("registry_version", 0) > snap.version:
            await self.watcher.refresh()
        spec = self.watcher.snapshot.experts.get(info.expert)
        if spec is not None and max_tokens is not None and max_tokens >= spec.max_context:
            raise bad_request(f"max_tokens={max_tokens} is beyond the context of expert '{info.expert}' "
                              f"({spec.max_context} tokens)", "max_tokens", "context_length_exceeded")
        self.metrics.observe_route(info.category, info.route_ms)
        return info, spec

    def _route_named(self, expert: Any, max_tokens: int | None, allowed: set[str] | None, version: int) -> dict:
        """The router's answer for a named expert, decided here with the router's own rule
        (:func:`routers.policy.route_named`): a round trip to the router deployment was ~5 ms of
        every such request (issue 13 item 6). The router still learns the demand (prefetch hints),
        in one call per ``router.residency_refresh_s`` (:meth:`_flush_demand`)."""
        from coe.serve.router_deployment import route_answer
        from routers.errors import NoEligibleExpert

        try:
            decision: Any = route_named(expert, allowed, None, max_tokens)
            self._demand[expert.name] += 1
        except NoEligibleExpert as e:
            decision = e
        return route_answer(decision, {"model": expert.name, "max_tokens": max_tokens}, version)

    async def _flush_demand(self) -> None:
        """Send the router the named experts' demand once per its sync period (off the request path)."""
        while True:
            await asyncio.sleep(self.cfg.router.residency_refresh_s)
            if not self._demand:
                continue
            counts, self._demand = dict(self._demand), Counter()
            try:
                await self.router.note_demand.remote(counts)
            except Exception as e:  # noqa: BLE001 - a lost hint only delays a prefetch
                log.debug("could not send demand to the router: %s", e)

    def _stick(self, info: CoeInfo, messages: list[dict[str, Any]], session: str | None, tenant: str | None,
               remember: bool = True) -> None:
        """Conversation affinity (coe/affinity.py), within the caller's key (``tenant``): keep a
        conversation's expert unless the router's choice beats it by the margin; the decision says
        which, in ``coe.conversation``. ``remember=False`` (``/v1/route``) decides without pinning."""
        key = conversation_key(messages, session, tenant)
        if key is None:
            return
        if session or is_continuation(messages):
            st = self.affinity.decide(key, info.expert, info.candidates)
            info.expert, info.conversation = st.expert, st.note
        else:
            info.conversation = "new"
        if remember:
            self.affinity.remember(key, info.expert)

    async def _open_stream(self, info: CoeInfo, greq: GenerateRequest):
        """Start generation on the pool replica holding the expert. The start item *and the first
        chunk* are read here, so that errors (context too long, full queue, an expert that fails to
        load) become proper HTTP errors, not an error inside a 200 stream. Returns (gen, start, pending)."""
        gen = self.pool.options(multiplexed_model_id=info.expert, stream=True).generate.remote(greq)
        try:
            first = await gen.__anext__()
            if first.get("type") == "error":
                raise _item_error(first)
            info.replica, info.node = first.get("replica"), first.get("node")  # who serves it (debugging a cluster)
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

    async def _open_with_fallback(self, info: CoeInfo, greq: GenerateRequest, allowed: set[str] | None = None):
        """:meth:`_open_stream`; if the chosen expert fails to load (it is then marked failed in the
        registry), is unavailable for a while, or is still starting after its add, and the router
        chose it (not named by the client), try the router's next-best candidates, none of which is
        waited for. The answer says so: ``coe.fallback_reason``/``fallback_from``,
        ``x-coe-fallback-from``. When every candidate is still starting, the request waits for the
        chosen one as a request that names it would (``greq.loading_wait_s``)."""
        routed = info.forced != "expert"
        no_wait = greq.model_copy(update={"loading_wait_s": 0.0}) if routed else greq
        try:
            return (*await self._open_stream(info, no_wait), info)
        except APIError as e:
            if e.code not in FALLBACK_CODES or not routed:
                raise
            err, failed = e, [info.expert]
        snap = self.watcher.snapshot
        for cand in info.candidates:
            alt = cand.get("expert")
            spec = snap.experts.get(alt) if alt else None
            if not alt or alt in failed or (spec is not None and spec.status != "ready"):
                continue
            what = FALLBACK_WHY.get(err.code, "failed to load")
            reason = f"expert '{failed[0]}' {what} ({err.message}); answered by the next-best candidate '{alt}'"
            alt_info = CoeInfo.model_validate({**info.model_dump(), "expert": alt, "fallback_reason": reason,
                                               "fallback_from": failed[0]})
            try:
                gen, first, pending = await self._open_stream(alt_info, no_wait)
            except APIError as e2:
                if e2.code not in FALLBACK_CODES:
                    raise
                failed.append(alt)
                continue
            log.warning("%s", reason)
            return gen, first, pending, alt_info
        if err.code == "expert_loading":  # nothing else can answer now: wait for the chosen one
            return (*await self._open_stream(info, greq), info)
        raise err

    async def _within(self, deadline: float, timeout_s: float, coro):
        """Await ``coro`` before the request's deadline (504 ``request_timeout`` after it)."""
        try:
            return await asyncio.wait_for(coro, max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise APIError(504, f"the request did not finish within {timeout_s:g} s (limits.request_timeout_s "
                                "or X-Coe-Timeout)", "server_error", None, "request_timeout") from None

    # ---- keys and per-key limits ---------------------------------------------------------------
    def _identity(self, request: Request) -> StoredKey | None:
        """The caller's key record (role, limits), from the one check the auth middleware also uses;
        None when auth is off. (The middleware already refused requests without a valid key.)"""
        if not self.keys.configured:
            return None
        try:
            return self.keys.check(bearer_token(request.headers.get("authorization")))
        except KeyStoreUnavailable as e:
            raise APIError(503, f"the API key store cannot be read: {e}", "server_error", None,
                           "key_store_unavailable", 2) from None

    async def _identity_now(self, request: Request) -> StoredKey | None:
        """:meth:`_identity` in this event loop when the key ring answers from memory (the auth
        middleware checked it a moment ago, so it nearly always does: a dict lookup), in a thread
        only when it would read Redis. The thread hop was ~0.25 ms of every request (issue 13 item 6)."""
        return self._identity(request) if self.keys.fresh() else await asyncio.to_thread(self._identity, request)

    def _admit(self, key: StoredKey | None, req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> Reservation:
        """Reserve the request against its key's RPM/TPM/budget (429 + Retry-After when over)."""
        if key is None:
            return Reservation(None)
        try:
            return self.tenants.admit(key, estimate_tokens(prompt_token_bound(messages), req.requested_max_tokens(),
                                                           req.n or 1))
        except LimitExceeded as e:
            raise APIError(429, str(e), "rate_limit_error", None, f"key_{e.limit}_limit", e.retry_after_s) from None

    def _admit_route(self, key: StoredKey) -> None:
        """A ``/v1/route`` call against its key's request rate (429 + Retry-After when over)."""
        try:
            self.tenants.admit(key, 0).settle(0)
        except LimitExceeded as e:
            raise APIError(429, str(e), "rate_limit_error", None, f"key_{e.limit}_limit", e.retry_after_s) from None

    def _refused(self, key: StoredKey | None, ticket: Reservation, status: int, used_tokens: int = 0) -> None:
        """A request that failed or was refused: count it, give back what it reserved."""
        self.metrics.observe_error(status)
        self.metrics.observe_key(key.name if key else None, str(status))
        ticket.settle(used_tokens)

    # ---- endpoints ---------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        received_at = time.time()
        rid = request_id_of(request)
        timeout_s = request_timeout(self.limits, request.headers.get("x-coe-timeout"))
        deadline = time.monotonic() + timeout_s
        # a starting expert is waited for until 1 s before the deadline at most: a 503 with
        # Retry-After says more than the deadline's 504
        wait_s = min(loading_wait(self.limits, request.headers.get("x-coe-wait-timeout")), max(0.0, timeout_s - 1.0))
        session = request.headers.get("x-coe-session") or request.headers.get("x-session-id")
        key = await self._identity_now(request)
        ticket = Reservation(None)
        try:
            greq = to_generate_request(req, rid).model_copy(update={"loading_wait_s": wait_s})
            messages = normalise_messages(req.messages)
            permitted = allowed_experts(key.limits, self.watcher.snapshot.category_map) if key else None
            # refusals that need no work come first: a field no allowed expert honours, a forbidden
            # expert (400/403, not counted against the key), then the key's limits (429)
            feature_constraint(self.watcher.snapshot.experts, self.device, req.model, req.features(), permitted,
                               self.cfg.pool.options.engine_defaults)
            if key is not None:  # 429 before any routing work; only a key's limits need Redis
                ticket = await asyncio.to_thread(self._admit, key, req, messages)
            info, _spec = await self._within(deadline, timeout_s, self._route(
                req.model, messages, req.requested_max_tokens(), req.features(), permitted, session, rid,
                tenant=key.id if key else None))
            gen, first, pending, info = await self._within(deadline, timeout_s, self._open_with_fallback(info, greq))
            if not req.stream:  # a stream keeps its record once its first token is on its way (join_head)
                self._remember(rid, info, messages, key)
        except APIError as e:
            self._refused(key, ticket, e.status)
            raise
        except Exception as e:  # a replica died or is restarting: a clean 503, not a 500
            known = upstream_error(e)
            if known is None:
                raise
            self._refused(key, ticket, known.status)
            raise known from None
        headers = coe_headers(info)
        items = until_cut(with_deadline(_chain(pending, gen), max(0.001, deadline - time.monotonic()),
                                        cancel=gen.cancel, limit_s=timeout_s), self.drain_state)
        cid = f"chatcmpl-{rid}"
        builder = ChoicesBuilder(req.n or 1, bool(req.logprobs), req.forced_tool_choice())
        builder.prompt_tokens = int(first.get("prompt_tokens") or 0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            timing = ({"received": received_at, "enqueued": first.get("enqueued_at")}
                      if request.headers.get("x-coe-timing") == "1" else None)
            events = self._sse(items, builder, info, cid, include_usage, t0, key, ticket, timing)
            return StreamingResponse(join_head(events, len(builder.states),
                                               after_first=lambda: self._remember(rid, info, messages, key)),
                                     media_type="text/event-stream", headers=headers)
        try:
            async for item in items:
                if item.get("type") == "error":
                    raise _item_error(item)
                builder.add(item)
        except APIError as e:
            self._refused(key, ticket, e.status, builder.prompt_tokens + builder.completion_tokens)
            raise
        except Exception as e:  # deadline passed, or the pool replica died mid-generation
            known = upstream_error(e)
            if known is None:
                raise
            self._refused(key, ticket, known.status, builder.prompt_tokens + builder.completion_tokens)
            raise known from None
        usage = Usage(prompt_tokens=builder.prompt_tokens, completion_tokens=builder.completion_tokens)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        await asyncio.to_thread(ticket.settle, usage.total_tokens)
        self.metrics.observe_key(key.name if key else None, "ok", usage.prompt_tokens, usage.completion_tokens)
        body = ChatCompletionResponse(id=cid, model=info.expert, choices=builder.choices(), usage=usage, coe=info)
        self.metrics.observe_request(info.expert, info.category, "ok", usage.prompt_tokens, usage.completion_tokens,
                                     time.perf_counter() - t0)
        return JSONResponse(body.model_dump(mode="json", exclude_none=False), headers=headers)

    async def _sse(self, gen, builder: ChoicesBuilder, info: CoeInfo, cid: str, include_usage: bool,
                   t0: float, key: StoredKey | None = None,
                   ticket: Reservation | None = None, timing: dict | None = None) -> AsyncIterator[str]:
        """The SSE stream. With ``timing`` (request header ``x-coe-timing: 1``) the chunk carrying
        the first token also carries ``coe_timing``: wall-clock seconds at ingress receipt, pool
        enqueue and the pool's first token, so a client can measure what the HTTP path adds."""
        created = int(time.time())
        model = info.expert
        status = "ok"

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None, **extra: Any) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                     "logprobs": logprobs}], **extra})

        try:
            for i in sorted(builder.states):
                yield chunk(i, {"role": "assistant", "content": ""}, **({"coe": info.model_dump(mode="json")}
                                                                        if i == 0 else {}))
            try:
                async for item in gen:
                    if item.get("type") == "error":
                        status = "error"
                        err = _item_error(item)
                        self.metrics.observe_error(err.status)
                        yield _error_event(err)
                        break
                    st = builder.add(item)
                    if builder.forced_tool:  # the tool calls are sent whole when the choice ends
                        if st.finish:
                            msg, finish = builder.message(st)
                            delta = _tool_calls_delta(msg.tool_calls) if msg.tool_calls else {"content": msg.content}
                            yield chunk(st.index, delta, finish)
                        continue
                    lp = ({"content": [x.model_dump() for x in logprobs_out(item.get("logprobs"))]}
                          if builder.want_logprobs and item.get("logprobs") else None)
                    if item.get("text") or lp:
                        extra = {}
                        if timing is not None and item.get("text") and "first_token" not in timing:
                            timing["first_token"] = item.get("at")
                            extra["coe_timing"] = timing
                        yield chunk(st.index, {"content": item.get("text") or ""}, None, lp, **extra)
                    if st.tool_calls and item.get("tool_calls"):  # tool_choice auto: parsed by the engine
                        yield chunk(st.index, _tool_calls_delta(st.tool_calls))
                    if item.get("finish_reason"):
                        yield chunk(st.index, {}, item["finish_reason"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # deadline passed, the pool replica died, the drain cut it: end cleanly
                known = e if isinstance(e, APIError) else upstream_error(e)
                if known is None:
                    known = internal_error(cid.removeprefix("chatcmpl-"), e)
                status = "timeout" if isinstance(e, RequestTimeout) else "error"
                self.metrics.observe_error(known.status)
                yield _error_event(known)
            if status == "ok":
                for st in builder.states.values():  # a choice the engine ended without a finish reason
                    if st.finish is None:
                        st.finish = "stop"
                        yield chunk(st.index, {}, "stop")
                if include_usage:
                    usage = Usage(prompt_tokens=builder.prompt_tokens, completion_tokens=builder.completion_tokens,
                                  total_tokens=builder.prompt_tokens + builder.completion_tokens)
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage.model_dump()})
            yield sse("[DONE]")
        except asyncio.CancelledError:  # client went away: closing gen cancels the generation
            status = "cancelled"
            raise
        finally:
            self.metrics.observe_request(info.expert, info.category, status, builder.prompt_tokens,
                                         builder.completion_tokens, time.perf_counter() - t0)
            self.metrics.observe_key(key.name if key else None, status, builder.prompt_tokens,
                                     builder.completion_tokens)
            if ticket is not None and ticket.limiter is not None:  # no key, no limits: nothing to settle
                await asyncio.to_thread(ticket.settle, builder.prompt_tokens + builder.completion_tokens)

    # ---- feedback (coe/feedback.py, docs/api.md "Feedback") ---------------------------------------
    def _remember(self, rid: str, info: CoeInfo, messages: list[dict[str, Any]], key: StoredKey | None) -> None:
        """Keep which expert answers ``rid`` (in the background: the answer never waits for Redis;
        the write is done long before the answer is, so feedback right after it finds the record)."""
        if self.feedback is None:
            return
        store = self.feedback

        def write() -> None:
            try:
                store.remember(rid, info.expert, info.category, routing_text(messages), key.id if key else None)
            except Exception as e:  # noqa: BLE001 - feedback on this request will be a 404
                log.warning("could not keep request %s for feedback: %s", rid, e)

        task = asyncio.create_task(asyncio.to_thread(write))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @app.post("/v1/feedback")
    async def give_feedback(self, body: FeedbackRequest, request: Request) -> JSONResponse:
        """Score an answered request (0..1 or thumbs); the router's quality predictor learns it."""
        import redis

        from coe.feedback import FeedbackLimit, UnknownRequest

        if self.feedback is None:
            raise APIError(501, "feedback is switched off in this service (feedback.enabled: false)",
                           "invalid_request_error", None, "feedback_disabled")
        key = await self._identity_now(request)
        if key is not None and not key.limits.feedback:
            raise APIError(403, "this API key may not give feedback (coe keys limits NAME --feedback)",
                           "permission_error", None, "feedback_not_permitted")
        try:
            rec, replaced = await asyncio.to_thread(self.feedback.add, body.rid, body.value,
                                                    key.id if key else None, key is not None and key.role == "admin")
        except UnknownRequest as e:
            raise APIError(404, str(e), "invalid_request_error", "request_id", "request_not_found") from None
        except FeedbackLimit as e:
            raise APIError(429, str(e), "rate_limit_error", None, "feedback_limit", e.retry_after_s) from None
        except redis.RedisError as e:  # Redis unreachable: nothing was stored, the client may retry
            raise APIError(503, f"feedback could not be stored now ({type(e).__name__}); retry", "server_error",
                           None, "feedback_store_unavailable", 2) from None
        return JSONResponse({"object": "coe.feedback", "request_id": rec.request_id, "expert": rec.expert,
                             "category": rec.category, "score": rec.score, "replaced": replaced})

    @app.post("/v1/route")
    async def route(self, req: RouteRequest, request: Request) -> JSONResponse:
        """Explain a routing decision without generating: besides what every answer's ``coe`` field
        has, ``excluded`` (expert -> the hard constraint that removed it) and ``not_candidates``
        (expert -> why it did not compete, e.g. "not in the category map for coding").

        The caller's key counts as for a chat request (issue 24 item 7): only the experts it may use,
        its request rate (one request, no tokens), and its own conversations' affinity, decided but
        not remembered (a question about routing pins nothing)."""
        messages = normalise_messages(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        key = await self._identity_now(request)
        permitted = allowed_experts(key.limits, self.watcher.snapshot.category_map) if key else None
        if key is not None:
            await asyncio.to_thread(self._admit_route, key)
        session = request.headers.get("x-coe-session") or request.headers.get("x-session-id")
        why: dict[str, Any] = {}
        info, spec = await self._route(req.model, messages, max_tokens, permitted=permitted, session=session,
                                       explain=why, tenant=key.id if key else None, remember=False)
        body = {"object": "coe.route", "model": req.model, "coe": {**info.model_dump(mode="json"), **why},
                "expert": spec.model_dump(mode="json", include={"name", "max_context", "capabilities", "tags"})
                if spec is not None else None}
        return JSONResponse(body, headers=coe_headers(info))

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        snap = self.watcher.snapshot
        if self._categories is None:
            self._categories = await self.router.categories.remote()
        tiers, states, phases, since = await self._pool_view()
        ready = sorted(n for n, e in snap.experts.items() if e.status == "ready")
        cards = [ModelCard(id="coe", kind="router", experts=ready,
                           description="route each request to the best expert automatically")]
        for cat in sorted(self._categories):  # a map entry the router cannot route is not requestable
            cards.append(ModelCard(id=f"coe/{cat}", kind="category", experts=list(snap.category_map.get(cat, [])),
                                   description=f"force category '{cat}'; the router picks among its experts"))
        for name in sorted(snap.experts):
            e = snap.experts[name]
            status = e.status if e.status != "ready" else states.get(name, "ready")
            loading = status == "loading"
            cards.append(ModelCard(id=name, kind="expert", tier=tiers.get(name, "unloaded"), status=status,
                                   status_reason=hide_paths(e.status_reason) or phases.get(name),
                                   phase=phases.get(name) if loading else None,
                                   loading_s=since.get(name) if loading else None,
                                   max_context=e.max_context,
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

    async def _pool_view(self) -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, float]]:
        """Best tier, a status, a loading phase (or error) and seconds since its add while its
        engine starts, per expert, from the pool's snapshot."""
        tiers: dict[str, str] = {}
        states: dict[str, str] = {}
        phases: dict[str, str] = {}
        since: dict[str, float] = {}
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
                if e.get("loading_s") is not None:
                    since[name] = float(e["loading_s"])
        for rep in cluster_view().values():  # several nodes: the best tier any pool replica reports
            for name, e in rep.experts.items():
                t = str(e.get("tier"))
                if TIER_ORDER.get(t, 0) > TIER_ORDER.get(tiers.get(name, ""), 0):
                    tiers[name] = t
        return tiers, states, phases, since

    async def _insider(self, request: Request) -> bool:
        """Whether a probe's caller may see what is inside (DESIGN decision 8): always with auth
        off; with auth on only with a valid key. Without one a probe says up/ready and nothing more
        (no key count, Redis pid, invalid entries or category map; issue 24)."""
        if not self.keys.configured:
            return True
        try:
            return await self._identity_now(request) is not None
        except APIError:  # the key store cannot be read: no details
            return False

    @app.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        """200 while serving; ``status`` is "degraded" while Redis is unreachable (routing then uses
        the last registry snapshot and the watcher reconnects with backoff). The details only for a
        caller with a key when keys are on (:meth:`_insider`)."""
        from expert_registry.embedded import embedded_health

        if not await self._insider(request):
            return JSONResponse({"status": "ok" if self.watcher.health()["reachable"] else "degraded"})
        snap = self.watcher.snapshot
        reg = self.watcher.health()
        emb = embedded_health(self.cfg.redis_url)  # restarts of the embedded Redis, if it is the one
        if emb is not None:
            reg = {**reg, **emb}
        return JSONResponse({"status": "ok" if reg["reachable"] else "degraded", "version": __version__,
                             "registry_version": snap.version, "experts": len(snap.experts),
                             "registry": reg, "auth": "on" if _keys().configured else "off",
                             "keys": _keys().health(),
                             "uptime_s": round(time.time() - self.started_at, 1),
                             "draining": self.drain_state.draining})

    @app.get("/readyz")
    async def readyz(self, request: Request) -> JSONResponse:
        """200 when every routable category has a loaded, warmed expert; 503 (JSON) until then."""
        from coe.serve.readiness import readiness

        if self.drain_state.draining:  # a load balancer must stop sending at once
            return JSONResponse({"status": "draining", "detail": "shutting down: new requests are refused",
                                 **self.drain_state.status()}, status_code=503)
        residency = None
        if self.warm.done:
            try:
                residency = await asyncio.wait_for(self.pool.sync.remote(None), 5.0)
            except Exception as e:
                log.warning("readiness: the expert pool did not answer: %s", e)
            if residency is not None:  # several nodes: what every other pool replica reported too
                for name, v in merged_residency(cluster_view()).items():
                    residency[name] = max(residency.get(name, 0.0), v)
        ready, body = readiness(self.warm, residency)
        if not await self._insider(request):
            body = {"status": body.get("status", "ready" if ready else "not ready")}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        """Prometheus text; a user key sees its own per-key series only, an admin key every key's."""
        from coe.metrics import only_own_key

        self.metrics.invalid_entries.set(len(self.watcher.invalid))
        text = self.metrics.render(await self._pool_snapshots())
        key = await self._identity_now(request)
        if key is not None and key.role != "admin":
            text = only_own_key(text, key.name)
        return Response(text, media_type=CONTENT_TYPE_LATEST)
