"""inspect_model: reads configs and GGUF headers without loading weights; clear errors otherwise."""

from __future__ import annotations

import pytest

from expert_registry.errors import ModelNotFound, ModelUnreadable
from expert_registry.model_files import inspect_model

from .helpers import make_garbage_gguf, make_model_folder, make_truncated_gguf


def test_gguf(smollm2_gguf):
    info = inspect_model(str(smollm2_gguf))
    assert info.format == "gguf" and info.architecture == "llama"
    assert info.size_bytes == smollm2_gguf.stat().st_size
    assert info.context_length == 8192
    assert 130e6 < info.params_estimate < 140e6  # SmolLM2-135M
    # same file addressed as folder + gguf_file
    assert inspect_model(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name) == info


def test_transformers_folder(tiny_model_dir):
    info = inspect_model(tiny_model_dir)
    assert info.format == "safetensors" and info.architecture == "LlamaForCausalLM"
    assert info.size_bytes == sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert info.context_length == 2048
    import math

    from safetensors import safe_open

    numel = 0
    for f in tiny_model_dir.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            for k in st.keys():
                numel += math.prod(st.get_slice(k).get_shape())
    assert info.params_estimate == numel


def test_errors(tmp_path, smollm2_gguf, monkeypatch):
    with pytest.raises(ModelNotFound, match="does not exist"):
        inspect_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelUnreadable, match="bad magic"):
        inspect_model(str(make_garbage_gguf(tmp_path / "g.gguf")))
    with pytest.raises(ModelUnreadable, match="truncated"):
        inspect_model(str(make_truncated_gguf(smollm2_gguf, tmp_path / "t.gguf")))
    folder = make_model_folder(tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelUnreadable, match="config.json"):
        inspect_model(str(folder))
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelUnreadable, match="no \\*.safetensors"):
        inspect_model(str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        inspect_model("some-org/some-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFound, match="local Hugging Face cache"):
        inspect_model("some-org/some-model")
