"""Finding 3 of issue 12: any local user could run code as the service user through Ray.

The token file was 0644 in a 0755 directory and Ray's GCS, raylet, worker, agent and metrics-export
ports listened on every interface. The exploit needs a second local user, so these tests assert what
closes it, on the session's real Ray (started by ``coe.ray_local.init_local_ray``, as ``coe serve``
does): every socket any Ray process listens on is loopback, and the token is 0600 in a 0700 dir."""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from coe.ray_local import listeners, secure_token, token_path

pytestmark = pytest.mark.timeout(120)


def test_every_ray_port_listens_on_loopback_only(serve_app, http):
    assert http.get("/healthz").status_code == 200  # Ray, Serve and the app are up
    socks = listeners()
    names = {s.process for s in socks}
    # the servers the report found open: GCS, raylet (node manager, object manager), workers, agents
    assert {"gcs_server", "raylet"} <= names, names
    assert any("DashboardAgent" in n for n in names) and any("RuntimeEnvAgent" in n for n in names), names
    open_ = [s for s in socks if not s.loopback]
    # the one exception Ray does not let us configure: each Serve replica's inter-deployment gRPC
    # server binds [::]:0 (hard-coded in ray/serve/_private/replica.py); it requires Ray's token
    assert all(s.process.startswith("ray::ServeReplica:") for s in open_), \
        f"Ray ports reachable from other machines: {open_}"
    for s in open_:
        assert _grpc_status(s.port) == "UNAUTHENTICATED", s


def _grpc_status(port: int) -> str:
    """The status of a gRPC call without Ray's token to a server on this machine."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as e:
            return e.code().name
    return "OK"


def test_metrics_export_port_is_loopback(serve_app):
    """The metrics-export (Prometheus) port answered without a token on every interface."""
    import ray

    node = ray.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    port = node["MetricsExportPort"]
    assert any(s.port == port and s.loopback for s in listeners())
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200


def test_token_file_is_private(serve_app):
    path = token_path()
    assert path.exists() and path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_existing_loose_token_is_tightened(tmp_path):
    """A token Ray wrote earlier with the default umask is fixed in place (its value kept)."""
    d = tmp_path / ".ray"
    d.mkdir(mode=0o755)
    f = d / "auth_token"
    f.write_text("abc123")
    os.chmod(f, 0o644)
    assert secure_token(f) == f
    assert f.read_text() == "abc123"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    fresh = secure_token(tmp_path / "new" / "auth_token")
    assert len(fresh.read_text()) == 64 and stat.S_IMODE(fresh.stat().st_mode) == 0o600
