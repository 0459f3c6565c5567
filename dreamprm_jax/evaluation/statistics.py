"""Rank statistics of small samples (e.g. learned domain weights against known qualities)."""

from __future__ import annotations

import numpy as np


def ranks(values) -> np.ndarray:
    """0-based ranks [n] of ``values`` [n], ties given their average rank."""
    a = np.asarray(values, np.float64)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for v in np.unique(a):
        tie = a == v
        r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float:
    """Spearman rank correlation of ``x`` [n] and ``y`` [n]: the Pearson correlation of their
    ranks (average ranks for ties); NaN when either is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")
