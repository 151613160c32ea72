"""Code that runs inside vLLM's GPU worker (the engine-core process), not in the pool's process.

vLLM loads this class as ``worker_extension_cls``: its methods become methods of the worker, and
the :class:`~coe.engines.vllm_engine.VLLMEngine` calls them by *name* through
``AsyncLLM.collective_rpc("coe_…")`` — a string, so nothing is pickled (cloudpickled callables would
need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``).

What it does: keep coe's DRAM tier — a pinned host copy of the expert's weights — next to the GPU
that uses it, so that entering HBM is one host→device copy into the buffers that
``wake_up(tags=["weights"])`` has just re-mapped, and leaving HBM is ``sleep(level=2)`` (nothing is
copied back: weights are immutable while served).

Why at the level of vLLM's sleep-mode allocator, not of ``model.named_parameters()``: with
``enable_sleep_mode=True`` every tensor created while vLLM loads the model is allocated by the
``CuMemAllocator`` under the tag ``"weights"``; ``sleep(level=2)`` unmaps those allocations and
``wake_up(["weights"])`` maps fresh memory at the *same* virtual addresses. Copying those
allocations byte for byte restores exactly what level-1 sleep would have restored — parameters,
fused/processed weights, buffers and any tensor a model keeps as a plain attribute — without
knowing the model's structure. The list of allocations is taken at capture time and checked at
every restore (it must not change while the engine lives).

Pinning: the host copy is one flat buffer of exactly its size (the caching pinned allocator would
round 16 GB up to 32 GB), pinned as :func:`pinned_host` says (``host_alloc``), falling back to
``pin_memory=True``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

_ALIGN = 4096


def _allocator() -> Any:
    from vllm.device_allocator.cumem import CuMemAllocator

    return CuMemAllocator.get_instance()


def _cudart() -> Any:
    from vllm.device_allocator import cumem

    if cumem.libcudart is None:  # pragma: no cover - only without the cumem extension
        raise RuntimeError("vLLM's cumem allocator is not available: sleep mode cannot be used")
    return cumem.libcudart


def _weight_chunks() -> list[tuple[int, int]]:
    """(device pointer, bytes) of every allocation vLLM made under the ``weights`` tag, by address."""
    alloc = _allocator()
    return sorted((int(ptr), int(d.handle[1])) for ptr, d in alloc.pointer_to_data.items() if d.tag == "weights")


Memcpy = Callable[[int, int, int], None]  # (dst, src, nbytes)


@dataclass
class HostBuffer:
    """A flat uint8 host tensor and how to give it back (``how`` says how it was pinned)."""

    tensor: Any
    how: str = "unpinned"
    release: Callable[[], None] = lambda: None


def _plain_host(nbytes: int) -> HostBuffer:
    import torch

    return HostBuffer(torch.empty(max(nbytes, 1), dtype=torch.uint8))


class PinnedCopy:
    """A host copy of a list of memory chunks ``(address, nbytes)``, laid out back to back (4 KiB
    aligned) in one flat buffer. Device-agnostic: the caller gives the copy function (``cudaMemcpy``
    in the worker; ``ctypes.memmove`` in the CPU tests) and how to allocate the buffer."""

    def __init__(self, chunks: list[tuple[int, int]], alloc: Callable[[int], HostBuffer] = _plain_host):
        self.chunks = list(chunks)
        self.offsets: list[int] = []
        total = 0
        for _, size in self.chunks:
            self.offsets.append(total)
            total += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        self.host_bytes = total
        self.nbytes = sum(s for _, s in self.chunks)
        self.buffer = alloc(total)
        self.host = self.buffer.tensor

    def release(self) -> None:
        self.buffer.release()
        self.buffer, self.host = HostBuffer(None), None

    def capture(self, memcpy: Memcpy) -> None:
        base = self.host.data_ptr()
        for (ptr, size), off in zip(self.chunks, self.offsets):
            memcpy(base + off, ptr, size)

    def check(self, chunks: list[tuple[int, int]]) -> None:
        if list(chunks) != self.chunks:
            raise RuntimeError("the weight allocations changed since the pinned copy was taken "
                               f"({len(chunks)} chunks now, {len(self.chunks)} then); capture it again")

    def restore(self, memcpy: Memcpy, chunks: list[tuple[int, int]] | None = None,
                prepare: Callable[[int], None] | None = None) -> None:
        """Copy every chunk back. ``prepare(i)`` runs just before chunk *i*'s copy is issued: the
        one-pass wake maps chunk *i*'s device memory there, so with an asynchronous ``memcpy`` the
        copy of chunk *i* is in flight while chunk *i+1* is being mapped."""
        if chunks is not None:
            self.check(chunks)
        base = self.host.data_ptr()
        for i, ((ptr, size), off) in enumerate(zip(self.chunks, self.offsets)):
            if prepare is not None:
                prepare(i)
            memcpy(ptr, base + off, size)


def _cuda_memcpy(dst: int, src: int, n: int) -> None:
    _cudart().cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), n)


_ASYNC: Any = None


def _h2d_async(dst: int, src: int, n: int, stream: Any = None) -> None:
    """cudaMemcpyAsync host→device on ``stream`` (torch's current one by default); the caller
    synchronizes once at the end."""
    global _ASYNC
    import torch

    if _ASYNC is None:
        f = _cudart().lib.cudaMemcpyAsync
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        _ASYNC = f
    s = stream if stream is not None else torch.cuda.current_stream()
    rc = _ASYNC(ctypes.c_void_p(dst), ctypes.c_void_p(src), n, 1, ctypes.c_void_p(s.cuda_stream))
    if rc != 0:
        raise RuntimeError(f"cudaMemcpyAsync failed: {_cudart().cudaGetErrorString(rc)}")


def round_robin(streams: list[Any], copy: Callable[[int, int, int, Any], None]) -> Memcpy:
    """A ``memcpy`` that issues successive copies on ``streams`` in turn. On the lent H100 one
    queue already fills the link (1, 2 and 4 streams all measured 54 GB/s, ``serve_gpu.py probe``);
    several queues are for hosts where one copy engine cannot."""
    counter = iter(range(1 << 62))

    def memcpy(dst: int, src: int, n: int) -> None:
        copy(dst, src, n, streams[next(counter) % len(streams)])

    return memcpy


def _skip_on_next_wake(alloc: Any, tags: set[str]) -> None:
    """Make the allocator's next ``wake_up`` leave the allocations of ``tags`` alone (they were
    mapped, and the weights filled, by :meth:`CoeWorkerExtension.coe_wake_restore`), so vLLM's own
    ``wake_up()`` then maps what is left (nothing, usually), restores the model's buffers, re-inits
    the KV cache scales and resumes scheduling as usual. Later wake-ups are vLLM's own again."""
    if not getattr(alloc, "_coe_hooked", False):
        orig = alloc.wake_up

        def wake_up(tags: list[str] | None = None) -> None:
            skip = getattr(alloc, "_coe_skip", set())
            alloc._coe_skip = set()
            if skip:
                if tags is None:
                    tags = sorted({d.tag for d in alloc.pointer_to_data.values()} - skip)
                else:
                    tags = [t for t in tags if t not in skip]
                if not tags:
                    return None
            return orig(tags)

        alloc.wake_up = wake_up
        alloc._coe_hooked = True
    alloc._coe_skip = set(tags)


