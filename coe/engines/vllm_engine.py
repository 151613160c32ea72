"""The ``vllm`` engine: one vLLM ``AsyncLLM`` per expert, sleep mode on, driven by the tier protocol.

Importing this module does not import vLLM (nor torch); vLLM is imported when an engine is loaded,
and a missing vLLM is a one-line :class:`VLLMUnavailable` naming the extra to install.

Switching
---------
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

The baselines the serving bench compares this with (vLLM's own ``sleep(level=1)``/``wake_up()``,
and a reload from a file) live in ``bench/vllm_baselines.py``: a subclass that overrides the
three steps below (:meth:`VLLMEngine._keep_host_copy`, :meth:`VLLMEngine._leave_hbm`,
:meth:`VLLMEngine._enter_hbm`) and a worker extension that adds the calls only it needs.

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

from coe.engines.base import (ChatMessage, Engine, EngineStats, GenerationChunk, SamplingParams, SwapRecord, Tier,
                              encode_prompt)
from coe.engines.memory import (
    EngineMemory,
    device_total_bytes,
    device_used_bytes,
    is_out_of_memory,
    process_device_bytes,
)
from coe.errors import CoeError, EngineNotResident, ExpertLoadError, ExpertTransientError
from expert_registry.spec import EngineSettings, Expert

log = logging.getLogger(__name__)

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


def preload_vllm() -> bool:
    """Import the vLLM modules an engine start needs, where vLLM is installed; returns whether it
    did. Why: the first ``import vllm`` takes seconds, much of it in C code that holds the GIL, so
    done inside the first start (a worker thread) it stalls the pool replica's event loop; a
    replica calls this in a thread while it initialises, before it takes requests."""
    if not vllm_installed():
        return False
    import vllm.engine.arg_utils  # noqa: F401
    import vllm.v1.engine.async_llm  # noqa: F401

    return True


class VLLMEngine(Engine):
    """vLLM behind the tier protocol; see the module docstring for how it switches."""

    #: What vLLM mixes into its GPU worker (by qualified name; a subclass may name a subclass of it).
    worker_extension: str = WORKER_EXTENSION

    def __init__(
        self,
        expert: Expert,
        device: str = "cuda",
        max_batch_size: int = 256,
        settings: EngineSettings | None = None,
        *,
        fast_wake: bool = True,
        copy_streams: int = 2,
        host_alloc: str = "register",
        overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
        asleep_bytes: int = DEFAULT_ASLEEP_BYTES,
    ):
        """``settings``: the expert's engine settings already merged over the pool's defaults
        (:meth:`EngineSettings.merged_over`); unset fields take vLLM's defaults. ``overhead_bytes``
        and ``asleep_bytes`` are the estimates of :meth:`memory` until the engine has started.
        ``fast_wake``, ``copy_streams`` and ``host_alloc`` shape a switch (docs/vllm.md)."""
        if not str(device).startswith("cuda"):
            raise VLLMUnavailable(f"expert {expert.name!r}: engine 'vllm' runs on a CUDA GPU, not on {device!r}")
        self.expert = expert
        self.name: str = expert.name
        self.device = str(device)
        self.max_batch_size = int(max_batch_size)
        self.settings = settings if settings is not None else EngineSettings()
        self.max_model_len: int = expert.max_context
        self.load_format = self.settings.load_format or "auto"
        self.overhead_bytes = int(overhead_bytes)
        self.asleep_estimate = int(asleep_bytes)
        self._measured: EngineMemory | None = None
        self._measured_by_delta = False  # growth of the whole device's use, not NVML's per-process figure
        self.fast_wake = fast_wake
        self.copy_streams = max(1, int(copy_streams))
        self.host_alloc = host_alloc
        self._llm: Any = None
        self._state = "none"  # none | awake | asleep2 (asleep1: the bench's vLLM sleep/wake baseline)
        self._has_copy = False
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

            src = resolve_source(self.expert.model, self.expert.gguf_file)
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

        src = resolve_source(self.expert.model, self.expert.gguf_file)
        dtype = self.expert.dtype
        if src.kind == "folder" and self.load_format == "dummy":
            cfg = json.loads((Path(src.path) / "config.json").read_text())
            width = {"float32": 4}.get(dtype if dtype != "auto" else cfg.get("torch_dtype", "bfloat16"), 2)
            return llama_param_count(cfg) * width
        try:
            est = estimate_bytes(src, dtype if dtype != "auto" else "bfloat16")
        except (OSError, ValueError):
            est = 0
        return est or (self.expert.size_bytes or 0)

    # ---------------------------------------------------------------- tokenizer / templates
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._model_folder(), trust_remote_code=self.expert.trust_remote_code
            )
        return self._tokenizer

    # ---------------------------------------------------------------- building the vLLM engine
    def _engine_kwargs(self) -> dict[str, Any]:
        """vLLM's engine arguments, built only from typed fields: the expert's spec, its closed
        :class:`EngineSettings` and coe's own switching needs (sleep mode, the worker extension)."""
        st = self.settings
        dtype = self.expert.dtype
        kw: dict[str, Any] = dict(
            model=self._model_folder(),
            tokenizer=self._model_folder(),
            dtype=dtype,
            load_format=self.load_format,
            enable_sleep_mode=True,
            enforce_eager=bool(st.enforce_eager),
            max_num_seqs=int(st.max_num_seqs or self.max_batch_size),
            worker_extension_cls=self.worker_extension,
            disable_log_stats=True,
            trust_remote_code=self.expert.trust_remote_code,
            seed=0,
        )
        if st.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = float(st.gpu_memory_utilization)
        if self.expert.revision:
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

    async def _start_vllm(self) -> Any:
        """Build vLLM's engine off the event loop (it takes seconds to minutes)."""
        return await asyncio.to_thread(self._build)

    # ---------------------------------------------------------------- tier moves
    async def load(self) -> SwapRecord:
        """DISK→DRAM: start vLLM (weights land in HBM), take the pinned host copy, then sleep.
        Measures the engine's device memory awake and asleep on the way (see :meth:`memory`)."""
        if self._state != "none":
            return SwapRecord(self.tier, self.tier, 0, 0.0)
        t0 = time.perf_counter()
        try:
            self.load_phase = "reading tokenizer"
            await asyncio.to_thread(lambda: self.tokenizer)  # seconds for a large vocabulary: off the loop
            self._measured_by_delta = False
            used0 = await asyncio.to_thread(device_used_bytes, self.device)
            self.load_phase = "starting engine (weights to the device, KV cache)"
            self._llm = await self._start_vllm()
            self._state = "awake"
            t1 = time.perf_counter()
            self._nbytes = int(await self._rpc("coe_weight_bytes"))
            awake = await self._device_bytes(used0)
            info: dict[str, Any] = {"engine_start_s": t1 - t0}
            self.load_phase = "copying weights to host"
            info.update(await self._keep_host_copy())
            t2 = time.perf_counter()
            self.load_phase = "going to sleep"
            await self._leave_hbm()
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
        the device's used memory since ``used_before`` (exact only while no other engine moves:
        :meth:`measurement_disturbed` drops such a measurement)."""
        try:
            pid = int(await self._rpc("coe_pid"))
        except Exception:  # noqa: BLE001 - an older worker: fall back to the device-wide delta
            pid = -1
        own = await asyncio.to_thread(process_device_bytes, self.device, pid) if pid > 0 else None
        if own is not None:
            return own
        self._measured_by_delta = True
        now = await asyncio.to_thread(device_used_bytes, self.device)
        return None if now is None or used_before is None else max(0, now - used_before)

    def debug_state(self) -> dict[str, Any]:
        return {**super().debug_state(), "state": self._state, "move_in_flight": self._moving is not None,
                "requests_in_engine": self._in_flight, "fast_wake": self.fast_wake, "has_copy": self._has_copy}

    def measurement_disturbed(self) -> None:
        """Another engine slept or woke during :meth:`load`: a device-wide delta counted its bytes
        too (on the H100 of 2026-12-06 a sleeping engine was charged another's awake footprint, so
        the budget held far less than it could). Keep the estimate; NVML's per-process figure stays."""
        if self._measured is not None and self._measured_by_delta:
            log.warning("expert %s: another engine moved while this one measured its device memory; keeping the "
                        "estimate (%.2f GB awake) instead of %.2f GB", self.name,
                        self._estimated().active_bytes / 1e9, self._measured.active_bytes / 1e9)
            self._measured = None

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
        return self._measured if self._measured is not None else self._estimated()

    def _estimated(self) -> EngineMemory:
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

    async def _keep_host_copy(self) -> dict[str, Any]:
        """While awake: take the copy the engine will wake from, the pinned host copy (the DRAM
        tier); what it reports goes into :attr:`last_load_info`."""
        info = await self._rpc("coe_capture", self.host_alloc)
        self._has_copy = True
        return {"capture": info}

    async def _leave_hbm(self) -> None:
        """HBM→DRAM: ``sleep(level=2)``; the device memory is released, nothing is copied back
        (weights are immutable while served). A copy that was dropped is taken again first."""
        if not self._has_copy:
            await self._keep_host_copy()
        await self._sleep(2)

    async def _enter_hbm(self) -> dict[str, float]:
        """DRAM→HBM from the pinned copy: the one-pass wake, else (for good) vLLM's three steps.
        Returns the timings that go into :attr:`last_switch_info`."""
        if not self._has_copy:
            raise EngineNotResident(f"expert {self.name!r}: asleep with no host copy to wake from")
        if self.fast_wake:
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
        return await self._wake_three_steps("coe_restore")

    async def _wake_three_steps(self, restore: str, *args: Any) -> dict[str, float]:
        """vLLM's documented wake with a copy in between: ``wake_up(["weights"])``, the worker's
        ``restore`` call (seconds), ``wake_up(["kv_cache"])``."""
        t0 = time.perf_counter()
        await self._llm.wake_up(tags=["weights"])
        t1 = time.perf_counter()
        copy_s = float(await self._rpc(restore, *args))
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
        t = self._moving
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
        info = await self._enter_hbm()
        self._state = "awake"
        dt = time.perf_counter() - t0
        self.last_switch_info = {"to_hbm_s": dt, **info}
        return SwapRecord(Tier.DRAM, Tier.HBM, self._nbytes, dt)

    async def _to_dram(self) -> SwapRecord:
        if self._state != "awake":
            return SwapRecord(self.tier, self.tier, 0, 0.0)
        t0 = time.perf_counter()
        await self._leave_hbm()
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
        self._moving = None  # a move the shutdown cut short belongs to the old engine: nobody waits for it
        if llm is not None:
            try:
                await asyncio.to_thread(llm.shutdown)  # joins the engine-core process: off the loop
            except Exception:  # pragma: no cover - best effort on a dying engine
                log.exception("expert %s: vLLM shutdown failed", self.name)

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

        params = params.with_defaults(self.expert.generation)
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
