"""The default router: trained on the seed set + the generated set, shipped as an artifact.

Why an artifact: embedding ~3,300 training prompts takes 30-60 s on a 2-core CPU, too long to do on
every fresh install at the first request. The trained classifier (JSON + npz, no pickle) ships in
``routers/data/default/`` and is rebuilt by::

    python -m routers.default_router            # writes routers/data/default/
    python -m routers.default_router --check    # rebuilds in a temp dir and compares

``tests/router/test_stage1_generalisation.py`` runs the check, so the shipped files always come from the
shipped data and code. If the installed encoder differs from the one the artifact was trained with
(another model folder), ``Router.default()`` retrains from the same data instead and caches that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from routers.data import LabeledPrompt, fingerprint, read_seed, read_synth

ARTIFACT_DIR = "data/default"


def training_set() -> tuple[list[LabeledPrompt], list[str]]:
    """Seed + generated prompts, and a CV group per prompt: each seed prompt alone, each generated
    prompt with the other prompts of its template (so calibration sees unseen templates)."""
    seed = read_seed()
    synth = read_synth()
    data = seed + [LabeledPrompt(r.prompt, r.category) for r in synth]
    groups = [f"seed:{i}" for i in range(len(seed))] + [f"synth:{r.family}" for r in synth]
    return data, groups


def shipped_dir() -> Path:
    return Path(str(resources.files("routers").joinpath(ARTIFACT_DIR)))


def data_fingerprint() -> str:
    return fingerprint(training_set()[0])


def build(out: Path, encoder=None):
    """Train the default router on :func:`training_set` and save it to ``out``."""
    from routers.router import Router

    data, groups = training_set()
    router = Router.train(data, encoder, groups=groups, source="seed+synth", holdout=0.2)
    router.save(out)
    return router


def compare(a: Path, b: Path, probe: list[str] | None = None, tol: float = 0.05) -> list[str]:
    """Differences that matter between two router folders: labels, training data, temperature,
    and the probabilities they give on probe prompts (int8 kernels differ slightly between CPUs,
    so weights are compared through their predictions, within ``tol``)."""
    from routers.encoder import get_encoder
    from routers.router import Router

    ra, rb = Router.load(a), Router.load(b)
    problems = []
    if ra.categories != rb.categories:
        problems.append(f"labels differ: {ra.categories} vs {rb.categories}")
    da, db = ra.classifier.meta.get("data_sha256"), rb.classifier.meta.get("data_sha256")
    if da != db:
        problems.append(f"training data differs: {da} vs {db}")
    if abs(ra.classifier.temperature - rb.classifier.temperature) > 0.1 * ra.classifier.temperature:
        problems.append(f"temperature {ra.classifier.temperature:.3f} vs {rb.classifier.temperature:.3f}")
    probe = probe or [r.prompt for r in read_seed()[::15]]
    X = get_encoder().encode(probe)
    pa, pb = ra.classifier.predict_proba(X), rb.classifier.predict_proba(X)
    diff = float(np.abs(pa - pb).max())
    if diff > tol:
        problems.append(f"probabilities differ by up to {diff:.3f} (> {tol}) on {len(probe)} probe prompts")
    if (pa.argmax(1) != pb.argmax(1)).mean() > 0.02:
        problems.append("top category differs on more than 2% of the probe prompts")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with the shipped one")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "default")
            problems = compare(shipped_dir(), Path(tmp) / "default")
        for p in problems:
            print("MISMATCH:", p)
        print("ok: the shipped default router matches a rebuild" if not problems else "the shipped default is stale")
        return 1 if problems else 0
    out = args.out or shipped_dir()
    router = build(out)
    print(json.dumps({"out": str(out), "n_train": router.classifier.meta.get("n_train"),
                      "temperature": router.classifier.temperature}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
