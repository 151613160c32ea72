"""Calibration measures for stage 1: does a probability of 0.9 mean "right 9 times in 10"?

Why here and not in bench/: ``coe router eval`` reports them on the user's own labelled data and
proposes the fallback threshold from them, so the service's users get the same numbers as our
benchmarks.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: the mean |accuracy - confidence| over equal-width confidence
    bins, weighted by how many predictions fall in each bin."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(conf) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    """Per-bin (low, high, n, mean confidence, accuracy): the table a user reads."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        out.append({"low": float(lo), "high": float(hi), "n": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else 0.0,
                    "accuracy": float(correct[m].mean()) if m.any() else 0.0})
    return out


def propose_threshold(conf: np.ndarray, correct: np.ndarray, target_accuracy: float = 0.8,
                      max_fallback: float = 0.25) -> dict[str, Any]:
    """Lowest confidence threshold such that the prompts routed *above* it are right at least
    ``target_accuracy`` of the time, never sending more than ``max_fallback`` of the prompts to the
    fallback. Below the threshold a prompt goes to the ``general`` expert, so the threshold is worth
    raising only while the prompts it catches are mostly wrong."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.sort(np.unique(np.concatenate([[0.0], conf])))
    chosen = 0.0
    for t in order:
        above = conf >= t
        if (~above).mean() > max_fallback:
            break
        if above.any() and correct[above].mean() >= target_accuracy:
            chosen = float(t)
            break
    above = conf >= chosen
    return {"threshold": round(chosen, 3), "fallback_share": float((~above).mean()),
            "accuracy_above": float(correct[above].mean()) if above.any() else 0.0,
            "wrong_below": int((~correct[~above]).sum()), "target_accuracy": target_accuracy,
            "max_fallback": max_fallback}


def calibration_report(P: np.ndarray, y_idx: Sequence[int], confident: float = 0.9) -> dict[str, Any]:
    """ECE, share of confidently-wrong predictions (top p >= ``confident`` and wrong), a reliability
    table and a proposed fallback threshold for probabilities ``P`` (n, classes) and true indices."""
    P = np.asarray(P)
    y = np.asarray(y_idx)
    conf = P.max(axis=1)
    correct = P.argmax(axis=1) == y
    return {"ece": ece(conf, correct), "confidently_wrong": float(((conf >= confident) & ~correct).mean()),
            "confident_at": confident, "mean_confidence": float(conf.mean()), "accuracy": float(correct.mean()),
            "reliability": reliability(conf, correct), "proposed_threshold": propose_threshold(conf, correct)}
