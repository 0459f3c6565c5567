"""Step-level error detection metrics (for candidates with ``step_labels``).

A step is *predicted correct* when its probability sigmoid(z) >= ``threshold``
(default 0.5, i.e. z >= 0). Labels: 1 correct, 0 incorrect, -1 neutral / unlabelled
(excluded everywhere, as VisualProcessBench excludes its neutral steps).

VisualProcessBench macro-F1 (Wang et al. 2025, VisualPRM, Sec. 3.3): over all
labelled steps of a scope, pooled,

    F1_correct   = 2 TP / (2 TP + FP + FN)   with "correct" as the positive class,
    F1_incorrect = 2 TN / (2 TN + FN + FP)   with "incorrect" as the positive class,
    macro_F1     = (F1_correct + F1_incorrect) / 2,

where TP = correct steps predicted correct, TN = incorrect steps predicted incorrect,
FP = incorrect steps predicted correct, FN = correct steps predicted incorrect. An F1
whose denominator is 0 is 0 (scikit-learn's ``zero_division=0``).

First-error step (ProcessBench style): per chain with at least one labelled step, the
gold first error is the first step labelled 0 (or "none"), the predicted one is the
first labelled step predicted incorrect (or "none"). Reported: accuracy over all
chains, over chains with an error, over error-free chains, and the harmonic mean of
the last two (ProcessBench's F1). Undefined values (no chain of a kind) are None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["first_error_metrics", "step_f1", "step_metrics"]


def _probs(step_logits: np.ndarray) -> np.ndarray:
    z = np.asarray(step_logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))                 # sigmoid, stable


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def step_f1(step_logits, step_labels, *, threshold: float = 0.5) -> dict[str, Any]:
    """VisualProcessBench macro-F1 over all labelled steps (labels -1 are ignored).

    Args: step_logits [..., S] and step_labels [..., S] (1 / 0 / -1) of equal shape.
    """
    z = np.asarray(step_logits, dtype=np.float64)
    y = np.asarray(step_labels)
    if z.shape != y.shape:
        raise ValueError(f"step_f1: step_logits shape {z.shape} != step_labels shape {y.shape}")
    labelled = y >= 0
    pred = _probs(z) >= threshold                          # predicted correct
    gold = y == 1
    tp = int((labelled & gold & pred).sum())
    tn = int((labelled & ~gold & ~pred).sum())
    fp = int((labelled & ~gold & pred).sum())
    fn = int((labelled & gold & ~pred).sum())
    f1_correct = _f1(tp, fp, fn)
    f1_incorrect = _f1(tn, fn, fp)
    return {"num_steps": int(labelled.sum()), "tp": tp, "tn": tn, "fp": fp, "fn": fn,
            "f1_correct": f1_correct, "f1_incorrect": f1_incorrect,
            "macro_f1": (f1_correct + f1_incorrect) / 2.0}


def first_error_metrics(step_logits, step_labels, *, threshold: float = 0.5) -> dict[str, Any]:
    """First-error step accuracy over chains [..., S] (module docstring)."""
    z = np.asarray(step_logits, dtype=np.float64).reshape(-1, np.shape(step_logits)[-1])   # [C, S]
    y = np.asarray(step_labels).reshape(z.shape)                                             # [C, S]
    S = z.shape[-1]
    labelled = y >= 0
    has_label = labelled.any(-1)                                                             # [C]
    gold_err = labelled & (y == 0)
    pred_err = labelled & (_probs(z) < threshold)
    none = S  # "no error" sentinel

    def first(mask):
        return np.where(mask.any(-1), np.argmax(mask, axis=-1), none)                        # [C]

    gold_first, pred_first = first(gold_err), first(pred_err)
    hit = (gold_first == pred_first)[has_label]
    erroneous = (gold_first != none)[has_label]

    def mean_or_none(x):
        return float(x.mean()) if x.size else None

    acc_err, acc_ok = mean_or_none(hit[erroneous]), mean_or_none(hit[~erroneous])
    hm = None
    if acc_err is not None and acc_ok is not None:
        hm = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"num_chains": int(hit.size), "num_erroneous": int(erroneous.sum()),
            "accuracy": mean_or_none(hit), "accuracy_erroneous": acc_err,
            "accuracy_correct": acc_ok, "harmonic_mean": hm}


def step_metrics(step_logits, step_labels, *, benchmarks: Sequence[str] | None = None,
                 threshold: float = 0.5) -> dict[str, Any]:
    """Both metrics per benchmark and overall (pooled over all chains).

    Args:
      step_logits: [Q, N, S] PRM step logits (padding entries are ignored through labels).
      step_labels: [Q, N, S] 1 / 0 / -1 (see :func:`scoring.step_label_array`).
      benchmarks: [Q] benchmark of each question (None: overall only).
    """
    z = np.asarray(step_logits, dtype=np.float64)
    y = np.asarray(step_labels)
    if z.shape != y.shape or z.ndim != 3:
        raise ValueError(f"step_metrics: expected step_logits and step_labels of one shape "
                         f"[Q, N, S], got {z.shape} and {y.shape}")

    def scope(sel):
        return {"step_f1": step_f1(z[sel], y[sel], threshold=threshold),
                "first_error": first_error_metrics(z[sel], y[sel], threshold=threshold)}

    out: dict[str, Any] = {"threshold": threshold, "per_benchmark": {}}
    if benchmarks is not None:
        if len(benchmarks) != z.shape[0]:
            raise ValueError(f"step_metrics: {len(benchmarks)} benchmarks for {z.shape[0]} questions")
        names = np.asarray(benchmarks)
        for b in sorted(set(benchmarks)):
            sel = names == b
            if (y[sel] >= 0).any():
                out["per_benchmark"][b] = scope(sel)
    out["overall"] = scope(np.ones(z.shape[0], dtype=bool))
    return out
