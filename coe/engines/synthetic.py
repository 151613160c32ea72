"""Random-weight Llama-shaped model folders (config + byte-level tokenizer + safetensors).

Used by the CPU tests (tiny shapes) and by ``bench/switch.py`` (the 8B shape on a GPU): the engine
loads them through exactly the same path as a real model folder. No download, no hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384, max_position_embeddings=512, tie_word_embeddings=True)


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 4 specials; every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_llama_folder(path: str | Path, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                       **overrides: Any) -> Path:
    """Write a random-weight LlamaForCausalLM (``TINY`` shape unless overridden) to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = byte_tokenizer()
    shape = {**TINY, **overrides}
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # make tiny models less degenerate than N(0, 0.02): outputs vary with input
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] * p.shape[1] <= 10_000_000:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5 * 4)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    del model
    return path
