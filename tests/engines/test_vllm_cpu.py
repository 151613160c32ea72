"""What of the vLLM engine and the serving bench can be checked without a GPU and without vLLM.

* engine selection: ``auto`` means vLLM only with CUDA *and* vLLM; asking for vLLM where it cannot
  run is one clear error, and importing coe never imports vLLM;
* the pinned-copy capture/restore (the code the vLLM worker runs) on a real tiny torch module whose
  tensors stand in for vLLM's weight allocations;
* the dummy model folders (tokenizer round trip, exact prompt lengths, parameter counts);
* the bench's trace: deterministic per seed, Zipf-shaped popularity, Poisson arrivals.
"""

from __future__ import annotations

import ctypes
import importlib.util
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from coe.engines.vllm_engine import (
    VLLMEngine,
    VLLMUnavailable,
    auto_engine_kind,
    cuda_available,
    require_vllm,
    vllm_installed,
)
from coe.engines.vllm_models import SHAPES, build_dummy_folder, llama_param_count, word_prompt
from coe.engines.vllm_worker import PinnedCopy
from expert_registry.spec import EngineSettings, Expert

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import serve_gpu  # noqa: E402
from vllm_baselines import BaselineVLLMEngine, BaselineWorkerExtension  # noqa: E402

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _memmove(dst: int, src: int, n: int) -> None:
    ctypes.memmove(dst, src, n)


# ------------------------------------------------------------------------------ engine selection
def test_auto_picks_vllm_only_with_cuda_and_vllm():
    want = "vllm" if (HAVE_VLLM and torch.cuda.is_available()) else "hf"
    assert auto_engine_kind() == want
    assert vllm_installed() is HAVE_VLLM
    assert cuda_available() is torch.cuda.is_available()


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_missing_vllm_is_one_clear_error(tmp_path):
    with pytest.raises(VLLMUnavailable, match=r"pip install 'coe\[gpu\]'"):
        require_vllm()
    folder = build_dummy_folder(tmp_path / "m", "tiny")
    eng = VLLMEngine(Expert(name="v", model=str(folder), engine="vllm"), device="cuda",
                     settings=EngineSettings(load_format="dummy"))
    import asyncio

    with pytest.raises(VLLMUnavailable) as err:
        asyncio.run(eng.load())
    assert "\n" not in str(err.value)
    assert eng.tier.value == "disk"


def test_vllm_engine_refuses_a_cpu_device(tmp_path):
    folder = build_dummy_folder(tmp_path / "m", "tiny")
    with pytest.raises(VLLMUnavailable, match="CUDA GPU"):
        VLLMEngine(Expert(name="v", model=str(folder), engine="vllm"), device="cpu")
    with pytest.raises(TypeError, match="switch_mode"):  # the service's engine switches one way only
        VLLMEngine(Expert(name="v", model=str(folder), engine="vllm"), device="cuda", switch_mode="sleep")
    with pytest.raises(ValueError, match="switch_mode"):  # the bench's knows three
        BaselineVLLMEngine(Expert(name="v", model=str(folder), engine="vllm"), device="cuda", switch_mode="fast")


