"""The ``hf`` engine: transformers ``AutoModelForCausalLM`` on CPU or CUDA.

Weights live in ONE flat host buffer (pinned on CUDA, via ``cudaHostRegister`` so no power-of-two
rounding), laid out with 256-byte alignment. Moving to HBM is one host→device copy of that buffer
into one device buffer, after which every parameter/buffer of the (persistent) module is re-pointed
at a view of it; leaving HBM re-points them at ``meta`` placeholders and drops the device buffer —
no device→host copy, since weights never change while served. On CPU the "HBM" tier re-points the
module at views of the host buffer itself (no copy) and leaving it drops them.

Generation runs in one worker thread per engine with a loop we control (prefill + per-step decode
over a ``DynamicCache``): requests waiting when a batch starts are batched together (left padding,
explicit position ids); finished or cancelled rows are dropped from the cache at the next step,
and a batch whose rows are all cancelled stops at once. Requests that arrive while a batch runs
join it at the next decode step (iteration-level batching): they are prefilled on their own, then
their KV cache rows are left-padded to the running batch's length and concatenated to it, up to
``max_batch_size`` rows. (Joining needs transformers' plain ``DynamicCache`` layers; for models
with other cache layouts, e.g. sliding-window layers, new requests wait for the next batch.)

One request never fails another (issue 24, High 1): a row whose sampling or detokenisation raises
is answered with a :class:`~coe.errors.RequestError` (``sampling_failed``) and dropped while the
others go on; a failure of the whole batch (a forward pass) is sent to every request the batch ever
held, those that joined it mid-way included, so no request is left waiting.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import torch

from coe.engines.base import (
    SAMPLING_EPS,
    ChatMessage,
    Engine,
    EngineStats,
    GenerationChunk,
    SamplingParams,
    SwapRecord,
    Tier,
    relay,
)
from coe.engines.sources import LOAD_LOCK, ModelSource, diagnose_files, ensure_converted, estimate_bytes, resolve_source
from coe.errors import EngineNotResident, ExpertLoadError, RequestError
from expert_registry.spec import Expert


def _cache_kwarg(model: Any, cache: Any) -> dict[str, Any]:
    """The KV cache as the model's forward takes it: ``cache`` since transformers 5.x (the older
    ``past_key_values`` is deprecated there and goes in 5.40), ``past_key_values`` before."""
    return {_cache_arg_name(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_arg_name(model_class: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name (see :func:`_cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values

log = logging.getLogger(__name__)

_ALIGN = 256
_LOAD_LOCK = LOAD_LOCK  # loads are serialised (see sources.LOAD_LOCK); swaps are not
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Slot:
    """Where one tensor of the module lives inside the flat buffer."""

    module: torch.nn.Module
    attr: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class _Request:
    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    gen: torch.Generator | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion: list[int] = field(default_factory=list)
    text: str = ""  # detokenised so far
    sent_text: str = ""  # what was streamed (text minus a held-back possible stop prefix)
    sent_ids: int = 0
    prefix_offset: int = 0  # incremental detokenisation window (O(1) per token, not O(n))
    read_offset: int = 0
    done: bool = False

    def emit(self, chunk: GenerationChunk | BaseException) -> None:
        """Hand ``chunk`` to the request's event loop; a closed loop has no listener left, and must
        not raise into the batch loop (that would fail the other rows)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, chunk)
        except RuntimeError:  # the loop is closed
            pass


