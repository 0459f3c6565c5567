"""Uncertainty for best-of-N comparisons: paired bootstrap CIs, AUROCs, rank correlation.

A best-of-N accuracy difference between two PRMs is *paired*: both pick from the same
candidates of the same questions, so the noise that matters is which questions were
drawn, not the variance of either accuracy alone. :func:`paired_bootstrap` resamples
questions (with replacement, within each seed's test set) and recomputes the difference
of means; pooled over seeds, each seed's test set is resampled on its own and the seed
means are averaged, so a seed with more questions does not dominate and the interval
covers question sampling within the seeds run (seed-to-seed variation of *training* shows
in the per-seed rows, which a report prints beside the pooled one).

Rank correlation of learned weights with planted quality: for K domains, Spearman's rho
has an exact permutation distribution over the K! orderings; :func:`spearman_permutation_p`
enumerates it (K <= 8) or samples it. For K = 6 the one-sided 5 % critical value is 0.829.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "PairedDiff",
    "paired_bootstrap",
    "auroc",
    "within_question_auroc",
    "spearman",
    "spearman_permutation_p",
]


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    """Mean of per-question differences (arm minus baseline) and its bootstrap interval."""

    diff: float
    ci95: tuple[float, float]
    num_questions: int
    num_resamples: int

    def to_dict(self) -> dict:
        return {"diff": self.diff, "ci95": list(self.ci95), "num_questions": self.num_questions,
                "num_resamples": self.num_resamples}


def paired_bootstrap(differences: Sequence[np.ndarray], *, num_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> PairedDiff:
    """Percentile bootstrap of the mean paired difference, pooled over seeds.

    ``differences[s]``: [Q_s] per-question differences of seed s (e.g. ``hit_arm - hit_base``
    in {-1, 0, 1}). The statistic is the mean over seeds of each seed's mean difference; a
    resample draws Q_s questions with replacement from each seed independently.
    """
    groups = [np.asarray(d, np.float64).reshape(-1) for d in differences]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("paired_bootstrap: expected at least one seed, each with at least one question")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    stats = np.zeros(num_resamples)                                     # [R]
    for g in groups:
        idx = rng.integers(0, g.size, size=(num_resamples, g.size))   # [R, Q_s]
        stats += g[idx].mean(axis=1)
    stats /= len(groups)
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    point = float(np.mean([g.mean() for g in groups]))
    return PairedDiff(point, (float(lo), float(hi)), int(sum(g.size for g in groups)), num_resamples)


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    NaN when either class is empty.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, bool).reshape(-1)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # Mann-Whitney U from average ranks (ties -> average rank, i.e. count 1/2).
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def within_question_auroc(scores: np.ndarray, correct: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over questions with a correct and a wrong candidate of the AUROC among that
    question's candidates: how well the scores order one question's chains, which is all
    that best-of-N selection uses. ``scores``, ``correct``, ``mask``: [Q, N]."""
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    mask = np.ones_like(correct) if mask is None else np.asarray(mask, bool)
    values = []
    for s, c, m in zip(scores, correct, mask):
        if (c & m).any() and (~c & m).any():
            values.append(auroc(s[m], c[m]))
    return float(np.mean(values)) if values else float("nan")


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size)
    ranks[order] = np.arange(1, a.size + 1)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    rx = _average_ranks(np.asarray(x, np.float64).reshape(-1))
    ry = _average_ranks(np.asarray(y, np.float64).reshape(-1))
    if rx.size != ry.size:
        raise ValueError(f"spearman: expected equal lengths, got {rx.size} and {ry.size}")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def spearman_permutation_p(x, y, *, exact_up_to: int = 8, num_samples: int = 20000, seed: int = 0) -> float:
    """One-sided p-value of Spearman's rho >= observed under random orderings of ``y``.

    Exact (all K! permutations) for K <= ``exact_up_to``, else Monte Carlo. NaN when rho is.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    observed = spearman(x, y)
    if math.isnan(observed):
        return float("nan")
    if x.size <= exact_up_to:
        perms = itertools.permutations(range(x.size))
        values = np.array([spearman(x, y[list(p)]) for p in perms])
    else:
        rng = np.random.default_rng(seed)
        values = np.array([spearman(x, rng.permutation(y)) for _ in range(num_samples)])
    return float(np.mean(values >= observed - 1e-12))
