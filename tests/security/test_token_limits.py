"""Issue 24 item 8: a key's token limit cannot be passed by text that costs more tokens than
characters. Before, admission reserved characters / 4: 13 of 20 concurrent 600-emoji requests
passed a 2,000-TPM key, for 23,764 tokens. The reservation is now an upper bound (UTF-8 bytes plus
the chat template's overhead), checked here against a real byte-level tokenizer (the worst case:
one token per byte) and a real Redis, with requests admitted concurrently."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from coe.engines.synthetic import byte_tokenizer
from coe.keys import KeyLimits, RedisKeyStore
from coe.tenant_limits import LimitExceeded, TenantLimiter, estimate_tokens, prompt_token_bound

TEXTS = ["😀" * 600, "日本語のテキスト" * 40, "plain ascii " * 50, "mixed 😀 ünïcödé ✓ 𝔘 " * 30, "", "\u200d" * 100]


def true_tokens(tok, messages) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", TEXTS)
def test_the_reservation_never_counts_fewer_tokens_than_the_prompt_has(text):
    tok = byte_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text, "name": "ann"}]
    assert true_tokens(tok, messages) <= prompt_token_bound(messages)


def test_concurrent_emoji_requests_overshoot_a_tpm_limit_by_at_most_one_request(redis_url):
    store = RedisKeyStore(redis_url, f"tpm-emoji-{uuid.uuid4().hex[:8]}")
    _, key = store.add("tenant-b", limits=KeyLimits(tpm=2000))
    limiter = TenantLimiter(store.r, store.namespace)
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "😀" * 150}]  # 600 bytes: a few fit in 2,000 tokens
    cost = true_tokens(tok, messages) + 16  # max_tokens=16, all generated

    def one(_):
        try:
            limiter.admit(key, estimate_tokens(prompt_token_bound(messages), 16))
            return cost
        except LimitExceeded:
            return 0

    with ThreadPoolExecutor(20) as pool:
        spent = sum(pool.map(one, range(20)))
    assert 0 < spent <= 2000 + cost  # at most one request past the limit (here: none)
