"""Instance Net (DreamPRM-1.5, Cao and Xie, arXiv 2509.05542): a small network maps each
training record's features to its weight; its parameters are the upper-level variable.

Features of record ``i`` (row of a training batch):

* ``l_i = (p_i - y_i)^2``, the record's squared error under the PRM at the start of the
  bi-level iteration (``phi_0``; computed before the unroll and held constant through it, so
  the weight of a record does not change between the T inner steps);
* its domain ``d_i``, as a learned embedding (equivalent to a one-hot input).

The network, with ``h`` hidden units and ``K`` domains::

    a_i = tanh(l_i * u + E[d_i] + b)           u, b [h], E [K, h]
    w_i = w_max * sigmoid(a_i . v + c)         v [h], c []                          (1)

so ``0 < w_i < w_max`` as for the instance table (:mod:`instance_weights`). It is initialised
with ``v = 0`` and ``c = logit(1 / w_max)``: every weight is 1 at the start (the unweighted
PRM), while ``u, E`` are drawn at random so that the first hypergradient reaches ``v``
through distinct hidden units.

Why the loss is taken at ``phi_0`` and not inside each inner step: a weight that depended on
``phi_t`` would make the inner update ``sum_i w_i(phi_t) d l_i / d phi``. Stopping the
gradient there (the usual trick) changes what reverse mode differentiates, so the
"exact" hypergradient would no longer be the derivative of the unrolled objective. With
features fixed at ``phi_0``, equation (1) is a function of the upper-level parameters alone
within the unroll, and every method of :func:`~dreamprm_jax.bilevel.hypergradient` computes
the derivative it claims (checked against finite differences in the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamprm_jax.bilevel.instance_weights import DEFAULT_MAX_WEIGHT, bounded_weights, uniform_logit

__all__ = ["DEFAULT_HIDDEN", "init_instance_net", "instance_net_weights"]

#: Hidden units of the default Instance Net.
DEFAULT_HIDDEN = 16


def init_instance_net(key: jax.Array, num_domains: int, hidden: int = DEFAULT_HIDDEN,
                      max_weight: float = DEFAULT_MAX_WEIGHT, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Parameters ``{"loss_in" [h], "domain_embed" [K, h], "bias_in" [h], "out" [h], "bias_out" []}``
    of equation (1), every weight 1 at the start (``out = 0``, ``bias_out = logit(1 / w_max)``)."""
    if num_domains < 1 or hidden < 1:
        raise ValueError(f"instance_net.init_instance_net: expected num_domains >= 1 and hidden >= 1, "
                         f"got {num_domains}, {hidden}")
    k_loss, k_embed = jax.random.split(key)
    return {
        "loss_in": jax.random.normal(k_loss, (hidden,), dtype),
        "domain_embed": 0.5 * jax.random.normal(k_embed, (num_domains, hidden), dtype),
        "bias_in": jnp.zeros((hidden,), dtype),
        "out": jnp.zeros((hidden,), dtype),
        "bias_out": jnp.asarray(uniform_logit(max_weight), dtype),
    }


def instance_net_weights(params: dict[str, jax.Array], losses: jax.Array, domain_ids: jax.Array,
                         max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """Equation (1) for rows of any shape ``[...]``.

    Args:
      params: from :func:`init_instance_net`.
      losses: ``[...]`` each row's squared error ``l_i`` (a constant: no gradient flows into it).
      domain_ids: ``[...]`` int, each row's domain.
      max_weight: ``w_max``.

    Returns:
      ``[...]`` weights in ``(0, max_weight)``.
    """
    losses = jax.lax.stop_gradient(losses).astype(params["loss_in"].dtype)
    pre = (losses[..., None] * params["loss_in"]  # [..., h]
           + jnp.take(params["domain_embed"], domain_ids, axis=0) + params["bias_in"])
    logit = jnp.tanh(pre) @ params["out"] + params["bias_out"]  # [...]
    return bounded_weights(logit, max_weight)
