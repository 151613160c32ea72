"""The ``vllm`` engine: one vLLM ``AsyncLLM`` per expert, sleep mode on, driven by the tier protocol.

Importing this module does not import vLLM (nor torch); vLLM is imported when an engine is loaded,
and a missing vLLM is a one-line :class:`VLLMUnavailable` naming the extra to install.

Switching (``switch_mode``)
---------------------------
``"pinned"`` (coe's way, the default)
    DISK→DRAM (:meth:`load`) builds the engine, copies every allocation vLLM made under the
    ``weights`` tag once into a pinned host buffer (the DRAM tier), then ``sleep(level=2)``.
    HBM→DRAM is ``sleep(level=2)``: the device memory is released and nothing is copied back.
    DRAM→HBM maps the weight allocations again (same virtual addresses) and copies the pinned
    buffer into them in one pass inside the worker (chunk *i* copies while chunk *i+1* is mapped,
    on ``copy_streams`` CUDA streams in turn; the KV cache is mapped while the last copies are in
    flight), then ``wake_up()`` does vLLM's bookkeeping and resumes scheduling. If that one-pass
    call fails, the engine falls back for good to the documented three steps:
    ``wake_up(tags=["weights"])``, the copy, ``wake_up(tags=["kv_cache"])``. ``host_alloc`` says
    how the pinned copy is allocated (:func:`coe.engines.vllm_worker.pinned_host`).
``"sleep"`` (vLLM's own switching; the baseline)
    HBM→DRAM is ``sleep(level=1)`` (vLLM copies the weights device→host on every sleep),
    DRAM→HBM is ``wake_up()``.
``"reload"`` (what a model-multiplexing server does on a miss; a baseline)
    The weights are written to a file once; DRAM→HBM reads that file back into the woken weight
    buffers through pageable memory. Building a new engine, which a real reload also pays
    (tens of seconds), is *not* charged: this is a lower bound of a reload's cost.

Where the pinned copy lives, and why
------------------------------------
The copy must be addressable by the process that owns the CUDA context the weights live in.
With vLLM 0.24 that is never the pool's process:

* ``AsyncLLM`` always runs its engine core in a separate process (``EngineCoreClient.make_client``
  raises ``NotImplementedError`` for asyncio without multiprocessing, so
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` only applies to the synchronous ``LLMEngine``);
* even in-process, sleep mode's ``CuMemAllocator`` is a per-process singleton that asserts
  "CuMem allocator can only be used for one instance per process", so a pool of several experts
  needs one engine-core process per expert anyway.

So the worker holds the copy itself: :class:`coe.engines.vllm_worker.CoeWorkerExtension` is
installed with ``worker_extension_cls`` and called through ``collective_rpc("coe_…")`` — by method
*name*, so no callable is pickled. The pool still owns the policy: the tier manager decides when a
copy exists (``load``/``unload``), and its DRAM budget counts the copy's bytes. (Shared memory +
``cudaHostRegister`` in the worker would let the pool fill the copy without the engine; it buys
nothing for the switch itself, and vLLM's own weight layout — fused qkv/gate_up — is only known
inside the worker.)

HBM beyond the weights: an awake engine also holds its KV cache (``EngineSettings.kv_cache_bytes``
or ``gpu_memory_utilization``), a CUDA context, activations and graphs; a sleeping one keeps its
context. :meth:`VLLMEngine.memory` reports all of it (estimated before the first start, measured
during it) and the tier manager charges it; :meth:`load` needs the whole footprint free on the GPU
while vLLM starts (it loads, then sleeps), so the tier manager reserves that first.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

from coe.engines.base import (
    ChatMessage,
    Engine,
    EngineStats,
    GenerationChunk,
    SamplingParams,
    SwapRecord,
    Tier,
    encode_prompt,
    render_chat,
)
from coe.engines.memory import (
    EngineMemory,
    device_total_bytes,
    device_used_bytes,
    is_out_of_memory,
    process_device_bytes,
)
from coe.errors import CoeError, EngineNotResident, ExpertLoadError, ExpertTransientError
from expert_registry.spec import EngineSettings

log = logging.getLogger(__name__)

SWITCH_MODES = ("pinned", "sleep", "reload")
DEFAULT_OVERHEAD_BYTES = 2 << 30  # CUDA context + activations/workspace (+ graphs) of an awake engine, until measured
DEFAULT_ASLEEP_BYTES = 768 << 20  # what a sleeping engine keeps on the GPU (its CUDA context), until measured
WORKER_EXTENSION = "coe.engines.vllm_worker.CoeWorkerExtension"
_ids = itertools.count()


class VLLMUnavailable(CoeError, ImportError):
    """engine="vllm" was asked for where vLLM (or a CUDA GPU) is not available."""


def vllm_installed() -> bool:
    """True when the ``vllm`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of coe
        return False
    return bool(torch.cuda.is_available())


def auto_engine_kind() -> str:
    """What ``Expert.engine == "auto"`` should mean here: ``vllm`` only with both CUDA and vLLM."""
    return "vllm" if vllm_installed() and cuda_available() else "hf"


def require_vllm() -> Any:
    """Import vLLM or raise one clear line saying how to get it."""
    if not vllm_installed():
        raise VLLMUnavailable(
            "engine 'vllm' needs vLLM, which is not installed: pip install 'coe[gpu]' (vllm==0.24.0) "
            "on a machine with a CUDA GPU, or set the expert's engine to 'hf'"
        )
    import vllm

    return vllm


class VLLMEngine(Engine):
    """vLLM behind the tier protocol; see the module docstring for the three switch modes."""

    def __init__(
        self,
        expert: Any,
        device: str = "cuda",
        max_batch_size: int = 256,
        settings: EngineSettings | None = None,
        *,
        switch_mode: str = "pinned",
        reload_dir: str | None = None,
        build_in_thread: bool = True,
        dummy_init_seed: int | None = None,
        fast_wake: bool = True,
        copy_streams: int = 2,
        host_alloc: str = "register",
        overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
        asleep_bytes: int = DEFAULT_ASLEEP_BYTES,
    ):
        """``settings``: the expert's engine settings already merged over the pool's defaults
        (:meth:`EngineSettings.merged_over`); unset fields take vLLM's defaults. ``overhead_bytes``
        and ``asleep_bytes`` are the estimates of :meth:`memory` until the engine has started."""
        if switch_mode not in SWITCH_MODES:
            raise ValueError(f"unknown switch_mode {switch_mode!r}; choose one of {', '.join(SWITCH_MODES)}")
        if not str(device).startswith("cuda"):
            raise VLLMUnavailable(f"expert {expert.name!r}: engine 'vllm' runs on a CUDA GPU, not on {device!r}")
        self.expert = expert
        self.name: str = expert.name
        self.device = str(device)
        self.switch_mode = switch_mode
        self.max_batch_size = int(max_batch_size)
        self.settings = settings if settings is not None else EngineSettings()
        self.max_model_len = int(getattr(expert, "max_context", 0) or 0) or None
        self.load_format = self.settings.load_format or "auto"
        self.overhead_bytes = int(overhead_bytes)
        self.asleep_estimate = int(asleep_bytes)
        self._measured: EngineMemory | None = None
        self.reload_dir = reload_dir
        self.build_in_thread = build_in_thread
        self.dummy_init_seed = dummy_init_seed
        self.fast_wake = fast_wake
        self.copy_streams = max(1, int(copy_streams))
        self.host_alloc = host_alloc
        self._llm: Any = None
        self._state = "none"  # none | awake | asleep1 | asleep2
        self._has_copy = False
        self._file: str | None = None
        self._folder: str | None = None
        self._tokenizer: Any = None
        self._nbytes = 0
        self._estimate: int | None = None
        self._in_flight = 0
        self._stats = EngineStats()
        self.last_load_info: dict[str, Any] = {}
        self.last_switch_info: dict[str, float] = {}
        self._moving: asyncio.Future | None = None

    # ---------------------------------------------------------------- sizes and sources
    @property
    def tier(self) -> Tier:
        return {"none": Tier.DISK, "awake": Tier.HBM}.get(self._state, Tier.DRAM)

    def _model_folder(self) -> str:
        if self._folder is None:
            from coe.engines.sources import ensure_converted, resolve_source

            src = resolve_source(self.expert.model, getattr(self.expert, "gguf_file", None))
            self._folder = str(ensure_converted(src.path)) if src.kind == "gguf" else src.path
        return self._folder

    def footprint_bytes(self) -> int:
        if self._nbytes:
            return self._nbytes
        if self._estimate is None:
            self._estimate = self._estimate_bytes()
        return self._estimate

    def _estimate_bytes(self) -> int:
        import json

        from coe.engines.sources import estimate_bytes, resolve_source
        from coe.engines.vllm_models import llama_param_count

        src = resolve_source(self.expert.model, getattr(self.expert, "gguf_file", None))
        dtype = getattr(self.expert, "dtype", "auto") or "auto"
        if src.kind == "folder" and self.load_format == "dummy":
            cfg = json.loads((Path(src.path) / "config.json").read_text())
            width = {"float32": 4}.get(dtype if dtype != "auto" else cfg.get("torch_dtype", "bfloat16"), 2)
            return llama_param_count(cfg) * width
        try:
            est = estimate_bytes(src, dtype if dtype != "auto" else "bfloat16")
        except (OSError, ValueError):
            est = 0
        return est or int(getattr(self.expert, "size_bytes", 0) or 0)

    # ---------------------------------------------------------------- tokenizer / templates
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._model_folder(), trust_remote_code=bool(getattr(self.expert, "trust_remote_code", False))
            )
        return self._tokenizer

    def apply_chat_template(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
        return render_chat(self.expert, self.tokenizer, messages)

    def _encode(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[int]:
        tok = self.tokenizer  # loading errors (missing files) stay expert errors
        return encode_prompt(self.expert, tok, messages)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> int:
        return len(self._encode(messages))

    # ---------------------------------------------------------------- building the vLLM engine
    def _engine_kwargs(self) -> dict[str, Any]:
        """vLLM's engine arguments, built only from typed fields: the expert's spec, its closed
        :class:`EngineSettings` and coe's own switching needs (sleep mode, the worker extension)."""
        st = self.settings
        dtype = getattr(self.expert, "dtype", "auto") or "auto"
        kw: dict[str, Any] = dict(
            model=self._model_folder(),
            tokenizer=self._model_folder(),
            dtype=dtype,
            load_format=self.load_format,
            enable_sleep_mode=True,
            enforce_eager=bool(st.enforce_eager),
            max_num_seqs=int(st.max_num_seqs or self.max_batch_size),
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
            trust_remote_code=bool(getattr(self.expert, "trust_remote_code", False)),
            seed=0,
        )
        if st.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = float(st.gpu_memory_utilization)
        if getattr(self.expert, "revision", None):
            kw["revision"] = self.expert.revision
        if st.kv_cache_bytes:
            kw["kv_cache_memory_bytes"] = int(st.kv_cache_bytes)
        if st.quantization:
            kw["quantization"] = st.quantization
        if self.max_model_len:
            kw["max_model_len"] = int(self.max_model_len)
        return kw

    def _build(self) -> Any:
        require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**self._engine_kwargs()))

    async def _rpc(self, method: str, *args: Any) -> Any:
        res = await self._llm.collective_rpc(method, args=args)
        return res[0] if isinstance(res, list) and len(res) == 1 else res

    def _reload_path(self) -> str:
        base = Path(self.reload_dir or os.environ.get("COE_VLLM_RELOAD_DIR") or "/tmp/coe-vllm-reload")
        base.mkdir(parents=True, exist_ok=True)
        return str(base / f"{self.name}.weights.bin")

    # ---------------------------------------------------------------- tier moves
    async def load(self) -> SwapRecord:
        """DISK→DRAM: start vLLM (weights land in HBM), keep the copy the mode needs, then sleep.
        Measures the engine's device memory awake and asleep on the way (see :meth:`memory`)."""
        if self._state != "none":
            return SwapRecord(self.tier, self.tier, 0, 0.0)
        t0 = time.perf_counter()
        try:
            self.load_phase = "reading tokenizer"
            _ = self.tokenizer
            used0 = device_used_bytes(self.device)
            self.load_phase = "starting engine (weights to the device, KV cache)"
            self._llm = await asyncio.to_thread(self._build) if self.build_in_thread else self._build()
            self._state = "awake"
            t1 = time.perf_counter()
            self._nbytes = int(await self._rpc("coe_weight_bytes"))
            awake = await self._device_bytes(used0)
            info: dict[str, Any] = {"engine_start_s": t1 - t0}
            if self.dummy_init_seed is not None and self.load_format == "dummy":
                await self._rpc("coe_randomize", int(self.dummy_init_seed))
            self.load_phase = "copying weights to host"
            if self.switch_mode == "pinned":
                info["capture"] = await self._rpc("coe_capture", self.host_alloc)
                self._has_copy = True
            elif self.switch_mode == "reload":
                info["save"] = await self._rpc("coe_save_file", self._reload_path())
                self._file = self._reload_path()
            t2 = time.perf_counter()
            self.load_phase = "going to sleep"
            await self._sleep(2 if self.switch_mode != "sleep" else 1)
            info["first_sleep_s"] = time.perf_counter() - t2
            asleep = await self._device_bytes(used0)
            self._record_measured(awake, asleep)
            info["memory"] = vars(self.memory())
        except VLLMUnavailable:
            raise
        except Exception as exc:
            await self._shutdown()
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            if is_out_of_memory(exc):  # another engine may free memory: retried, not a broken expert
                raise ExpertTransientError(self.name, reason) from exc
            raise ExpertLoadError(self.name, reason) from exc
        finally:
            self.load_phase = ""
        info["total_s"] = time.perf_counter() - t0
        self.last_load_info = info
        return SwapRecord(Tier.DISK, Tier.DRAM, self._nbytes, info["total_s"])

    async def _device_bytes(self, used_before: int | None) -> int | None:
        """The engine process's device memory now: NVML by the worker's pid, else the growth of
        the device's used memory since ``used_before`` (exact while no other engine moves)."""
        try:
            pid = int(await self._rpc("coe_pid"))
        except Exception:  # noqa: BLE001 - an older worker: fall back to the device-wide delta
            pid = -1
        own = process_device_bytes(self.device, pid) if pid > 0 else None
        if own is not None:
            return own
        now = device_used_bytes(self.device)
        return None if now is None or used_before is None else max(0, now - used_before)

    def _record_measured(self, awake: int | None, asleep: int | None) -> None:
        est = self.memory()
        if awake is None or awake < self._nbytes:  # nothing measurable (or nonsense): keep the estimate
            log.info("expert %s: device memory not measurable; keeping the estimate %.2f GB", self.name,
                     est.active_bytes / 1e9)
            return
        idle = asleep if asleep is not None and asleep < awake else est.idle_bytes
        self._measured = EngineMemory(host_bytes=self._nbytes, active_bytes=int(awake), idle_bytes=int(idle),
                                      load_bytes=int(awake), measured=True)

    def memory(self) -> EngineMemory:
        """Measured after the first :meth:`load`; before it, weights + configured KV cache + a
        fixed overhead awake, the sleeping estimate asleep (the tier manager corrects its charges)."""
        if self._measured is not None:
            return self._measured
        weights = self.footprint_bytes()
        kv = int(self.settings.kv_cache_bytes or 0)
        if not kv and self.settings.gpu_memory_utilization:
            total = device_total_bytes(self.device)
            kv = max(0, int(total * self.settings.gpu_memory_utilization) - weights) if total else 0
        active = weights + kv + self.overhead_bytes
        return EngineMemory(host_bytes=weights, active_bytes=active, idle_bytes=self.asleep_estimate,
                            load_bytes=active, measured=False)

    async def _sleep(self, level: int) -> None:
        await self._llm.sleep(level=level)
        self._state = f"asleep{level}"

    async def _wake_from_level2(self, source: str) -> dict[str, float]:
        if source == "pinned" and self.fast_wake:
            t0 = time.perf_counter()
            try:
                gpu = dict(await self._rpc("coe_wake_restore", self.copy_streams))
            except Exception as exc:  # nothing was left mapped: take the three-step path from now on
                log.warning("expert %s: one-pass wake+restore failed (%s); using wake_up(weights) + copy",
                            self.name, exc)
                self.fast_wake = False
            else:
                t1 = time.perf_counter()
                await self._llm.wake_up()  # maps nothing more; buffers, KV scales, resumes scheduling
                t2 = time.perf_counter()
                return {"map_and_copy_s": float(gpu["total_s"]), "map_and_issue_s": float(gpu["map_and_issue_s"]),
                        "map_kv_s": float(gpu["map_others_s"]), "rpc_s": t1 - t0, "wake_rest_s": t2 - t1}
        t0 = time.perf_counter()
        await self._llm.wake_up(tags=["weights"])
        t1 = time.perf_counter()
        if source == "pinned":
            copy_s = float(await self._rpc("coe_restore"))
        else:
            assert self._file is not None
            copy_s = float(await self._rpc("coe_restore_file", self._file))
        t2 = time.perf_counter()
        await self._llm.wake_up(tags=["kv_cache"])
        t3 = time.perf_counter()
        return {"wake_weights_s": t1 - t0, "copy_s": copy_s, "rpc_s": t2 - t1, "wake_kv_s": t3 - t2}

    async def _atomic(self, coro: Any) -> Any:
        """Run a tier move to completion even if the caller is cancelled, so the recorded state always
        matches vLLM's (a half-woken engine would be neither asleep nor usable)."""
        task = asyncio.ensure_future(coro)
        self._moving = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._moving = None

    async def settle(self) -> None:
        """Wait for a tier move whose caller was cancelled to finish."""
        t = getattr(self, "_moving", None)
        if t is not None:
            try:
                await t
            except Exception:  # noqa: BLE001 - its caller is gone; the state says what happened
                log.debug("expert %s: an abandoned tier move failed", self.name, exc_info=True)
            self._moving = None

    async def to_hbm(self) -> SwapRecord:
        await self.settle()
        try:
            return await self._atomic(self._to_hbm())
        except Exception as exc:
            if is_out_of_memory(exc):  # the device is fuller than the budget thought: retried later
                raise ExpertTransientError(self.name, f"{type(exc).__name__}: {exc}".splitlines()[0][:400]) from exc
            raise

    async def to_dram(self) -> SwapRecord:
        await self.settle()
        return await self._atomic(self._to_dram())

    async def _to_hbm(self) -> SwapRecord:
        if self._state == "none":
            raise EngineNotResident(f"expert {self.name!r}: to_hbm() before load()")
        if self._state == "awake":
            return SwapRecord(Tier.HBM, Tier.HBM, 0, 0.0)
        t0 = time.perf_counter()
        if self._state == "asleep1":
            await self._llm.wake_up()
            info = {"wake_s": time.perf_counter() - t0}
        elif self.switch_mode == "reload" and self._file or not self._has_copy and self._file:
            info = await self._wake_from_level2("file")
        elif self._has_copy:
            info = await self._wake_from_level2("pinned")
        else:
            raise EngineNotResident(f"expert {self.name!r}: asleep with no host copy and no file to wake from")
        self._state = "awake"
        dt = time.perf_counter() - t0
        self.last_switch_info = {"to_hbm_s": dt, **info}
        return SwapRecord(Tier.DRAM, Tier.HBM, self._nbytes, dt)

    async def _to_dram(self) -> SwapRecord:
        if self._state != "awake":
            return SwapRecord(self.tier, self.tier, 0, 0.0)
        t0 = time.perf_counter()
        if self.switch_mode == "sleep":
            await self._sleep(1)
        else:
            if self.switch_mode == "pinned" and not self._has_copy:
                await self._rpc("coe_capture", self.host_alloc)  # the copy was dropped: take it again first
                self._has_copy = True
            if self.switch_mode == "reload" and not self._file:
                await self._rpc("coe_save_file", self._reload_path())
                self._file = self._reload_path()
            await self._sleep(2)
        dt = time.perf_counter() - t0
        return SwapRecord(Tier.HBM, Tier.DRAM, self._nbytes, dt)

    async def unload(self) -> SwapRecord:
        """DRAM→DISK: shut the engine down (its process, and the pinned copy in it, go away)."""
        if self._state == "awake":
            await self.to_dram()
        if self._state == "none":
            return SwapRecord(Tier.DISK, Tier.DISK, 0, 0.0)
        t0 = time.perf_counter()
        await self._shutdown()
        return SwapRecord(Tier.DRAM, Tier.DISK, self._nbytes, time.perf_counter() - t0)

    async def _shutdown(self) -> None:
        llm, self._llm = self._llm, None
        self._state, self._has_copy = "none", False
        if llm is not None:
            try:
                llm.shutdown()
            except Exception:  # pragma: no cover - best effort on a dying engine
                log.exception("expert %s: vLLM shutdown failed", self.name)

    async def set_switch_mode(self, mode: str) -> None:
        """Change how this engine switches, leaving it asleep in that mode's DRAM state.

        Lets one set of running engines be measured under several modes (the serving bench);
        a service picks one mode and keeps it."""
        if mode not in SWITCH_MODES:
            raise ValueError(f"unknown switch_mode {mode!r}")
        if self._state == "none":
            self.switch_mode = mode
            return
        if self._state != "awake" and (
            (mode == "sleep" and self._state != "asleep1")
            or (mode != "sleep" and self._state == "asleep1")
            or (mode == "reload" and not self._file)
            or (mode == "pinned" and not self._has_copy)
        ):
            await self.to_hbm()
        self.switch_mode = mode
        if self._state == "awake":
            await self.to_dram()

    async def set_host_alloc(self, mode: str) -> dict[str, Any]:
        """Take the pinned copy again, allocated the ``mode`` way (see
        :func:`coe.engines.vllm_worker.pinned_host`); the engine ends in the tier it was in."""
        self.host_alloc = mode
        if self._state == "none" or self.switch_mode != "pinned":
            return {}
        was_awake = self._state == "awake"
        await self.to_hbm()
        info = dict(await self._rpc("coe_capture", mode))
        self._has_copy = True
        if not was_awake:
            await self.to_dram()
        return info

    async def drop_host_copy(self) -> int:
        """Release the pinned copy (and torch's cached pinned blocks) in the worker; bytes released."""
        if self._llm is None:
            return 0
        n = int(await self._rpc("coe_drop"))
        await self._rpc("coe_host_empty_cache")
        self._has_copy = False
        return n

    async def weights_digest(self) -> list[float]:
        """Per-parameter sums read on the GPU (the engine must be awake); for tests and benches."""
        if self._state != "awake":
            raise EngineNotResident(f"expert {self.name!r} is not awake")
        return list(await self._rpc("coe_weights_digest"))

    # ---------------------------------------------------------------- generation
    def stats(self) -> EngineStats:
        return self._stats

    def _vllm_params(self, params: SamplingParams, logprobs: int | None = None) -> Any:
        """vLLM's ``SamplingParams`` for ``params`` (translation in :mod:`coe.engines.vllm_params`)."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        from coe.engines.vllm_params import sampling_kwargs, structured_kwargs

        kw = sampling_kwargs(params)
        if logprobs is not None:
            kw["logprobs"] = logprobs
        so = structured_kwargs(params)
        if so is not None:
            try:
                from vllm.sampling_params import StructuredOutputsParams

                kw["structured_outputs"] = StructuredOutputsParams(**so)
            except ImportError:  # pragma: no cover - vLLM before StructuredOutputsParams
                from vllm.sampling_params import GuidedDecodingParams

                kw["guided_decoding"] = GuidedDecodingParams(**so)
        return VSP(**kw, output_kind=RequestOutputKind.DELTA)

    async def generate(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        inner = self._generate(messages, params, None)
        try:
            async for chunk, _ in inner:
                yield chunk
        finally:
            await inner.aclose()

    async def generate_with_logprobs(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], params: SamplingParams, logprobs: int = 5
    ) -> AsyncIterator[tuple[GenerationChunk, list[dict[int, float]]]]:
        """Like :meth:`generate`, also yielding the top-``logprobs`` of each new token (tests)."""
        inner = self._generate(messages, params, logprobs)
        try:
            async for item in inner:
                yield item
        finally:
            await inner.aclose()

    async def _generate(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], params: SamplingParams, logprobs: int | None
    ) -> AsyncIterator[tuple[GenerationChunk, list[dict[int, float]]]]:
        if self._state != "awake" or self._llm is None:
            raise EngineNotResident(f"expert {self.name!r} is not in the active tier")
        from vllm.inputs import TokensPrompt

        params = params.with_defaults(getattr(self.expert, "generation", None))
        ids = encode_prompt(self.expert, self.tokenizer, messages, params.tools, params.chat_template_kwargs)
        tools, params = self._tool_call_collector(messages, params)
        sp = self._vllm_params(params, logprobs)
        rid = f"{self.name}-{os.getpid()}-{next(_ids)}"
        self._in_flight += 1
        self._stats.batch_sizes.append(self._in_flight)  # requests in the engine when this one joined
        if len(self._stats.batch_sizes) > 10_000:
            del self._stats.batch_sizes[:5_000]
        self._stats.requests += 1
        completion = 0
        per_choice: dict[int, int] = {}
        agen = self._llm.generate(TokensPrompt(prompt_token_ids=ids), sp, rid)
        try:
            async for out in agen:
                batch: list[tuple[GenerationChunk, list[dict[int, float]]]] = []
                for o in out.outputs:  # n > 1: one output per choice that has news (o.index)
                    new_ids = list(o.token_ids)
                    completion += len(new_ids)
                    per_choice[o.index] = per_choice.get(o.index, 0) + len(new_ids)
                    fr = o.finish_reason
                    finish = None if fr is None else ("cancelled" if fr == "abort" else "stop" if fr == "stop" else "length")
                    if out.finished and finish is None:
                        finish = "stop"
                    steps = [d for d in (o.logprobs or []) if d is not None]
                    lps = [{int(k): float(v.logprob) for k, v in d.items()} for d in steps]
                    tok_lps = None
                    if params.logprobs is not None and steps:
                        from coe.engines.vllm_params import token_logprobs

                        tok_lps = [token_logprobs(d, t, params.logprobs, self.tokenizer.decode)
                                   for d, t in zip(steps, new_ids)]
                    if o.text or new_ids or finish is not None:
                        batch.append((GenerationChunk(text=o.text, finish_reason=finish, prompt_tokens=len(ids),
                                                      completion_tokens=per_choice[o.index], token_ids=new_ids,
                                                      index=o.index, logprobs=tok_lps,
                                                      more=finish is not None), lps))
                for i, (chunk, lps) in enumerate(batch):  # only the request's very last chunk ends the stream
                    chunk.more = chunk.more and not (out.finished and i == len(batch) - 1)
                    if tools is not None and (chunk := tools.feed(chunk)) is None:
                        continue  # tool_choice auto: the answer goes out whole (coe/engines/vllm_tools.py)
                    yield chunk, lps
        finally:
            self._in_flight -= 1
            try:
                await agen.aclose()  # consumer gone early: vLLM aborts the request, frees its KV blocks
            except Exception:  # pragma: no cover - engine already dead
                log.debug("expert %s: closing a vLLM stream failed", self.name, exc_info=True)
            self._stats.completion_tokens += completion

    def _tool_call_collector(self, messages: Sequence[ChatMessage | Mapping[str, Any]],
                             params: SamplingParams) -> tuple[Any, SamplingParams]:
        """tool_choice "auto" with tools: the expert's vLLM tool-call parser reads the answer."""
        if not params.tools_auto:
            return None, params
        from coe.engines.base import as_messages
        from coe.engines.vllm_tools import ToolCallCollector, tool_parser
        from coe.errors import RequestError

        name = self.settings.tool_call_parser
        if not name:  # the ingress routes such requests only to experts with a parser
            raise RequestError(f"expert {self.name!r} has no tool_call_parser: tool_choice 'auto' with tools is "
                               "not supported", "tool_choice", "unsupported_parameter")
        try:
            parse, keep_special = tool_parser(name, self.tokenizer, as_messages(messages), params.tools or [])
        except (KeyError, ValueError, RuntimeError) as e:  # unknown name, or it does not fit this model
            raise RequestError(f"expert {self.name!r}: vLLM's tool-call parser {name!r} "
                               f"(engine_settings.tool_call_parser) cannot be used: {e}", "tool_choice",
                               "unsupported_parameter") from None
        if keep_special:  # the parser looks for special tokens (e.g. Hermes' <tool_call>)
            params = params.model_copy(update={"skip_special_tokens": False})
        return ToolCallCollector(parse), params

    async def close(self) -> None:
        await self._shutdown()