HOST_ALLOC_MODES = ("register", "register_thp", "hostalloc")
_HUGE = 2 << 20


def _register(t: Any, how: str, keep: Any = None) -> HostBuffer | None:
    """cudaHostRegister ``t`` in place; None if refused (``keep``: what must outlive the tensor)."""
    import torch

    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    except Exception:  # pragma: no cover - depends on the CUDA build
        return None
    if int(getattr(rc, "value", rc)) != 0:
        return None
    ptr = t.data_ptr()

    def release(_keep: Any = keep) -> None:  # the tensor (and ``keep``) go when the caller drops them
        torch.cuda.cudart().cudaHostUnregister(ptr)

    return HostBuffer(t, how, release)


def pinned_host(nbytes: int, mode: str = "register") -> HostBuffer:
    """A pinned host buffer of exactly ``nbytes`` (torch's caching pinned allocator would round 16 GB
    up to 32 GB), pinned the ``mode`` way, falling back towards ``pin_memory=True``:

    ``register``      ``torch.empty`` (4 KiB pages) + ``cudaHostRegister`` (the default);
    ``register_thp``  anonymous ``mmap`` aligned to 2 MiB with ``MADV_HUGEPAGE`` + ``cudaHostRegister``;
    ``hostalloc``     ``cudaHostAlloc`` (the driver's own pinned allocation, what ``pin_memory`` uses).

    Measured on the lent H100 for 16 GB: host→device copies run at the same 54 GB/s from all three;
    pinning takes 12.5 s (register), 9.2 s (THP) or 9.5 s (hostalloc), and the device→host capture
    0.53 s, 0.33 s or 0.31 s — so the choice only changes the one-time cost of ``load()``.
    """
    import torch

    if mode not in HOST_ALLOC_MODES:
        raise ValueError(f"unknown host_alloc {mode!r}; choose one of {', '.join(HOST_ALLOC_MODES)}")
    if mode == "hostalloc":
        lib = _cudart().lib
        ptr = ctypes.c_void_p()
        lib.cudaHostAlloc.restype = ctypes.c_int
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        if lib.cudaHostAlloc(ctypes.byref(ptr), max(nbytes, 1), 0) == 0 and ptr.value:
            t = torch.frombuffer((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr.value), dtype=torch.uint8)
            return HostBuffer(t, "cudaHostAlloc", lambda: lib.cudaFreeHost(ptr))
    elif mode == "register_thp":
        m = mmap.mmap(-1, max(nbytes, 1) + _HUGE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(m, dtype=torch.uint8)
        off = (-whole.data_ptr()) % _HUGE
        buf = _register(whole[off: off + max(nbytes, 1)], "cudaHostRegister+THP", keep=m)
        if buf is not None:
            return buf
    buf = _register(torch.empty(max(nbytes, 1), dtype=torch.uint8), "cudaHostRegister")
    if buf is not None:
        return buf
    return HostBuffer(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True), "pin_memory")


