"""The serve layer's plain parts, without Ray: request validation, registry diffs, config files,
and how pool numbers become Prometheus series."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from coe.api.errors import APIError
from coe.api.protocol import ChatCompletionRequest, ChatMessageIn
from coe.config import ServeConfig
from coe.metrics import IngressMetrics, pool_series
from coe.serve.ingress import normalise_messages, routing_text
from coe.serve.registry_watch import diff_snapshots
from expert_registry.spec import Expert

REPO = Path(__file__).resolve().parents[2]


def msgs(*pairs):
    return [ChatMessageIn(role=r, content=c) for r, c in pairs]


def test_messages_are_normalised_and_empty_prompts_refused():
    out = normalise_messages(msgs(("developer", "be brief"), ("user", "hi")))
    assert out == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    parts = ChatMessageIn.model_validate({"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]})
    assert normalise_messages([parts])[0]["content"] == "ab"
    for bad in ([], msgs(("system", "only a system prompt")), msgs(("user", "  \n"))):
        with pytest.raises(APIError) as e:
            normalise_messages(bad)
        assert e.value.status == 400 and e.value.param == "messages"
    image = ChatMessageIn.model_validate({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})
    with pytest.raises(APIError, match="only text parts"):
        normalise_messages([image])


def test_routing_uses_the_last_user_turn():
    m = normalise_messages(msgs(("user", "Write a poem about rain."), ("assistant", "Drip drop."),
                                ("user", "Now solve 2x + 3 = 9 for x and explain each step.")))
    assert routing_text(m) == "Now solve 2x + 3 = 9 for x and explain each step."


def test_request_schema_accepts_openai_extras_and_prefers_max_completion_tokens():
    r = ChatCompletionRequest.model_validate({"model": "coe", "messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 50, "max_completion_tokens": 20, "stop": "END",
                                              "frequency_penalty": 0.1, "user": "u1"})
    assert r.requested_max_tokens() == 20 and r.stop == ["END"]


@dataclass
class Snap:
    version: int
    experts: dict
    category_map: dict


def test_registry_diff_finds_added_removed_updated_and_map_changes():
    a = Expert(name="a", model="/m/a")
    b = Expert(name="b", model="/m/b")
    old = Snap(1, {"a": a, "b": b}, {"general": ["a"]})
    new = Snap(2, {"a": a.model_copy(update={"system_prompt": "new"}), "c": Expert(name="c", model="/m/c")},
               {"general": ["a"]})
    d = diff_snapshots(old, new)
    assert (d.added, d.removed, d.updated, d.map_changed) == (["c"], ["b"], ["a"], False)
    # a status flip alone is not a spec change; a map change is seen
    new2 = Snap(3, {"a": a.model_copy(update={"status": "failed"}), "b": b}, {"general": ["b"]})
    d = diff_snapshots(old, new2)
    assert d.updated == [] and d.map_changed


def test_deploy_files_parse_into_the_service_config():
    cfg = ServeConfig.from_yaml(REPO / "deploy" / "serve_config.yaml")
    assert (cfg.host, cfg.port, cfg.pool.num_replicas) == ("127.0.0.1", 8000, 1)
    doc = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "coe.serve.app:build_app"
    k8s = ServeConfig.model_validate(app["args"])
    assert k8s.pool.device == "cuda" and k8s.pool.num_gpus == 1
    env = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "COE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "coe-redis", "key": "url"}}} in env
    # Kubernetes sends traffic only to a warm app: readiness is coe's /readyz on every pod
    spec = doc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        probe = pod["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/readyz", "port": 8000}
        # the pod outlives the drain and Ray's grace for it; Ray's proxy answers its own errors as JSON
        assert pod["template"]["spec"]["terminationGracePeriodSeconds"] > k8s.shutdown.ray_graceful_timeout_s()
        env = pod["template"]["spec"]["containers"][0]["env"]
        assert {"name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": "coe.serve.proxy_errors:middlewares"} in env
    pre_stop = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["coe", "drain"]


def test_bad_config_is_a_one_line_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pool: {num_replicas: 0}\n")
    with pytest.raises(Exception, match="num_replicas"):
        ServeConfig.from_yaml(p)
    with pytest.raises(ValueError, match="not found"):
        ServeConfig.from_yaml(tmp_path / "missing.yaml")


def test_pool_numbers_become_labelled_series():
    m = {"bytes": {"hbm": 10, "dram": 20}, "swaps": {"disk->dram": 2, "dram->hbm": 3}, "evictions": 1,
         "served": {"a": 4}, "batch_sizes": {"a": [1, 2]}}
    series = {(n, tuple(sorted(l.items()))): v for n, _, _, l, v in pool_series(m)}
    assert series[("coe_tier_bytes", (("tier", "dram"),))] == 20
    assert series[("coe_swaps", (("dst", "hbm"), ("src", "dram")))] == 3
    assert series[("coe_evictions", ())] == 1
    assert series[("coe_expert_served", (("expert", "a"),))] == 4
    text = IngressMetrics(use_ray=False).render([{"replica": "r1", "experts": {}, "metrics": m}]).decode()
    assert 'coe_swaps_total{dst="hbm",replica="r1",src="dram"} 3.0' in text


def test_readiness_needs_every_routable_category_in_memory():
    from coe.serve.readiness import WarmUp, readiness

    w = WarmUp(plan={"math": ["tutor", "general"], "coding": ["coder"]})
    ready, body = readiness(w, {"tutor": 1.0, "coder": 0.5})
    assert not ready and body["status"] == "starting"  # not warmed up yet
    w.done = True
    assert readiness(w, None)[0] is False  # the pool did not answer
    ready, body = readiness(w, {"tutor": 0.0, "general": 0.5, "coder": 1.0})
    assert ready and body["categories"] == {"coding": "coder", "math": "general"}
    ready, body = readiness(w, {"tutor": 1.0, "coder": 0.0})  # coder evicted to disk or failed
    assert not ready and body["status"] == "not_ready" and "coding" in body["detail"]


def test_deployment_errors_are_typed_and_only_the_ingress_picks_the_status():
    """Decision 2: the pool and router deployments answer with an ErrorReport (kind + code, no
    HTTP); the ingress turns it into the status and OpenAI body a client of vLLM would expect."""
    from coe.api.errors import from_report
    from coe.errors import ErrorKind, ErrorReport, ExpertTransientError
    from coe.serve.ingress import _item_error
    from coe.serve.pool_deployment import _err, _load_failed, _transient
    from coe.serve.router_deployment import route_error
    from routers.errors import NoEligibleExpert, UnknownModel

    item = _transient(ExpertTransientError("a", "CUDA out of memory", retry_after_s=1.2))
    assert set(item) == {"type", "error"} and "status" not in item["error"]  # nothing HTTP crosses
    got = _item_error(item)
    assert (got.status, got.code, got.type, got.retry_after) == (503, "expert_unavailable", "server_error", 2)
    got = _item_error(_load_failed("expert 'a' could not be loaded: missing /srv/models/a/model.safetensors"))
    assert got.status == 503 and got.code == "expert_load_failed" and "/srv/models" not in got.message
    got = _item_error(_err(ErrorKind.TRANSIENT, "queue_full", "queue of 'a' is full; retry in 3 s", None, 3))
    assert (got.status, got.type, got.retry_after) == (429, "rate_limit_error", 3)
    got = _item_error(_err(ErrorKind.REQUEST, "context_length_exceeded", "too long", "max_tokens"))
    assert (got.status, got.type, got.param) == (400, "invalid_request_error", "max_tokens")
    got = _item_error(_err(ErrorKind.REQUEST, "model_not_found", "expert 'x' is not registered"))
    assert got.status == 404

    assert from_report(route_error(UnknownModel("x", ["coe"]), {})).status == 404
    none = NoEligibleExpert("coe", {"a": "failed: bad file"})
    assert route_error(none, {}).kind is ErrorKind.PERMANENT and from_report(route_error(none, {})).status == 503
    too_long = NoEligibleExpert("coe", {"a": "context 512 < 900 tokens"})
    assert from_report(route_error(too_long, {"max_tokens": 900})).status == 400
    crash = from_report(route_error(RuntimeError("boom"), {}))
    assert crash.status == 500 and crash.type == "server_error"
    with pytest.raises(ValueError):  # a report is closed: an HTTP field smuggled in is refused
        ErrorReport.model_validate({"kind": "request", "message": "x", "status": 400})


def test_the_role_chunks_leave_with_the_first_token_and_the_bytes_are_unchanged():
    """``join_head``: the client reads exactly the events ``_sse`` made, the opening role chunks in
    the message of the first token; the feedback record is written once, after that message."""
    import asyncio

    from coe.serve.ingress import join_head

    async def events(items):
        for e in items:
            yield e

    async def collect(items, n):
        calls = []
        got = []
        async for m in join_head(events(items), n, after_first=lambda: calls.append(len(got))):
            got.append(m)
        return got, calls

    items = ["data: role0\n\n", "data: role1\n\n", "data: tok\n\n", "data: [DONE]\n\n"]
    got, calls = asyncio.run(collect(items, 2))
    assert got == ["data: role0\n\ndata: role1\n\ndata: tok\n\n", "data: [DONE]\n\n"]
    assert calls == [1]  # after the first message was handed on, once
    got, calls = asyncio.run(collect(items[:1], 1))  # a stream that ends before anything follows
    assert got == items[:1] and calls == [1]
