"""The serving bench's vLLM engine: coe's production engine plus the baselines it is measured against.

The service switches one way (:class:`coe.engines.vllm_engine.VLLMEngine`: a pinned host copy,
``sleep(level=2)`` out, a one-pass restore in). To compare that with what users get elsewhere on the
*same* running engines, the bench needs more, and it lives here, not in the service:

``switch_mode``
    ``"pinned"`` coe's way (the production engine's code, unchanged);
    ``"sleep"`` vLLM's own switching: ``sleep(level=1)`` out (vLLM copies the weights device→host on
    every sleep), ``wake_up()`` in;
    ``"reload"`` what a model-multiplexing server does on a miss: the weights are written to a file
    once; coming in reads that file back into the woken weight buffers through pageable memory.
    Building a new engine, which a real reload also pays (tens of seconds), is *not* charged: this
    is a lower bound of a reload's cost.
:meth:`BaselineVLLMEngine.set_switch_mode`, :meth:`~BaselineVLLMEngine.set_host_alloc`,
:meth:`~BaselineVLLMEngine.drop_host_copy`
    change a running engine's mode or host buffer, so one set of engines is measured under each.
``dummy_init_seed``
    gives a ``load_format="dummy"`` model its own random weights, so each expert is distinct and a
    restore that brought back the wrong bytes shows in the greedy tokens.
:meth:`~BaselineVLLMEngine.weights_digest`
    per-parameter sums read on the GPU (the GPU tests compare them before and after switches).

The worker side is :class:`BaselineWorkerExtension`, a subclass of coe's worker extension that vLLM
imports by its qualified name inside the engine-core process (which inherits this process's
``sys.path``, so this module must be importable the way it was imported here).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

from coe.engines.vllm_engine import VLLMEngine
from coe.engines.vllm_worker import _ALIGN, CoeWorkerExtension, _cudart, _weight_chunks
from coe.errors import EngineNotResident

SWITCH_MODES = ("pinned", "sleep", "reload")


class BaselineWorkerExtension(CoeWorkerExtension):
    """coe's worker extension plus the calls only the bench's baselines and checks use."""

    def coe_has_copy(self) -> bool:
        return getattr(self, "_coe_copy", None) is not None

    def coe_save_file(self, path: str) -> dict[str, Any]:
        """Write the weight allocations to ``path`` as one raw file (for the reload-from-disk baseline).

        Uses the pinned copy when there is one; otherwise copies out through a temporary buffer."""
        had = self.coe_has_copy()
        if not had:
            self.coe_capture()
        t0 = time.perf_counter()
        tmp = path + ".tmp"
        host = self._coe_copy.host
        with open(tmp, "wb") as fh:
            fh.write(memoryview(host.numpy())[: self._coe_copy.host_bytes])
        os.replace(tmp, path)
        dt = time.perf_counter() - t0
        if not had:
            self.coe_drop()
        return {"path": path, "bytes": os.path.getsize(path), "write_s": dt}

    def coe_restore_file(self, path: str) -> float:
        """Read ``path`` (written by :meth:`coe_save_file`) into the woken weight allocations, chunk by
        chunk through pageable memory: what a reload from disk costs, minus building the engine."""
        import numpy as np
        import torch

        chunks = _weight_chunks()
        offsets, total = [], 0
        for _, size in chunks:
            offsets.append(total)
            total += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        if os.path.getsize(path) != total:
            raise RuntimeError(f"{path} has {os.path.getsize(path)} bytes, expected {total}")
        lib = _cudart()
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            for (ptr, size), off in zip(chunks, offsets):
                fh.seek(off)
                buf = np.empty(size, dtype=np.uint8)
                fh.readinto(memoryview(buf))
                lib.cudaMemcpy(ctypes.c_void_p(ptr), ctypes.c_void_p(buf.ctypes.data), size)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def coe_randomize(self, seed: int, std: float = 0.02) -> int:
        """Give a ``load_format="dummy"`` model its own N(0, std) weights (norm weights 1, biases 0).

        vLLM's dummy loader fills every model with the same tiny uniform(-1e-3, 1e-3) values, whose
        outputs barely depend on the input; this makes each expert distinct and its greedy output
        input-dependent, so a restore that brought back the wrong bytes shows in the tokens."""
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        gen = torch.Generator(device="cuda")
        gen.manual_seed(int(seed))
        n = 0
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if not p.is_floating_point():
                    continue
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name else 0.0)
                else:
                    p.normal_(0.0, std, generator=gen)
                n += p.numel()
        torch.cuda.synchronize()
        return n

    def coe_weights_digest(self) -> list[float]:
        """Per-parameter float64 sums (a cheap fingerprint to prove a restore brought the weights back)."""
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        with torch.no_grad():
            return [float(p.detach().double().sum().item()) for _, p in sorted(model.named_parameters())]

    def coe_host_empty_cache(self) -> None:
        """Give torch's cached pinned blocks (vLLM's level-1 backups) back to the OS."""
        import torch

        fn = getattr(torch._C, "_host_emptyCache", None)
        if fn is not None:
            fn()


class BaselineVLLMEngine(VLLMEngine):
    """:class:`VLLMEngine` that can also switch vLLM's way or from a file (see the module docstring)."""

    worker_extension = f"{BaselineWorkerExtension.__module__}.{BaselineWorkerExtension.__qualname__}"

    def __init__(self, expert: Any, device: str = "cuda", max_batch_size: int = 256, settings: Any = None, *,
                 switch_mode: str = "pinned", reload_dir: str | None = None, build_in_thread: bool = True,
                 dummy_init_seed: int | None = None, **engine_options: Any):
        """``engine_options``: the production engine's own keyword options (``copy_streams``, …).
        ``build_in_thread=False`` builds vLLM on the event loop's thread (the bench retries a start
        that failed beside others that way)."""
        if switch_mode not in SWITCH_MODES:
            raise ValueError(f"unknown switch_mode {switch_mode!r}; choose one of {', '.join(SWITCH_MODES)}")
        super().__init__(expert, device, max_batch_size, settings, **engine_options)
        self.switch_mode = switch_mode
        self.reload_dir = reload_dir
        self.build_in_thread = build_in_thread
        self.dummy_init_seed = dummy_init_seed
        self._file: str | None = None

    # ---------------------------------------------------------------- the three overridden steps
    async def _start_vllm(self) -> Any:
        llm = await super()._start_vllm() if self.build_in_thread else self._build()
        if self.dummy_init_seed is not None and self.load_format == "dummy":
            try:
                await llm.collective_rpc("coe_randomize", args=(int(self.dummy_init_seed),))
            except BaseException:
                llm.shutdown()  # not ours yet: load() only shuts down what it was handed
                raise
        return llm

    async def _keep_host_copy(self) -> dict[str, Any]:
        if self.switch_mode == "pinned":
            return await super()._keep_host_copy()
        if self.switch_mode == "reload":
            return {"save": await self._save_file()}
        return {}  # "sleep": vLLM keeps its own copy at every level-1 sleep

    async def _leave_hbm(self) -> None:
        if self.switch_mode == "sleep":
            await self._sleep(1)
            return
        if self.switch_mode == "reload":
            if not self._file:
                await self._save_file()
            await self._sleep(2)
            return
        await super()._leave_hbm()

    async def _enter_hbm(self) -> dict[str, float]:
        if self._state == "asleep1":
            t0 = time.perf_counter()
            await self._llm.wake_up()
            return {"wake_s": time.perf_counter() - t0}
        if self._file and (self.switch_mode == "reload" or not self._has_copy):
            return await self._wake_three_steps("coe_restore_file", self._file)
        return await super()._enter_hbm()

    # ---------------------------------------------------------------- what only the bench asks for
    def _reload_path(self) -> str:
        base = Path(self.reload_dir or "/tmp/coe-vllm-reload")
        base.mkdir(parents=True, exist_ok=True)
        return str(base / f"{self.name}.weights.bin")

    async def _save_file(self) -> dict[str, Any]:
        info = dict(await self._rpc("coe_save_file", self._reload_path()))
        self._file = self._reload_path()
        return info

    async def set_switch_mode(self, mode: str) -> None:
        """Change how this engine switches, leaving it asleep in that mode's DRAM state.

        Lets one set of running engines be measured under several modes; a service has one."""
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
        """Per-parameter sums read on the GPU (the engine must be awake)."""
        if self._state != "awake":
            raise EngineNotResident(f"expert {self.name!r} is not awake")
        return list(await self._rpc("coe_weights_digest"))

