"""Expert switch benchmark: DRAM→HBM and HBM→released through coe's tier manager + hf engine.

One run prints: pinned host→device bandwidth (same bytes, same run), our switch-in / switch-out
times (median of N cycles, through ``TierManager.acquire`` / ``TierManager.demote`` on an
``HFEngine`` on cuda), the baselines (``from_pretrained`` from safetensors with a warm page cache,
``.to("cuda")`` of a CPU model in pageable memory, vLLM ``sleep``/``wake_up`` where importable), and a
correctness check (greedy tokens after the cycles == before any swap). Writes JSON (+ PNG) to --out.

    PYTHONUNBUFFERED=1 python bench/switch.py --shape 8b --cycles 10 --out "$OUT"
    python bench/switch.py --plot bench/results/switch-....json     # PNG from a recorded JSON

Import-light on purpose: torch, transformers, pydantic and coe.{engines,tiers} only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "8b": "LLAMA_8B",
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": "TINY",
}


def _shape(name: str) -> dict:
    from coe.engines import synthetic

    s = SHAPES[name]
    return getattr(synthetic, s) if isinstance(s, str) else s


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pinned_bandwidth(host, device: str, reps: int = 5) -> float:
    """GB/s of one raw host→device copy of ``host`` (already pinned): the ceiling for our switch-in."""
    import torch

    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        _sync()
        times.append(time.perf_counter() - t0)
    del dev
    return host.numel() / statistics.median(times) / 1e9


async def greedy(tm, name: str, n: int) -> list[int]:
    from coe.engines.base import SamplingParams

    ids: list[int] = []
    async with tm.acquire(name) as eng:
        async for c in eng.generate([{"role": "user", "content": "Tell me about tiered memory."}],
                                    SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
            ids.extend(c.token_ids)
    return ids


async def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from coe.engines.hf import HFEngine
    from coe.engines.synthetic import build_llama_folder
    from coe.tiers import Tier, TierManager
    from expert_registry.spec import Expert

    device = args.device
    res: dict = {
        "bench": "switch", "shape": args.shape, "cycles": args.cycles,
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "command": " ".join(sys.argv),
    }
    work = Path(args.workdir or tempfile.mkdtemp(prefix="coe-switch-"))
    folder = work / f"llama-{args.shape}"
    t0 = time.perf_counter()
    if not (folder / "config.json").exists():
        build_llama_folder(folder, seed=0, dtype="bfloat16", device=device, **_shape(args.shape))
    res["build_s"] = time.perf_counter() - t0
    gc.collect(); torch.cuda.empty_cache()
    print(f"model folder built in {res['build_s']:.1f}s", flush=True)

    expert = Expert(name="bench-llama", model=str(folder), dtype="bfloat16", max_context=4096)
    eng = HFEngine(expert, device=device)
    tm = TierManager(hbm_budget_bytes=int(eng.footprint_bytes() * 1.5), dram_budget_bytes=int(eng.footprint_bytes() * 2.5))
    tm.register(expert.name, eng, eng.footprint_bytes())
    t0 = time.perf_counter()
    async with tm.acquire(expert.name):
        pass
    res["first_load_s"] = time.perf_counter() - t0
    res["load_info"] = eng.last_load_info
    nbytes = eng.footprint_bytes()
    res["weights_bytes"] = nbytes
    print(f"weights {nbytes / 1e9:.2f} GB; first load (disk->dram->hbm) {res['first_load_s']:.1f}s {eng.last_load_info}", flush=True)

    before = await greedy(tm, expert.name, args.tokens)
    # Ceiling: a raw copy of the engine's own pinned buffer (same bytes, same run).
    await tm.demote(expert.name, Tier.DRAM)
    res["pinned_gbps"] = pinned_bandwidth(eng._host, device)
    print(f"pinned host->device: {res['pinned_gbps']:.1f} GB/s", flush=True)

    ins, outs = [], []
    for _ in range(args.cycles):
        t0 = time.perf_counter()
        async with tm.acquire(expert.name):
            ins.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await tm.demote(expert.name, Tier.DRAM)
        outs.append(time.perf_counter() - t0)
    after = await greedy(tm, expert.name, args.tokens)
    res["switch_in_s"] = ins
    res["switch_out_s"] = outs
    res["switch_in_median_s"] = statistics.median(ins)
    res["switch_out_median_s"] = statistics.median(outs)
    res["switch_in_gbps"] = nbytes / res["switch_in_median_s"] / 1e9
    res["switch_in_vs_pinned"] = res["switch_in_gbps"] / res["pinned_gbps"]
    res["tier_metrics"] = tm.snapshot()
    res["greedy_equal_after_cycles"] = before == after
    res["greedy_tokens"] = len(before)
    print(f"switch in {res['switch_in_median_s'] * 1e3:.1f} ms ({res['switch_in_gbps']:.1f} GB/s, "
          f"{res['switch_in_vs_pinned'] * 100:.1f}% of pinned); out {res['switch_out_median_s'] * 1e3:.2f} ms; "
          f"greedy equal after {args.cycles} cycles: {before == after}", flush=True)
    await tm.demote(expert.name, Tier.DRAM)
    t0 = time.perf_counter()
    torch.cuda.empty_cache()
    res["empty_cache_after_out_s"] = time.perf_counter() - t0
    await tm.demote(expert.name, Tier.DISK)
    del eng, tm
    gc.collect(); torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    base: dict = {}
    # Baseline 1: from_pretrained straight to the GPU (safetensors, page cache warm: we just read it).
    times = []
    for _ in range(args.baseline_reps):
        _sync(); t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=device)
        _sync(); times.append(time.perf_counter() - t0)
        del m; gc.collect(); torch.cuda.empty_cache()
    base["from_pretrained_cuda_warm_s"] = statistics.median(times)
    print(f"from_pretrained(device_map=cuda) warm: {base['from_pretrained_cuda_warm_s']:.2f}s", flush=True)
    # Baseline 2: a CPU model in pageable memory, .to("cuda").
    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    for p in m.parameters():  # own the bytes (no mmap): plain pageable memory
        p.data = p.data.clone()
    times = []
    for _ in range(args.baseline_reps):
        _sync(); t0 = time.perf_counter()
        m.to(device)
        _sync(); times.append(time.perf_counter() - t0)
        m.to("cpu"); gc.collect(); torch.cuda.empty_cache()
    base["to_cuda_pageable_s"] = statistics.median(times)
    del m; gc.collect()
    print(f".to(cuda) from pageable: {base['to_cuda_pageable_s']:.2f}s", flush=True)
    # Baseline 3: vLLM sleep/wake, only where vLLM is importable.
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        base["vllm"] = {"skipped": f"vllm not importable: {type(exc).__name__}"}
    else:
        base["vllm"] = vllm_sleep_wake(str(folder), args.baseline_reps)
    print(f"vllm: {base['vllm']}", flush=True)
    res["baselines"] = base
    for k in ("from_pretrained_cuda_warm_s", "to_cuda_pageable_s"):
        res[f"speedup_vs_{k[:-2]}"] = base[k] / res["switch_in_median_s"]
    if "wake_s" in base["vllm"]:
        res["speedup_vs_vllm_wake"] = base["vllm"]["wake_s"] / res["switch_in_median_s"]
    return res


def vllm_sleep_wake(folder: str, reps: int) -> dict:
    """vLLM level-1 sleep / wake_up on the same folder (median of ``reps``)."""
    from vllm import LLM

    llm = LLM(model=folder, enable_sleep_mode=True, dtype="bfloat16", gpu_memory_utilization=0.5,
              enforce_eager=True, max_model_len=2048)
    sleeps, wakes = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); llm.sleep(level=1); sleeps.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); llm.wake_up(); wakes.append(time.perf_counter() - t0)
    del llm
    return {"sleep_s": statistics.median(sleeps), "wake_s": statistics.median(wakes), "sleeps": sleeps, "wakes": wakes}


def table(res: dict) -> str:
    b = res["baselines"]
    gb = res["weights_bytes"] / 1e9
    rows = [
        ("pinned host->device (raw copy)", f"{gb / res['pinned_gbps']:.3f} s", f"{res['pinned_gbps']:.1f} GB/s", "ceiling"),
        ("coe switch in (DRAM->HBM), median", f"{res['switch_in_median_s']:.3f} s", f"{res['switch_in_gbps']:.1f} GB/s",
         f"{res['switch_in_vs_pinned'] * 100:.1f}% of pinned"),
        ("coe switch out (HBM->released), median", f"{res['switch_out_median_s'] * 1e3:.2f} ms", "", "target <= 10 ms"),
        ("from_pretrained safetensors->cuda (warm)", f"{b['from_pretrained_cuda_warm_s']:.3f} s",
         f"{gb / b['from_pretrained_cuda_warm_s']:.1f} GB/s", f"coe {res['speedup_vs_from_pretrained_cuda_warm']:.1f}x faster"),
        (".to('cuda') from pageable", f"{b['to_cuda_pageable_s']:.3f} s", f"{gb / b['to_cuda_pageable_s']:.1f} GB/s",
         f"coe {res['speedup_vs_to_cuda_pageable']:.1f}x faster"),
    ]
    v = b["vllm"]
    if "wake_s" in v:
        rows.append(("vLLM wake_up (level 1), median", f"{v['wake_s']:.3f} s", "", f"coe {res['speedup_vs_vllm_wake']:.1f}x faster"))
        rows.append(("vLLM sleep (level 1), median", f"{v['sleep_s']:.3f} s", "", ""))
    else:
        rows.append(("vLLM sleep/wake", "skipped", "", v.get("skipped", "")))
    rows.append((f"greedy equal after {res['cycles']} cycles", str(res["greedy_equal_after_cycles"]), "", ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    head = f"{res['shape']} shape, {gb:.2f} GB bf16, {res['machine']['gpu']}, {res['date_utc']}"
    return head + "\n" + "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = res["baselines"]
    labels = ["raw pinned copy", "coe switch in", "from_pretrained\n(warm)", ".to(cuda)\npageable"]
    vals = [res["weights_bytes"] / 1e9 / res["pinned_gbps"], res["switch_in_median_s"],
            b["from_pretrained_cuda_warm_s"], b["to_cuda_pageable_s"]]
    if "wake_s" in b["vllm"]:
        labels.append("vLLM wake_up"); vals.append(b["vllm"]["wake_s"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(labels, vals, color=["#999", "#2a7", "#c63", "#c63", "#36c"][: len(vals)])
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_ylabel("seconds to make the expert usable on the GPU")
    ax.set_title(f"{res['shape']} shape ({res['weights_bytes'] / 1e9:.1f} GB bf16), {res['machine']['gpu']}, "
                 f"{res['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--baseline-reps", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG for a recorded JSON")
    args = ap.parse_args()
    if args.plot:
        res = json.loads(Path(args.plot).read_text())
        png = Path(args.plot).with_suffix(".png")
        plot(res, png)
        print(table(res)); print(f"wrote {png}")
        return
    res = asyncio.run(run(args))
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    gpu = (res["machine"]["gpu"] or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    stem = f"switch-{args.shape}-{gpu}-{res['date_utc'][:10]}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    try:
        plot(res, out / f"{stem}.png")
    except Exception as exc:  # matplotlib missing: draw later with --plot
        print(f"(no PNG: {exc})")
    print(table(res))


if __name__ == "__main__":
    main()