def test_importing_coe_does_not_import_vllm():
    code = ("import sys, coe, coe.engines, coe.engines.vllm_engine, coe.engines.vllm_worker, coe.pool, coe.tiers;"
            "bad = [m for m in ('vllm', 'ray', 'sentence_transformers') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "vllm" not in out.stdout.split(",")


def test_worker_extensions_resolve_and_only_the_bench_has_its_calls(tmp_path):
    """vLLM imports ``worker_extension_cls`` by name in the engine process: both names must
    resolve here, and the service's worker must not carry the bench's calls."""
    from coe.engines.vllm_worker import CoeWorkerExtension

    folder = build_dummy_folder(tmp_path / "m", "tiny")
    ex = Expert(name="v", model=str(folder), engine="vllm")
    settings = EngineSettings(load_format="dummy")

    def resolve(qualname: str) -> type:
        mod, _, cls = qualname.rpartition(".")
        return getattr(importlib.import_module(mod), cls)

    prod = resolve(VLLMEngine(ex, device="cuda", settings=settings)._engine_kwargs()["worker_extension_cls"])
    bench = resolve(BaselineVLLMEngine(ex, device="cuda", settings=settings)._engine_kwargs()["worker_extension_cls"])
    assert prod is CoeWorkerExtension and bench is BaselineWorkerExtension and issubclass(bench, prod)
    bench_only = {"coe_randomize", "coe_weights_digest", "coe_save_file", "coe_restore_file", "coe_host_empty_cache"}
    assert bench_only <= set(dir(bench)) and not bench_only & set(dir(prod))
    for name in ("set_switch_mode", "set_host_alloc", "drop_host_copy", "weights_digest"):
        assert hasattr(BaselineVLLMEngine, name) and not hasattr(VLLMEngine, name)


class _RecordingLLM:
    """Stands in for vLLM's ``AsyncLLM`` where vLLM cannot run: records the calls an engine makes
    and answers each worker call with a plausible value. It checks which vLLM calls each switch
    makes, not that vLLM does them right (tests/engines/test_vllm_gpu.py does, on a GPU)."""

    ANSWERS = {"coe_weight_bytes": 1000, "coe_pid": -1, "coe_capture": {}, "coe_restore": 0.0,
               "coe_wake_restore": {"total_s": 0.0, "map_and_issue_s": 0.0, "map_others_s": 0.0},
               "coe_save_file": {}, "coe_restore_file": 0.0, "coe_randomize": 0}

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def collective_rpc(self, method, args=()):
        self.calls.append((method, *(a for a in args if not isinstance(a, str))))
        return [self.ANSWERS[method]]

    async def sleep(self, level):
        self.calls.append(("sleep", level))

    async def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def shutdown(self):
        self.calls.append(("shutdown",))


_LOAD = [("coe_weight_bytes",), ("coe_pid",)]
_SWITCHES = {  # load, then HBM and back twice: (load's own calls, one DRAM->HBM, one HBM->DRAM)
    "pinned": ([("coe_capture",), ("sleep", 2)], [("coe_wake_restore", 2), ("wake_up", None)], [("sleep", 2)]),
    "sleep": ([("sleep", 1)], [("wake_up", None)], [("sleep", 1)]),
    "reload": ([("coe_save_file",), ("sleep", 2)],
               [("wake_up", ["weights"]), ("coe_restore_file",), ("wake_up", ["kv_cache"])], [("sleep", 2)]),
}


@pytest.mark.parametrize("kind", ["service", "pinned", "sleep", "reload"])
def test_each_switch_mode_makes_its_vllm_calls(tmp_path, kind):
    """The service's engine switches coe's way; the bench's engine, in mode ``pinned``, makes the
    very same calls, and in its baseline modes vLLM's own sleep/wake or a reload from a file."""
    import asyncio

    folder = build_dummy_folder(tmp_path / "m", "tiny")
    ex = Expert(name="v", model=str(folder), engine="vllm")
    settings = EngineSettings(load_format="dummy")
    if kind == "service":
        eng = VLLMEngine(ex, device="cuda", settings=settings)
    else:
        eng = BaselineVLLMEngine(ex, device="cuda", settings=settings, switch_mode=kind, dummy_init_seed=5,
                                 reload_dir=str(tmp_path / "reload"))
    llm = _RecordingLLM()
    eng._build = lambda: llm

    async def go():
        await eng.load()
        for _ in range(2):
            await eng.to_hbm()
            assert eng.tier.value == "hbm"
            await eng.to_dram()
            assert eng.tier.value == "dram"
        await eng.unload()

    asyncio.run(go())
    load, wake, sleep = _SWITCHES["pinned" if kind == "service" else kind]
    seeded = [] if kind == "service" else [("coe_randomize", 5)]
    assert llm.calls == seeded + _LOAD + load + [("coe_pid",)] + (wake + sleep) * 2 + [("shutdown",)]
    assert eng.tier.value == "disk"


def test_footprint_of_a_dummy_folder_counts_llama_weights(tmp_path):
    folder = build_dummy_folder(tmp_path / "m", "8b")
    eng = VLLMEngine(Expert(name="v", model=str(folder), engine="vllm", dtype="bfloat16"), device="cuda",
                     settings=EngineSettings(load_format="dummy"))
    assert eng.footprint_bytes() == llama_param_count(SHAPES["8b"]) * 2
    assert 16.0e9 < eng.footprint_bytes() < 16.1e9  # Llama-3.1-8B is 16.06 GB in bf16


@pytest.mark.parametrize("shape", ["1b", "3b", "8b"])
def test_param_count_matches_transformers(shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert llama_param_count(SHAPES[shape]) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ pinned copy
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(97, 32)
        self.lin = torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 97, bias=False)
        self.register_buffer("scale", torch.tensor([1.5]))

    def forward(self, ids):
        return self.out(torch.relu(self.lin(self.emb(ids)))) * self.scale


def _chunks(module: torch.nn.Module) -> list[tuple[int, int]]:
    ts = list(module.parameters()) + list(module.buffers())
    return sorted((t.data_ptr(), t.numel() * t.element_size()) for t in ts)


def _captured(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[tuple[int, int]], PinnedCopy]:
    """A tiny model, an input, its output, its chunks and a pinned copy captured from them."""
    torch.manual_seed(seed)
    m = _Tiny().eval()
    ids = torch.arange(20)
    with torch.no_grad():
        before = m(ids).clone()
    chunks = _chunks(m)
    pc = PinnedCopy(chunks)
    pc.capture(_memmove)
    return m, ids, before, chunks, pc


def test_pinned_copy_restores_discarded_weights_exactly():
    m, ids, before, chunks, pc = _captured(0)
    assert pc.nbytes == sum(s for _, s in chunks) and pc.host_bytes >= pc.nbytes
    assert all(off % 4096 == 0 for off in pc.offsets)
    with torch.no_grad():  # what sleep(level=2) + wake_up(["weights"]) leave: memory with other contents
        for t in list(m.parameters()) + list(m.buffers()):
            t.fill_(float("nan"))
        assert torch.isnan(m(ids)).all()
    for _ in range(10):  # ten switches: restore, trash again, restore
        pc.restore(_memmove, _chunks(m))
        with torch.no_grad():
            assert torch.equal(m(ids), before)
            for t in m.parameters():
                t.zero_()
    pc.restore(_memmove, _chunks(m))
    with torch.no_grad():
        assert torch.equal(m(ids), before)


def test_one_pass_restore_maps_each_chunk_just_before_its_copy_across_streams():
    """The one-pass wake's order: chunk i is mapped, then its copy is queued (on the streams in
    turn), before chunk i+1 is mapped, so copies overlap mapping; the bytes still come back exact."""
    from coe.engines.vllm_worker import round_robin

    m, ids, before, chunks, pc = _captured(1)
    with torch.no_grad():
        for t in m.parameters():
            t.fill_(float("nan"))
    events: list[tuple] = []

    def copy(dst: int, src: int, n: int, stream: str) -> None:
        events.append(("copy", dst, stream))
        ctypes.memmove(dst, src, n)

    pc.restore(round_robin(["s0", "s1", "s2"], copy), chunks, prepare=lambda i: events.append(("map", chunks[i][0])))
    assert [e[0] for e in events] == ["map", "copy"] * len(chunks)
    assert [e[1] for e in events[::2]] == [e[1] for e in events[1::2]] == [ptr for ptr, _ in chunks]
    assert [e[2] for e in events[1::2]] == [f"s{i % 3}" for i in range(len(chunks))]
    with torch.no_grad():
        assert torch.equal(m(ids), before)


def test_pinned_copy_refuses_changed_allocations():
    m = _Tiny()
    pc = PinnedCopy(_chunks(m))
    pc.capture(_memmove)
    other = _Tiny()
    with pytest.raises(RuntimeError, match="capture it again"):
        pc.restore(_memmove, _chunks(other))


# ------------------------------------------------------------------------------ dummy folders
def test_dummy_tokenizer_every_id_decodes_and_prompts_are_exact(tmp_path):
    from transformers import AutoTokenizer

    folder = build_dummy_folder(tmp_path / "m", "tiny")
    tok = AutoTokenizer.from_pretrained(str(folder))
    v = SHAPES["tiny"]["vocab_size"]
    assert len(tok) == v
    rng = random.Random(3)
    prompt = word_prompt(128, v, rng)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == 128 and tok.unk_token_id not in ids
    assert tok.decode(ids) == prompt
    assert tok.decode([v - 1]) == f"w{v - 1}"
    assert tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True) == prompt