class CoeWorkerExtension:
    """Mixed into vLLM's GPU ``Worker``; every method is called via ``collective_rpc("coe_…")``.

    Only what the service's switching needs; the serving bench's baselines (a file copy, random
    dummy weights, weight digests) extend it in ``bench/vllm_baselines.py``."""

    # ------------------------------------------------------------------ pinned copy (DRAM tier)
    def coe_capture(self, host_alloc: str = "register") -> dict[str, Any]:
        """Copy every ``weights`` allocation into one pinned host buffer (called once, while awake)."""
        import torch

        self.coe_drop()
        chunks = _weight_chunks()
        if not chunks:
            raise RuntimeError("no allocations tagged 'weights': was the engine built with enable_sleep_mode=True?")
        t0 = time.perf_counter()
        pc = PinnedCopy(chunks, alloc=lambda n: pinned_host(n, host_alloc))
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        pc.capture(_cuda_memcpy)
        t2 = time.perf_counter()
        self._coe_copy = pc
        return {"nbytes": pc.nbytes, "host_bytes": pc.host_bytes, "chunks": len(chunks), "pin_s": t1 - t0,
                "copy_s": t2 - t1, "pinned_via": pc.buffer.how}

    def coe_wake_restore(self, streams: int = 2) -> dict[str, Any]:
        """Level-2 sleep → awake memory in one pass, as far as the GPU side goes.

        Maps each weight allocation and queues its copy from the pinned buffer right away (on
        ``streams`` CUDA streams in turn), so copies run while later chunks are still being mapped
        (vLLM's ``wake_up(["weights"])`` maps all of them first, then nothing is copied until the
        next call). While the copies are in flight it also maps every other discarded allocation
        (the KV cache), which vLLM would otherwise map after the copy. The engine then calls
        ``wake_up()``, which (see :func:`_skip_on_next_wake`) maps nothing and does vLLM's
        bookkeeping: buffers, KV-cache scales, resuming the scheduler. Returns timings (seconds)."""
        import torch
        from vllm.device_allocator.cumem import create_and_map, unmap_and_release

        pc = getattr(self, "_coe_copy", None)
        if pc is None:
            raise RuntimeError("no pinned copy: coe_capture was not called or the copy was dropped")
        alloc = _allocator()
        pc.check(_weight_chunks())
        datas = [alloc.pointer_to_data[ptr] for ptr, _ in pc.chunks]
        # Other allocations are only ours to map when nothing of them was backed up (level 2).
        others = [d for d in alloc.pointer_to_data.values() if d.tag != "weights"]
        if any(getattr(d, "cpu_backup_tensor", None) is not None for d in others):
            others = []
        ss = self._coe_streams(streams)
        mapped: list[Any] = []

        def map_chunk(i: int) -> None:
            create_and_map(datas[i].handle)
            mapped.append(datas[i])

        t0 = time.perf_counter()
        try:
            pc.restore(round_robin(ss, _h2d_async), prepare=map_chunk)
            t1 = time.perf_counter()
            for d in others:
                create_and_map(d.handle)
                mapped.append(d)
            t2 = time.perf_counter()
            for st in ss:
                st.synchronize()
        except BaseException:
            torch.cuda.synchronize()
            for d in mapped:  # leave it as it was: asleep, nothing mapped
                unmap_and_release(d.handle)
            raise
        t3 = time.perf_counter()
        _skip_on_next_wake(alloc, {"weights", *(d.tag for d in others)})
        return {"total_s": t3 - t0, "map_and_issue_s": t1 - t0, "map_others_s": t2 - t1,
                "streams": len(ss), "others_mapped": len(others)}

    def _coe_streams(self, n: int) -> list[Any]:
        import torch

        have = getattr(self, "_coe_stream_list", [])
        while len(have) < max(1, n):
            have.append(torch.cuda.Stream())
        self._coe_stream_list = have
        return have[: max(1, n)]

    def coe_restore(self) -> float:
        """Host→device copy of the pinned copy into the (just woken) weight allocations; seconds."""
        import torch

        pc = getattr(self, "_coe_copy", None)
        if pc is None:
            raise RuntimeError("no pinned copy: coe_capture was not called or the copy was dropped")
        t0 = time.perf_counter()
        pc.restore(_h2d_async, _weight_chunks())
        torch.cuda.current_stream().synchronize()
        return time.perf_counter() - t0

    def coe_drop(self) -> int:
        """Release the pinned copy (DRAM→DISK); returns the bytes released."""
        pc = getattr(self, "_coe_copy", None)
        if pc is None:
            return 0
        self._coe_copy = None
        pc.release()
        return pc.host_bytes

    # ------------------------------------------------------------------ what the engine reads
    def coe_pid(self) -> int:
        """This worker's process id: the pool reads its device memory from NVML by it."""
        return os.getpid()

    def coe_weight_bytes(self) -> int:
        return sum(s for _, s in _weight_chunks())
