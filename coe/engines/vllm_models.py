"""Llama-shaped model folders for vLLM's ``load_format="dummy"`` (random weights, no files to read).

A folder holds ``config.json`` and a word-level tokenizer whose vocabulary is exactly the model's
(``<unk> <s> </s> <pad> w4 … w{V-1}``), so every id a random model samples decodes to text, and a
prompt of ``n`` words ``"w17 w2048 …"`` is exactly ``n`` tokens: the serving bench gets 128-token
prompts without a real tokenizer or a download. No torch and no vLLM are needed to write one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Shapes of the public Llama models (vocabulary of Llama 3).
SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}
N_SPECIAL = 4  # <unk> <s> </s> <pad>
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def llama_param_count(shape: dict[str, Any]) -> int:
    """Parameters of a Llama-architecture model of this shape (weights only)."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv, v = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    hd = shape.get("head_dim") or h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    emb = v * h * (1 if shape.get("tie_word_embeddings") else 2)
    return n * per_layer + emb + h


def _tokenizer_json(vocab_size: int) -> dict[str, Any]:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(N_SPECIAL, vocab_size)})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def build_dummy_folder(path: str | Path, shape: str | dict[str, Any] = "3b", max_position_embeddings: int = 4096,
                       dtype: str = "bfloat16") -> Path:
    """Write ``config.json`` + tokenizer for a Llama-shaped model; weights come from vLLM's dummy loader."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    s = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **s,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": dtype,
        "initializer_range": 0.02,
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(s["vocab_size"])))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": max_position_embeddings,
        "chat_template": PLAIN_TEMPLATE, "clean_up_tokenization_spaces": False,
    }))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    return path


def word_prompt(n_tokens: int, vocab_size: int, rng: random.Random) -> str:
    """A prompt of exactly ``n_tokens`` tokens for a :func:`build_dummy_folder` tokenizer."""
    return " ".join(f"w{rng.randrange(N_SPECIAL, vocab_size)}" for _ in range(n_tokens))