# ------------------------------------------------------------------------------ bench trace
def test_trace_is_deterministic_per_seed():
    a = serve_gpu.make_trace(300, 20.0, 6, seed=5, vocab_size=4096)
    b = serve_gpu.make_trace(300, 20.0, 6, seed=5, vocab_size=4096)
    c = serve_gpu.make_trace(300, 20.0, 6, seed=6, vocab_size=4096)
    assert a == b
    assert a != c
    assert all(len(r.prompt.split()) == 128 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)


def test_trace_popularity_is_zipf_and_arrivals_poisson():
    n, rate, k = 20000, 25.0, 6
    tr = serve_gpu.make_trace(n, rate, k, zipf_s=1.0, prompt_tokens=1, vocab_size=64, seed=1)
    counts = Counter(r.expert for r in tr)
    want = serve_gpu.zipf_weights(k, 1.0)
    assert [round(w * sum(1 / j for j in range(1, k + 1)), 9) for w in want] == [round(1 / j, 9) for j in range(1, k + 1)]
    for e in range(k):  # within 4 standard deviations of the binomial count
        sd = (n * want[e] * (1 - want[e])) ** 0.5
        assert abs(counts[e] - n * want[e]) < 4 * sd, (e, counts[e], n * want[e])
    assert counts[0] > counts[1] > counts[2] > counts[5]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(tr, tr[1:])]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 1 / rate) < 4 * (1 / rate) / len(gaps) ** 0.5
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean  # exponential: CV = 1
    assert 0.95 < cv < 1.05


