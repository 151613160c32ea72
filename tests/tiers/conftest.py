"""Tier/pool-test fixtures (same as tests/engines/conftest.py): a second tiny model (byte tokenizer) and the converted SmolLM2 folder.

``tiny_model_dir`` / ``smollm2_gguf`` / ``coe_home`` come from tests/conftest.py. The GGUF is
converted once per cache (``$COE_HOME/models`` links to the shared test cache)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coe.engines.synthetic import build_llama_folder

    return build_llama_folder(tmp_path_factory.mktemp("byte-llama"), seed=1, max_position_embeddings=4096)


@pytest.fixture(scope="session")
def smollm_dir(smollm2_gguf: Path, coe_home: Path) -> Path:
    from coe.engines.sources import ensure_converted

    return ensure_converted(smollm2_gguf)


def make_expert(name: str, model: str | Path, **kw):
    from expert_registry.spec import Expert

    return Expert(name=name, model=str(model), **kw)
