"""What an engine holds in each memory, and how coe measures device memory.

The tier manager charges an engine's :class:`EngineMemory` against the pool's budgets, so the HBM
budget holds on a real GPU, where an awake vLLM engine holds far more than its weights (KV cache,
CUDA graphs, activations, its CUDA context) and a sleeping one still keeps its context:

==============  ==========================================  ==================================
field           vLLM engine                                 hf engine
==============  ==========================================  ==================================
host_bytes      the pinned copy of the weights (DRAM tier)  the flat host buffer (DRAM tier)
active_bytes    whole footprint while awake                 the weights on the device
idle_bytes      what a sleeping engine keeps on the GPU     0 (nothing stays on the device)
load_bytes      ``active_bytes``: vLLM starts awake         0 (a load only fills host memory)
==============  ==========================================  ==================================

Before the first load these are estimates (weights + configured KV cache + a fixed overhead);
after it the engine reports measured numbers and the tier manager corrects its charges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineMemory:
    """Bytes an engine holds, per state; ``measured`` is False while they are estimates."""

    host_bytes: int
    active_bytes: int
    idle_bytes: int = 0
    load_bytes: int = 0
    measured: bool = False

    @classmethod
    def weights_only(cls, nbytes: int, measured: bool) -> "EngineMemory":
        """An engine whose only memory is its weights, in host memory and (awake) on the device."""
        return cls(host_bytes=int(nbytes), active_bytes=int(nbytes), measured=measured)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the out-of-memory failures of torch, CUDA and vLLM's start-up memory checks: a
    *transient* error (another engine may release memory), not a broken expert."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover - torch is a dependency
        pass
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("out of memory", "outofmemory", "no available memory for the cache blocks",
                                   "less than desired gpu memory utilization", "cuda_error_out_of_memory"))


def _device_index(device: str) -> int:
    _, _, idx = str(device).partition(":")
    return int(idx) if idx.isdigit() else 0


def process_device_bytes(device: str, pid: int) -> int | None:
    """Device memory one process holds, from NVML's per-process accounting; None where NVML is
    missing or cannot see that process (e.g. a container whose PIDs NVML does not share)."""
    try:
        import pynvml  # from nvidia-ml-py, a dependency of vLLM
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(_device_index(device))
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except Exception as e:  # noqa: BLE001 - measurement is best effort; the estimate stays
        log.debug("NVML per-process memory unavailable: %s", e)
    return None


def device_used_bytes(device: str) -> int | None:
    """Bytes in use on the whole device (NVML, else torch.cuda.mem_get_info); None off CUDA."""
    if not str(device).startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(_device_index(device)))
        return int(info.used)
    except Exception:  # noqa: BLE001 - fall back to torch
        pass
    try:
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total - free)
    except Exception:  # noqa: BLE001
        return None


def device_total_bytes(device: str) -> int | None:
    """The device's memory size, or None off CUDA."""
    if not str(device).startswith("cuda"):
        return None
    try:
        import torch

        return int(torch.cuda.get_device_properties(_device_index(device)).total_memory)
    except Exception:  # noqa: BLE001
        return None