def test_percentile_and_targets():
    assert serve_gpu.percentile([], 0.5) is None
    assert serve_gpu.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert serve_gpu.percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)
    t = serve_gpu.targets({"a_coe": {"output_tokens_per_s": 900.0}, "d_resident": {"output_tokens_per_s": 1000.0},
                           "b_sleep": {"output_tokens_per_s": 500.0}, "c_reload": {"output_tokens_per_s": 100.0}})
    assert t["a_over_d_target_0.8_met"] and not t["a_over_b_target_2_met"] and t["a_over_c_target_5_met"]


def test_one_pass_wake_leaves_nothing_it_mapped_to_vllm():
    """After coe_wake_restore has mapped the weights (and filled them) and the KV cache, the
    allocator's next wake_up must map neither again (mapping twice fails); when it mapped only the
    weights, the next wake_up maps the rest; wake-ups after that are vLLM's own."""
    from types import SimpleNamespace

    from coe.engines.vllm_worker import _skip_on_next_wake

    class Allocator:  # the two members of vLLM's CuMemAllocator the hook uses
        def __init__(self):
            self.pointer_to_data = {1: SimpleNamespace(tag="weights"), 2: SimpleNamespace(tag="kv_cache"),
                                    3: SimpleNamespace(tag="weights")}
            self.calls = []

        def wake_up(self, tags=None):
            self.calls.append(tags)

    a = Allocator()
    _skip_on_next_wake(a, {"weights"})
    a.wake_up(None)
    a.wake_up(None)
    _skip_on_next_wake(a, {"weights"})
    a.wake_up(["weights"])
    a.wake_up(["weights", "kv_cache"])
    _skip_on_next_wake(a, {"weights", "kv_cache"})
    a.wake_up(None)
    a.wake_up(None)
    assert a.calls == [["kv_cache"], None, ["weights", "kv_cache"], None]
