"""Reading the JSONL files the router learns from.

Two kinds, one record per line:

* category data: ``{"prompt": "...", "category": "coding"}`` (stage 1 training and evaluation);
* evaluation records: ``{"prompt": "...", "expert": "name", "score": 0.8}`` (stage 2 quality predictor).

Every problem is reported with the file and the 1-based line number, because these files are
written by hand or by scripts and a silent skip would train on something else than the user thinks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from routers.errors import DataError

SEED_PACKAGE = "routers"
SEED_DIR = "data/seed"


@dataclass(frozen=True)
class LabeledPrompt:
    prompt: str
    category: str
    line: int = 0


@dataclass(frozen=True)
class EvalRecord:
    prompt: str
    expert: str
    score: float
    line: int = 0


def _iter_json_lines(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # split on "\n" only: str.splitlines() also breaks at U+0085, U+2028, U+2029 and other
    # characters that are valid, unescaped, inside JSON strings (JSON Lines ends records with \n)
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def _text_field(path: Path, n: int, obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in obj else f"got {type(value).__name__} {str(value)[:40]!r}"
        raise DataError(f"{path}:{n}: field {key!r} must be a non-empty string ({got})")
    return value


def read_labeled(path: str | Path, labels: Iterable[str] | None = None) -> list[LabeledPrompt]:
    """Read ``{"prompt", "category"}`` lines. With ``labels``, a category outside them is an error
    (an evaluation must not silently score a category the router cannot predict)."""
    path = Path(path)
    allowed = list(labels) if labels is not None else None
    out: list[LabeledPrompt] = []
    for n, obj in _iter_json_lines(path):
        prompt = _text_field(path, n, obj, "prompt")
        cat = _text_field(path, n, obj, "category").strip()
        if allowed is not None and cat not in allowed:
            raise DataError(
                f"{path}:{n}: unknown category {cat!r}; this router knows: {', '.join(allowed)}"
            )
        out.append(LabeledPrompt(prompt, cat, n))
    if not out:
        raise DataError(f"{path}: no records (expected one {{\"prompt\", \"category\"}} object per line)")
    return out


def read_eval_records(path: str | Path) -> list[EvalRecord]:
    """Read ``{"prompt", "expert", "score"}`` lines; scores must lie in [0, 1]."""
    path = Path(path)
    out: list[EvalRecord] = []
    for n, obj in _iter_json_lines(path):
        prompt = _text_field(path, n, obj, "prompt")
        expert = _text_field(path, n, obj, "expert").strip()
        score = obj.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise DataError(f"{path}:{n}: field 'score' must be a number in [0, 1] (got {score!r})")
        out.append(EvalRecord(prompt, expert, float(score), n))
    if not out:
        raise DataError(f"{path}: no records (expected one {{\"prompt\", \"expert\", \"score\"}} per line)")
    return out


def seed_files() -> list[Path]:
    """The seed set shipped inside the package, one JSONL file per category (sorted by name)."""
    root = resources.files(SEED_PACKAGE).joinpath(SEED_DIR)
    files = sorted(Path(str(p)) for p in root.iterdir() if str(p).endswith(".jsonl"))
    if not files:
        raise DataError(f"{root}: no seed files (*.jsonl) found; the package is incomplete")
    return files


def read_seed() -> list[LabeledPrompt]:
    """All seed records; each file's records must carry its category."""
    out: list[LabeledPrompt] = []
    for f in seed_files():
        out.extend(read_labeled(f))
    return out


def fingerprint(records: Iterable[LabeledPrompt]) -> str:
    """Content hash of a labelled data set (order-independent), used in cache keys."""
    h = hashlib.sha256()
    for line in sorted(json.dumps([r.prompt, r.category], ensure_ascii=False) for r in records):
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class SynthPrompt:
    """A template-generated training prompt (``routers.synth``) with its provenance, so that
    benchmarks can hold out whole writers and voices."""

    prompt: str
    category: str
    topic: str
    family: str
    writer: str
    voice: str


SYNTH_DIR = "data/synth"


def read_synth() -> list[SynthPrompt]:
    """The generated training set shipped in the package (empty if it is absent)."""
    root = resources.files(SEED_PACKAGE).joinpath(SYNTH_DIR)
    out: list[SynthPrompt] = []
    if not root.is_dir():
        return out
    for p in sorted(Path(str(x)) for x in root.iterdir() if str(x).endswith(".jsonl")):
        for _, obj in _iter_json_lines(p):
            out.append(SynthPrompt(obj["prompt"], obj["category"], obj["topic"], obj["family"],
                                   obj["writer"], obj["voice"]))
    return out