class HFEngine(Engine):
    """transformers engine; see the module docstring for the memory layout and batching."""

    def __init__(self, expert: Expert, device: str = "cpu", max_batch_size: int = 8):
        self.expert = expert
        self.name: str = expert.name
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self._tier = Tier.DISK
        self._source: ModelSource | None = None
        self._folder: Path | None = None
        self._tokenizer: Any = None
        self._model: torch.nn.Module | None = None  # skeleton; real tensors only in HBM
        self._slots: list[_Slot] = []
        self._host: torch.Tensor | None = None  # flat uint8 host buffer (DRAM tier)
        self._host_registered = False
        self._dev: torch.Tensor | None = None  # flat uint8 device buffer (HBM tier, CUDA)
        self._nbytes = 0
        self._estimate: int | None = None
        self._stats = EngineStats()
        self._jobs: queue.Queue[_Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._tok_lock = threading.Lock()
        # Held by the worker thread while a batch computes: leaving HBM waits for it, so a forward
        # pass never reads weights that were already handed back (a cancelled stream's batch stops
        # at its next step, after the pool already counted the request as finished).
        self._compute_lock = threading.Lock()
        self.last_load_info: dict[str, Any] = {}

    # ---------------------------------------------------------------- sizes and sources
    @property
    def tier(self) -> Tier:
        return self._tier

    def _src(self) -> ModelSource:
        if self._source is None:
            self._source = resolve_source(self.expert.model, self.expert.gguf_file,
                                          self.expert.revision)
        return self._source

    def _dtype_name(self) -> str:
        want = self.expert.dtype
        if want != "auto":
            return want
        if self.device.type == "cpu":
            return "float32"
        src = self._src()
        if src.kind == "folder":
            try:
                cfg = json.loads((Path(src.path) / "config.json").read_text())
                d = cfg.get("torch_dtype") or cfg.get("dtype")
                if d in ("float16", "bfloat16"):
                    return d
            except (OSError, ValueError):
                pass
        return "bfloat16"

    def footprint_bytes(self) -> int:
        if self._nbytes:
            return self._nbytes
        if self._estimate is None:
            self._estimate = estimate_bytes(self._src(), self._dtype_name())
        return self._estimate

    def _model_folder(self) -> str:
        if self._folder is None:
            src = self._src()
            if src.kind == "gguf":
                self._folder = ensure_converted(src.path)
            else:
                self._folder = Path(src.path)
        return str(self._folder)

    # ---------------------------------------------------------------- tokenizer / templates
    @property
    def tokenizer(self) -> Any:
        with self._tok_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(
                    self._model_folder(),
                    trust_remote_code=self.expert.trust_remote_code,
                )
                if tok.pad_token_id is None:
                    tok.pad_token = tok.eos_token or tok.unk_token
                tok.padding_side = "left"
                self._tokenizer = tok
            return self._tokenizer

    # ---------------------------------------------------------------- tier moves
    async def load(self) -> SwapRecord:
        if self._tier is not Tier.DISK:
            return SwapRecord(self._tier, self._tier, 0, 0.0)
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self._load_sync)
        except ExpertLoadError:
            raise
        except Exception as exc:  # files vanished, corrupt, unsupported: one clear reason
            self._drop_host()
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            bad = diagnose_files(self._src())
            raise ExpertLoadError(self.name, f"{bad} ({reason})" if bad else reason) from exc
        finally:
            self.load_phase = ""
        self._tier = Tier.DRAM
        return SwapRecord(Tier.DISK, Tier.DRAM, self._nbytes, time.perf_counter() - t0)

    def _load_sync(self) -> None:
        from transformers import AutoModelForCausalLM

        src = self._src()
        if not Path(src.path).exists():
            raise FileNotFoundError(f"{src.path} does not exist")
        self.load_phase = "converting GGUF" if src.kind == "gguf" and self._folder is None else "reading tokenizer"
        with _LOAD_LOCK:
            folder = self._model_folder()
            _ = self.tokenizer
        dtype = _DTYPES[self._dtype_name()]
        t0 = time.perf_counter()
        self.load_phase = "reading weights"
        with _LOAD_LOCK:
            # safetensors whenever the folder has them: never fall back to a pickle-based .bin by accident
            has_st = any(Path(folder).glob("*.safetensors"))
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, use_safetensors=True if has_st else None,
                trust_remote_code=self.expert.trust_remote_code,
            )
        model.eval()
        self.load_phase = "copying weights to host memory"
        t1 = time.perf_counter()
        # Lay out every distinct tensor (tied weights share one slot) in one flat buffer.
        seen: dict[tuple[int, torch.dtype, tuple[int, ...]], int] = {}
        entries: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
        for mod in model.modules():
            for attr, p in mod._parameters.items():
                if p is not None:
                    entries.append((mod, attr, True, p.data))
            for attr, b in mod._buffers.items():
                if b is not None:
                    entries.append((mod, attr, False, b))
        offset = 0
        slots: list[_Slot] = []
        for mod, attr, is_param, t in entries:
            key = (t.data_ptr(), t.dtype, tuple(t.shape))
            nbytes = t.numel() * t.element_size()
            if key not in seen:
                seen[key] = offset
                offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
            slots.append(_Slot(mod, attr, is_param, seen[key], nbytes, t.dtype, tuple(t.shape)))
        host = torch.empty(max(offset, _ALIGN), dtype=torch.uint8)
        copied: set[int] = set()
        for s, (_, _, _, t) in zip(slots, entries):
            if s.offset in copied:
                continue
            host[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape).copy_(t.contiguous())
            copied.add(s.offset)
        t2 = time.perf_counter()
        if self.device.type == "cuda":
            self.load_phase = "pinning host memory"
            self._pin(host)
        t3 = time.perf_counter()
        self._host, self._slots, self._nbytes, self._model = host, slots, offset, model
        self._point_at(None)  # skeleton: no real tensors until to_hbm
        self.last_load_info = {"from_pretrained_s": t1 - t0, "flatten_s": t2 - t1, "pin_s": t3 - t2,
                               "pinned_via": "cudaHostRegister" if self._host_registered else "none"}

    def _pin(self, host: torch.Tensor) -> None:
        try:
            rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)
            ok = int(rc) == 0 if not hasattr(rc, "value") else rc.value == 0
        except Exception:  # pragma: no cover - depends on the CUDA build
            ok = False
        if ok:
            self._host_registered = True
        else:  # fall back to the caching host allocator
            host_p = host.pin_memory()
            host.set_(host_p)  # type: ignore[call-overload]

    def _drop_host(self) -> None:
        if self._host is not None and self._host_registered:
            torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
        self._host_registered = False
        self._host = None

    def _point_at(self, flat: torch.Tensor | None) -> None:
        """Re-point every module tensor at a view of ``flat`` (or at meta placeholders if None)."""
        for s in self._slots:
            if flat is None:
                t = torch.empty(s.shape, dtype=s.dtype, device="meta")
            else:
                t = flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)
            if s.is_param:
                s.module._parameters[s.attr] = torch.nn.Parameter(t, requires_grad=False)
            else:
                s.module._buffers[s.attr] = t

    async def to_hbm(self) -> SwapRecord:
        if self._tier is Tier.DISK:
            raise EngineNotResident(f"expert {self.name!r}: to_hbm() before load()")
        if self._tier is Tier.HBM:
            return SwapRecord(Tier.HBM, Tier.HBM, 0, 0.0)
        t0 = time.perf_counter()
        self.to_hbm_sync()
        return SwapRecord(Tier.DRAM, Tier.HBM, self._nbytes, time.perf_counter() - t0)

    def to_hbm_sync(self) -> None:
        """DRAM→HBM; synchronous so a bench can time it without event-loop noise."""
        assert self._host is not None
        if self.device.type == "cuda":
            try:
                dev = torch.empty(self._host.numel(), dtype=torch.uint8, device=self.device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                dev = torch.empty(self._host.numel(), dtype=torch.uint8, device=self.device)
            dev.copy_(self._host, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            self._dev = dev
            self._point_at(dev)
        else:
            self._point_at(self._host)
        self._tier = Tier.HBM

    async def to_dram(self) -> SwapRecord:
        if self._tier is not Tier.HBM:
            return SwapRecord(self._tier, self._tier, 0, 0.0)
        t0 = time.perf_counter()
        if not self._compute_lock.acquire(blocking=False):  # a batch is finishing its last step
            waiter = asyncio.ensure_future(asyncio.to_thread(self._compute_lock.acquire))
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:  # the thread still gets the lock: hand it back then
                waiter.add_done_callback(lambda _f: self._compute_lock.release())
                raise
        try:
            self.to_dram_sync()
        finally:
            self._compute_lock.release()
        return SwapRecord(Tier.HBM, Tier.DRAM, self._nbytes, time.perf_counter() - t0)

    def to_dram_sync(self) -> None:
        """HBM→DRAM: drop the device copy (it returns to torch's caching allocator for the next expert)."""
        self._point_at(None)
        self._dev = None
        self._tier = Tier.DRAM

    async def unload(self) -> SwapRecord:
        if self._tier is Tier.HBM:
            await self.to_dram()
        if self._tier is not Tier.DRAM:
            return SwapRecord(self._tier, self._tier, 0, 0.0)
        t0 = time.perf_counter()
        self._model, self._slots = None, []
        self._drop_host()
        self._tier = Tier.DISK
        return SwapRecord(Tier.DRAM, Tier.DISK, self._nbytes, time.perf_counter() - t0)

    # ---------------------------------------------------------------- generation
    def stats(self) -> EngineStats:
        return self._stats

    async def generate(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        if self._tier is not Tier.HBM:
            raise EngineNotResident(f"expert {self.name!r} is not in the active tier")
        params = params.with_defaults(self.expert.generation)
        ids = await asyncio.to_thread(self._encode, messages)
        gen = None
        # below SAMPLING_EPS: greedy, as vLLM does (an expert's generation default reaches here
        # unvalidated, and dividing logits by a tiny temperature makes them inf)
        if params.temperature >= SAMPLING_EPS:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        req = _Request(ids, params, asyncio.get_running_loop(), asyncio.Queue(), gen)
        self._ensure_worker()
        self._jobs.put(req)
        try:
            async for item in relay(req.out):
                yield item
        finally:
            if not req.done:
                req.cancelled.set()

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name=f"coe-hf-{self.name}", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                batch.append(nxt)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                with self._compute_lock:
                    self._run_batch(batch)  # appends the requests that join it to ``batch``
            except BaseException as exc:  # surface to every stream the batch held, keep the worker alive
                log.exception("expert %s: batch failed", self.name)
                for r in batch:
                    if not r.done:
                        r.done = True
                        r.emit(exc)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gc = getattr(self._model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _prefill(self, reqs: list[_Request]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """One left-padded forward over the prompts of ``reqs``: (last logits, cache, mask, last positions)."""
        dev = self.device
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        T = max(len(r.ids) for r in reqs)
        input_ids = torch.full((len(reqs), T), pad, dtype=torch.long)
        attn = torch.zeros((len(reqs), T), dtype=torch.long)
        for i, r in enumerate(reqs):
            input_ids[i, T - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
            attn[i, T - len(r.ids) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        input_ids, attn, pos = input_ids.to(dev), attn.to(dev), pos.to(dev)
        self._stats.steps += 1
        self._stats.batch_sizes.append(len(reqs))
        self._stats.requests += len(reqs)
        assert self._model is not None
        out = self._model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], _cache_of(out), attn, pos[:, -1]

    def _advance(self, active: list[_Request], logits: torch.Tensor, eos: set[int], max_ctx: int) -> tuple[list[int], list[int]]:
        """Sample one token per row, stream it, apply stop rules; returns (tokens, rows still running).

        A row whose sampling or streaming raises is answered with its own error and dropped
        (:meth:`_fail`): what one request sent must never end another tenant's stream."""
        next_tokens: list[int] = logits.argmax(dim=-1).tolist()
        keep: list[int] = []
        for i, r in enumerate(active):
            if r.cancelled.is_set():
                r.done = True
                self._stats.cancelled += 1
                continue
            try:
                if r.gen is not None:
                    next_tokens[i] = self._sample(logits[i], r)
                t = next_tokens[i]
                finish = None
                if t in eos and not r.params.ignore_eos:
                    finish = "stop"
                else:
                    r.completion.append(t)
                    if len(r.completion) >= r.params.max_tokens:
                        finish = "length"
                    elif max_ctx and len(r.ids) + len(r.completion) >= max_ctx:
                        finish = "length"
                finish = self._emit(r, finish)
            except Exception as exc:
                self._fail(r, exc)
                continue
            if finish is None:
                keep.append(i)
            else:
                r.done = True
                self._stats.completion_tokens += len(r.completion)
        return next_tokens, keep

    @staticmethod
    def _joinable(past: Any) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(past, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    @staticmethod
    def _merge(past: Any, attn: torch.Tensor, past_new: Any, attn_new: torch.Tensor) -> torch.Tensor:
        """Append the rows of ``past_new`` to ``past`` (left-padding the shorter one); returns the mask."""
        T = max(attn.shape[1], attn_new.shape[1])

        def lpad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = T - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)

        for a, b in zip(past.layers, past_new.layers):
            a.keys = torch.cat([lpad(a.keys, -2), lpad(b.keys, -2)], dim=0)
            a.values = torch.cat([lpad(a.values, -2), lpad(b.values, -2)], dim=0)
        return torch.cat([lpad(attn, 1), lpad(attn_new, 1)], dim=0)

    def _fail(self, r: _Request, exc: Exception) -> None:
        """Answer one row with a typed error and stop it; the rest of its batch goes on. The cause
        is logged, not sent: the client learns that its request failed, not our internals."""
        log.warning("expert %s: one request failed while sampling (its batch goes on): %s: %s",
                    self.name, type(exc).__name__, exc)
        if not isinstance(exc, RequestError):
            exc = RequestError(f"expert {self.name!r} could not sample the next token of this request "
                               f"(check its sampling parameters); other requests were not affected",
                               param=None, code="sampling_failed")
        r.done = True
        r.emit(exc)

    def _take_waiting(self, room: int, batch: list[_Request]) -> list[_Request]:
        """Up to ``room`` waiting requests to join the running batch. Each is appended to ``batch``
        as it leaves the queue: the worker answers every request of ``batch`` if the batch fails,
        so a request that joined mid-way is never left waiting (issue 24: they were)."""
        got: list[_Request] = []
        while len(got) < room:
            try:
                nxt = self._jobs.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # shutdown marker: leave it for the worker loop
                self._jobs.put(None)
                break
            if not nxt.cancelled.is_set():
                got.append(nxt)
                batch.append(nxt)
        return got

    @torch.inference_mode()
    def _run_batch(self, reqs: list[_Request]) -> None:
        """Decode ``reqs`` together; requests that arrive meanwhile join at the next step
        (iteration-level batching) as long as there is room and the cache layout allows it. Joiners
        are appended to ``reqs``, the list the caller answers with the error if this raises."""
        if self._model is None or self._tier is not Tier.HBM:
            raise EngineNotResident(f"expert {self.name!r} left the active tier during a batch")
        dev = self.device
        eos = self._eos_ids()
        max_ctx = self.expert.max_context
        logits, past, attn, last_pos = self._prefill(reqs)
        active = list(reqs)
        next_tokens, keep = self._advance(active, logits, eos, max_ctx)
        while True:
            if len(keep) < len(active):
                if not keep:
                    active = []
                else:
                    idx = torch.tensor(keep, dtype=torch.long, device=dev)
                    past.batch_select_indices(idx)
                    attn, last_pos = attn[idx], last_pos[idx]
                    next_tokens = [next_tokens[i] for i in keep]
                    active = [active[i] for i in keep]
            if active and len(active) < self.max_batch_size and self._joinable(past):
                joiners = self._take_waiting(self.max_batch_size - len(active), reqs)
                if joiners:
                    self._stats.joined += len(joiners)
                    j_logits, j_past, j_attn, j_last = self._prefill(joiners)
                    j_tokens, j_keep = self._advance(joiners, j_logits, eos, max_ctx)
                    if j_keep:
                        if len(j_keep) < len(joiners):
                            jdx = torch.tensor(j_keep, dtype=torch.long, device=dev)
                            j_past.batch_select_indices(jdx)
                            j_attn, j_last = j_attn[jdx], j_last[jdx]
                        attn = self._merge(past, attn, j_past, j_attn)
                        last_pos = torch.cat([last_pos, j_last])
                        next_tokens = next_tokens + [j_tokens[i] for i in j_keep]
                        active = active + [joiners[i] for i in j_keep]
            if not active:
                return
            step_ids = torch.tensor(next_tokens, dtype=torch.long, device=dev).unsqueeze(1)
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            self._stats.steps += 1
            out = self._model(input_ids=step_ids, attention_mask=attn, position_ids=last_pos.unsqueeze(1),
                              use_cache=True, **_cache_kwarg(self._model, past))
            past = _cache_of(out)
            next_tokens, keep = self._advance(active, out.logits[:, -1, :], eos, max_ctx)

    def _sample(self, logits: torch.Tensor, r: _Request) -> int:
        """One token from one row's logits with ``r``'s temperature, top_p and generator. Raises
        :class:`RequestError` on probabilities that are not finite (NaN logits, say) rather than
        handing them to ``torch.multinomial``, whose error names nothing a client can act on."""
        row = logits.float().cpu() / r.params.temperature
        probs = torch.softmax(row, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise RequestError(f"expert {self.name!r}: the next-token probabilities of this request are not "
                               f"finite numbers at temperature {r.params.temperature:g}", param=None,
                               code="sampling_failed")
        if r.params.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cum = sp.cumsum(0)
            cut = cum - sp > r.params.top_p  # keep the smallest prefix reaching top_p
            sp[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs, 1, generator=r.gen).item())

    def _detok(self, r: _Request) -> None:
        """Append the text of newly generated tokens to ``r.text`` (decoding a short window only)."""
        tok = self.tokenizer
        prefix = tok.decode(r.completion[r.prefix_offset : r.read_offset], skip_special_tokens=True)
        new = tok.decode(r.completion[r.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            r.text += new[len(prefix) :]
            r.prefix_offset, r.read_offset = r.read_offset, len(r.completion)

    def _emit(self, r: _Request, finish: str | None) -> str | None:
        """Send the new text of ``r`` (holding back a possible stop-string prefix); apply stop strings."""
        self._detok(r)
        if finish is not None and r.read_offset < len(r.completion):  # flush an incomplete tail
            tail = self.tokenizer.decode(r.completion[r.prefix_offset :], skip_special_tokens=True)
            head = self.tokenizer.decode(r.completion[r.prefix_offset : r.read_offset], skip_special_tokens=True)
            r.text += tail[len(head) :]
            r.prefix_offset = r.read_offset = len(r.completion)
        text = r.text
        stops = [s for s in r.params.stop if s]
        if stops:
            start = max(0, len(r.sent_text) - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None:
            safe = len(text)
            if stops:
                safe = min(safe, len(text) - (max(len(s) for s in stops) - 1))
            delta = text[len(r.sent_text) : max(safe, len(r.sent_text))]
        else:
            delta = text[len(r.sent_text) :] if len(text) >= len(r.sent_text) else ""
        if delta or finish is not None:
            r.sent_text += delta
            new_ids = r.completion[r.sent_ids :]
            r.sent_ids = len(r.completion)
            r.emit(GenerationChunk(text=delta, finish_reason=finish, prompt_tokens=len(r.ids),
                                   completion_tokens=len(r.completion), token_ids=new_ids))
        return finish

    async def close(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._jobs.put(None)
        await super().close()
