"""Domain weights of DreamPRM: positive, mean-one reweighting of the training domains.

The upper-level variable is a raw vector ``r in R^K`` (one entry per domain). The weights
actually used in the lower-level loss are

    w = softplus(r) / mean(softplus(r))                                   (1)

so ``w > 0`` and ``mean(w) == 1`` for every ``r``: the overall scale of the inner loss
(and therefore the effective inner learning rate) cannot drift, only the balance between
domains. ``r`` starts at 0, which gives ``w == 1`` (uniform weighting).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["init_raw_weights", "domain_weights", "sample_weights"]


def init_raw_weights(num_domains: int, dtype=jnp.float32) -> jax.Array:
    """Raw weights ``r = 0`` of shape ``[num_domains]`` (uniform domain weights)."""
    if num_domains < 1:
        raise ValueError(f"domain_weights.init_raw_weights: num_domains must be >= 1, got {num_domains}")
    return jnp.zeros((num_domains,), dtype)


def domain_weights(raw: jax.Array) -> jax.Array:
    """Normalised domain weights, equation (1): ``softplus(r) / mean(softplus(r))``.

    Args:
      raw: ``[K]`` raw (unconstrained) weights.

    Returns:
      ``[K]`` positive weights with mean exactly one (up to rounding).
    """
    sp = jax.nn.softplus(raw)  # [K]
    return sp / jnp.mean(sp)


def sample_weights(raw: jax.Array, domain_ids: jax.Array) -> jax.Array:
    """Per-sample weights ``w[d_i]`` for integer ``domain_ids`` of any shape (gather, no loop)."""
    return jnp.take(domain_weights(raw), domain_ids, axis=0)
