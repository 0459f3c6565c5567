"""Chain scores from step scores.

Every aggregation maps step logits ``z`` (pre-sigmoid, so ``z = log(p / (1 - p))`` with
``p`` the step's probability of being correct) and a step mask to one score per chain::

    fn(step_logits [..., S], step_mask [..., S]) -> scores [...]   (float64)

Only masked-in steps count. A chain with no step (all-False mask) scores ``-inf`` so
it is never preferred. Scores are only compared within one method (argmax), so their
scales need not agree.

=============  ==========================================  ============================
name           score                                        note
=============  ==========================================  ============================
``mean``       (1/S) sum_s z_s                             DreamPRM reference code
``sum``        sum_s z_s                                   the paper's formula
``min``        min_s z_s  (= logit of min_s p_s)           weakest step
``max``        max_s z_s
``log_prod``   sum_s log p_s = -sum_s log(1 + exp(-z_s))   product of probabilities, in
                                                           log space (stable for any z)
``last``       z_S (last masked-in step)                   outcome-like
``mean_prob``  (1/S) sum_s sigmoid(z_s)                    VisualPRM's default
=============  ==========================================  ============================

New aggregations register by name (:func:`register_aggregation`) and are then usable
wherever a name is accepted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "aggregation_names",
    "last_logit",
    "log_prod_prob",
    "max_logit",
    "mean_logit",
    "mean_prob",
    "min_logit",
    "register_aggregation",
    "sum_logit",
]

Aggregation = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _prepare(step_logits, step_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.asarray(step_logits, dtype=np.float64)           # [..., S]
    m = np.asarray(step_mask).astype(bool)                  # [..., S]
    if z.shape != m.shape:
        raise ValueError(f"aggregation: step_logits shape {z.shape} != step_mask shape {m.shape}")
    if np.isnan(z[m]).any():
        raise ValueError("aggregation: NaN step logit at a masked-in step; expected finite logits")
    empty = ~m.any(axis=-1)                                 # [...]
    return z, m, empty


def _finish(score: np.ndarray, empty: np.ndarray) -> np.ndarray:
    return np.where(empty, -np.inf, score)


def mean_logit(step_logits, step_mask) -> np.ndarray:
    """(1/S) sum_s z_s over masked-in steps (DreamPRM's reference aggregation)."""
    z, m, empty = _prepare(step_logits, step_mask)
    count = np.maximum(m.sum(-1), 1)
    return _finish(np.where(m, z, 0.0).sum(-1) / count, empty)


def sum_logit(step_logits, step_mask) -> np.ndarray:
    """sum_s z_s over masked-in steps (the formula of the DreamPRM paper)."""
    z, m, empty = _prepare(step_logits, step_mask)
    return _finish(np.where(m, z, 0.0).sum(-1), empty)


def min_logit(step_logits, step_mask) -> np.ndarray:
    """min_s z_s; sigmoid is monotone so this ranks chains like min_s p_s."""
    z, m, empty = _prepare(step_logits, step_mask)
    return _finish(np.where(m, z, np.inf).min(-1), empty)


def max_logit(step_logits, step_mask) -> np.ndarray:
    """max_s z_s."""
    z, m, empty = _prepare(step_logits, step_mask)
    return _finish(np.where(m, z, -np.inf).max(-1), empty)


def log_prod_prob(step_logits, step_mask) -> np.ndarray:
    """log prod_s p_s = sum_s log sigmoid(z_s) = -sum_s logaddexp(0, -z_s) (no underflow)."""
    z, m, empty = _prepare(step_logits, step_mask)
    return _finish(np.where(m, -np.logaddexp(0.0, -z), 0.0).sum(-1), empty)


def last_logit(step_logits, step_mask) -> np.ndarray:
    """z at the last masked-in step."""
    z, m, empty = _prepare(step_logits, step_mask)
    S = m.shape[-1]
    last = S - 1 - np.argmax(m[..., ::-1], axis=-1)          # [...]
    return _finish(np.take_along_axis(z, last[..., None], axis=-1)[..., 0], empty)


def mean_prob(step_logits, step_mask) -> np.ndarray:
    """(1/S) sum_s sigmoid(z_s), with sigmoid(z) = exp(-logaddexp(0, -z)) (stable)."""
    z, m, empty = _prepare(step_logits, step_mask)
    p = np.exp(-np.logaddexp(0.0, -z))
    count = np.maximum(m.sum(-1), 1)
    return _finish(np.where(m, p, 0.0).sum(-1) / count, empty)


AGGREGATIONS: dict[str, Aggregation] = {
    "mean": mean_logit,
    "sum": sum_logit,
    "min": min_logit,
    "max": max_logit,
    "log_prod": log_prod_prob,
    "last": last_logit,
    "mean_prob": mean_prob,
}


def register_aggregation(name: str, fn: Aggregation, *, overwrite: bool = False) -> Aggregation:
    """Add ``fn(step_logits [..., S], step_mask [..., S]) -> [...]`` under ``name``."""
    if name in AGGREGATIONS and not overwrite:
        raise ValueError(f"register_aggregation: {name!r} already registered; pass overwrite=True")
    AGGREGATIONS[name] = fn
    return fn


def aggregation_names() -> tuple[str, ...]:
    return tuple(AGGREGATIONS)


def aggregate(name: str, step_logits, step_mask) -> np.ndarray:
    """Apply the aggregation registered as ``name``; scores [...] in float64."""
    try:
        fn = AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"aggregate: unknown aggregation {name!r}; expected one of "
                         f"{sorted(AGGREGATIONS)}") from None
    return np.asarray(fn(step_logits, step_mask), dtype=np.float64)
