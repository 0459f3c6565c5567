"""Bi-level engine of DreamPRM: domain and instance weights, losses, the unrolled inner loop and
hypergradient methods (exact through the unroll, and the approximations beside it).

The engine never sees a model: only ``inner_loss(params, alpha, batch)``,
``outer_loss(params, batch)``, an optax optimizer and pytrees.
"""

from dreamprm_jax.bilevel.domain_weights import domain_weights, init_raw_weights, sample_weights
from dreamprm_jax.bilevel.instance_net import init_instance_net, instance_net_weights
from dreamprm_jax.bilevel.instance_weights import (DEFAULT_MAX_WEIGHT, INSTANCE_NORMALIZATIONS,
                                                   init_raw_instance_weights, instance_weights, normalize_row_weights,
                                                   record_weights)
from dreamprm_jax.bilevel.losses import (CHAIN_REDUCTIONS, META_LOSSES, aggregation_loss, chain_scores, listwise_loss,
                                         meta_loss, normalized_pairwise_loss, pairwise_loss, sample_weighted_mse,
                                         weighted_mse)
from dreamprm_jax.bilevel.inner import inner_adamw, inner_step, num_steps, step_lr, unroll
from dreamprm_jax.bilevel.hypergradient import EXACT_METHODS, METHODS, hypergradient, register_method
from dreamprm_jax.bilevel.implicit import implicit_hypergradient

__all__ = [
    "domain_weights",
    "init_raw_weights",
    "sample_weights",
    "DEFAULT_MAX_WEIGHT",
    "init_raw_instance_weights",
    "instance_weights",
    "record_weights",
    "INSTANCE_NORMALIZATIONS",
    "normalize_row_weights",
    "init_instance_net",
    "instance_net_weights",
    "weighted_mse",
    "sample_weighted_mse",
    "aggregation_loss",
    "chain_scores",
    "CHAIN_REDUCTIONS",
    "META_LOSSES",
    "meta_loss",
    "listwise_loss",
    "pairwise_loss",
    "normalized_pairwise_loss",
    "inner_adamw",
    "step_lr",
    "inner_step",
    "unroll",
    "num_steps",
    "hypergradient",
    "METHODS",
    "EXACT_METHODS",
    "register_method",
    "implicit_hypergradient",
]
