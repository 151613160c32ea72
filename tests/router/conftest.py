"""Shared fixtures: the real MiniLM encoder (int8 ONNX) and a small router trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COE_HOME", str(Path(__file__).resolve().parents[2] / ".coe-test-home"))

from expert_registry.spec import Expert  # noqa: E402
from routers.data import LabeledPrompt, read_seed  # noqa: E402
from routers.encoder import get_encoder  # noqa: E402
from routers.router import Router  # noqa: E402

PER_CATEGORY = 20  # enough for a usable classifier, cheap to embed on 2 cores


@pytest.fixture(scope="session")
def encoder():
    return get_encoder()


@pytest.fixture(scope="session")
def small_data() -> list[LabeledPrompt]:
    by_cat: dict[str, list[LabeledPrompt]] = {}
    for r in read_seed():
        by_cat.setdefault(r.category, []).append(r)
    return [r for rs in by_cat.values() for r in rs[:PER_CATEGORY]]


@pytest.fixture(scope="session")
def small_router(encoder, small_data) -> Router:
    return Router.train(small_data, encoder, holdout=0.0, source="test")


def make_expert(name: str, **kw) -> Expert:
    kw.setdefault("model", f"/models/{name}")
    return Expert(name=name, **kw)
