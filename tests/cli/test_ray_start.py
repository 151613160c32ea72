"""Which Ray `coe serve` uses (issue 24 item 3): its own head unless the config names a cluster
(`ray_address`), and either way the address goes to `$COE_HOME/ray/address` for `coe drain`.
Ray itself is replaced by a recorder here: the real start is replayed in tests/security/test_own_ray.py."""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import pytest

from coe import cli, ray_local
from coe.config import ServeConfig


class _Status:
    def update(self, *_a) -> None: ...
    def stop(self) -> None: ...
    def start(self) -> None: ...


@pytest.fixture
def calls(monkeypatch, tmp_path):
    import ray

    monkeypatch.setenv("COE_HOME", str(tmp_path))
    seen: dict[str, dict] = {}
    ctx = SimpleNamespace(address_info={"gcs_address": "127.0.0.1:6390", "session_dir": str(tmp_path / "s")},
                          dashboard_url="127.0.0.1:8265")

    def local(**kw):
        seen["local"] = kw
        return ctx

    def join(**kw):
        seen["join"] = kw
        return ctx

    monkeypatch.setattr(ray_local, "init_local_ray", local)
    monkeypatch.setattr(ray, "init", join)
    return seen


def _start(cfg: ServeConfig) -> dict:
    started: dict = {}
    cli._start_ray(cfg, started, 8265, None, lambda: None, _Status())
    return started


def test_serve_starts_its_own_head_by_default(calls, tmp_path):
    started = _start(ServeConfig())
    assert "local" in calls and "join" not in calls
    rec = json.loads((tmp_path / "ray" / "address").read_text())
    assert rec["address"] == "127.0.0.1:6390" and rec["started_head"] and rec["pid"] == os.getpid()
    assert stat.S_IMODE((tmp_path / "ray" / "address").stat().st_mode) == 0o600
    cli._shutdown({"address_file": started["address_file"]})
    assert not (tmp_path / "ray" / "address").exists()


def test_serve_joins_only_the_cluster_its_config_names(calls, tmp_path):
    _start(ServeConfig(ray_address="10.0.0.5:6379"))
    assert "local" not in calls and calls["join"]["address"] == "10.0.0.5:6379"
    rec = json.loads((tmp_path / "ray" / "address").read_text())
    assert rec["address"] == "10.0.0.5:6379" and not rec["started_head"]
