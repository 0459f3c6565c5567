"""Instance weights (DreamPRM-1.5, Cao and Xie, arXiv 2509.05542): one learned weight per
training record instead of one per domain.

The upper-level variable of the *instance table* is a raw vector ``r in R^N`` (one entry per
training record); record ``i`` weighs

    w_i = w_max * sigmoid(r_i),        0 < w_i < w_max                           (1)

in the lower-level loss ``sum_i m_i w_i (p_i - y_i)^2 / sum_i m_i``
(:func:`~dreamprm_jax.bilevel.losses.sample_weighted_mse`, the loss domain weighting uses
too). Why this bound rather than the domains' ``softplus(r) / mean(softplus(r))``:

* a mean over N records would couple every weight to every other one, so a batch's loss
  would depend on all N entries and each hypergradient would touch all of them; (1) keeps
  record ``i``'s weight a function of ``r_i`` alone, and the hypergradient of a batch is
  non-zero only on the records it holds;
* the bound ``w_max`` keeps one record from taking over the batch (a sample weight that can
  grow without limit multiplies the inner learning rate of that record), and the sigmoid
  keeps ``w_i > 0``, so a record is never trained *against* its label;
* ``r = logit(1 / w_max)`` gives ``w = 1`` for every record (the cold start is the unweighted
  PRM); with the default ``w_max = 2`` that is ``r = 0``, and the meta optimizer's weight
  decay then pulls every weight back towards 1.

``w_max > 1`` is required: the cold start must lie inside the range.

Normalisation within a batch (:func:`normalize_row_weights`, ``--instance-normalize``).
A weight that raises every record with a high label (or every one with a low label) moves
the PRM's scores up (or down) as a whole, and a meta loss that rewards such a shift (the
chain MSE rewards calibration, a ranking loss a wider margin over blatant errors) then
pushes weights by the *value* of the label rather than by whether it is right. Dividing
each row's weight by the mean weight of its batch's rows on the same side of 0.5
(``"label"``) keeps the batch's mean weight of each label group at 1: the weights can
choose which records of a group to trust but not how much the high labels count against the
low ones, and the hypergradient of a group's common shift is zero. ``"batch"`` divides by
the mean over the whole batch (learning to reweight's normalisation), ``"none"`` leaves the
weights as they are (the default).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_MAX_WEIGHT", "INSTANCE_NORMALIZATIONS", "check_max_weight", "uniform_logit", "bounded_weights",
           "init_raw_instance_weights", "instance_weights", "record_weights", "normalize_row_weights"]

#: The default upper bound ``w_max`` of an instance weight.
DEFAULT_MAX_WEIGHT = 2.0

#: How a batch's instance weights are normalised (module docstring): not at all, by their
#: mean over the batch, or by their mean over the rows whose label is on the same side of 0.5.
INSTANCE_NORMALIZATIONS = ("none", "batch", "label")

#: Labels at or above this are the "high" group of ``normalize_row_weights(how="label")``.
LABEL_GROUP_THRESHOLD = 0.5


def check_max_weight(max_weight: float) -> float:
    """``max_weight`` as a float, or ``ValueError`` unless it is finite and > 1."""
    if not (math.isfinite(max_weight) and max_weight > 1.0):
        raise ValueError(f"instance weights: max_weight must be a finite number > 1 (the cold start w = 1 lies "
                         f"inside (0, max_weight)), got {max_weight!r}")
    return float(max_weight)


def uniform_logit(max_weight: float = DEFAULT_MAX_WEIGHT) -> float:
    """The raw value with weight 1: ``logit(1 / w_max) = -log(w_max - 1)`` (0 for ``w_max = 2``)."""
    return -math.log(check_max_weight(max_weight) - 1.0)


def bounded_weights(raw: jax.Array, max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """Equation (1) elementwise: ``w_max * sigmoid(raw)``, in ``(0, w_max)`` for every finite
    ``raw`` (``0`` and ``w_max`` themselves only where float rounding saturates the sigmoid)."""
    return max_weight * jax.nn.sigmoid(raw)


def init_raw_instance_weights(num_records: int, max_weight: float = DEFAULT_MAX_WEIGHT,
                              dtype=jnp.float32) -> jax.Array:
    """Raw table ``[num_records]`` with every weight 1 (uniform: the cold start)."""
    if num_records < 1:
        raise ValueError(f"instance_weights.init_raw_instance_weights: num_records must be >= 1, got {num_records}")
    return jnp.full((num_records,), uniform_logit(max_weight), dtype)


def instance_weights(raw: jax.Array, max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """The table's weights, equation (1): ``[N]`` raw -> ``[N]`` weights in ``(0, max_weight)``."""
    return bounded_weights(raw, max_weight)


def record_weights(raw: jax.Array, record_ids: jax.Array, max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """Per-row weights ``w[record_ids]`` (a gather; any shape of ``record_ids``).

    Only the gathered entries are computed, so the gradient reaches ``raw`` at those records
    alone (a scatter-add of ``[B]`` values, not an ``[N]`` dense map per row).
    """
    return bounded_weights(jnp.take(raw, record_ids, axis=0), max_weight)


def normalize_row_weights(weights: jax.Array, labels: jax.Array, mask: jax.Array, how: str = "none") -> jax.Array:
    """Row weights ``[..., B]`` divided by their group's masked mean over the last axis.

    ``how``: ``"none"`` (returned unchanged), ``"batch"`` (one group: the batch) or
    ``"label"`` (two groups: ``labels >= 0.5`` and the rest). ``labels`` and ``mask``
    (1 = a real row) are ``[..., B]``. A group's real rows then average 1; padded rows keep
    their weight (the loss masks them), and a group with no real row divides by nothing.
    The gradient flows through the means, so the derivative of a group's common shift is 0.
    """
    if how not in INSTANCE_NORMALIZATIONS:
        raise ValueError(f"normalize_row_weights: how must be one of {INSTANCE_NORMALIZATIONS}, got {how!r}")
    if how == "none":
        return weights
    m = mask.astype(weights.dtype)  # [..., B]
    if how == "batch":
        high = jnp.ones(weights.shape, bool)  # [..., B]
    else:
        high = labels.astype(jnp.float32) >= LABEL_GROUP_THRESHOLD  # [..., B]
    mean_by_group = []
    for group in (high, ~high):
        g = m * group.astype(weights.dtype)  # [..., B]
        count = jnp.sum(g, axis=-1, keepdims=True)  # [..., 1]
        total = jnp.sum(g * weights, axis=-1, keepdims=True)  # [..., 1]
        mean_by_group.append(jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 1.0))  # [..., 1]
    mean = jnp.where(high, mean_by_group[0], mean_by_group[1])  # [..., B]
    return jnp.where(m > 0, weights / mean, weights)
