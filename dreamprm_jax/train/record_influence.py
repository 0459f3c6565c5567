"""Each training record's first-order influence on a meta loss, at a trained PRM.

Raising record ``i``'s weight by ``dw`` moves a gradient step on the PRM by
``-lr dw grad l_i`` (``l_i = (p_i - y_i)^2``), which changes the meta loss by
``-lr dw grad L_meta . grad l_i``. So

    influence_i = grad L_meta(phi) . grad l_i(phi)                                       (1)

(positive: training on the record also lowers the meta loss) is, up to the optimizer's
preconditioning and the unroll, the hypergradient an instance table entry receives at
``phi``, for every record at once and with nothing trained: what a meta loss can tell the
table about each record. ``grad L_meta`` is averaged over meta batches drawn as training
draws them; (1) for a whole batch of records is one forward-mode derivative of the per-record
losses along it (``jax.jvp``), about the cost of two forward passes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train.record_losses import map_records

__all__ = ["meta_gradient", "record_influence", "export_record_influence"]


def meta_gradient(model_config, params, outer_loss: Callable, meta_builder, meta_sampler, num_batches: int):
    """``grad L_meta`` at ``params`` (a pytree like it), the mean over ``num_batches`` meta batches
    from ``meta_sampler`` (advanced); ``outer_loss(params, MetaBatch)`` as
    :func:`dreamprm_jax.train.step.make_losses` builds it."""
    if num_batches < 1:
        raise ValueError(f"meta_gradient: expected num_batches >= 1, got {num_batches}")

    @jax.jit
    def one(p, batch):
        batch = batch.replace(inputs=qwen2_vl.with_rope_tables(model_config, batch.inputs))
        return jax.grad(outer_loss)(p, batch)

    total = None
    for _ in range(num_batches):
        batch, _ = meta_builder.meta_batch(meta_sampler.next())
        g = one(params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda x: x / num_batches, total)


@functools.partial(jax.jit, static_argnums=0)
def _loss_derivatives(model_config, params, direction, batch):
    """``[B]``: each row's ``grad (p_i - y_i)^2 . direction`` (one forward-mode pass)."""
    inputs = qwen2_vl.with_rope_tables(model_config, batch.inputs)

    def losses(q):
        probs, _ = prm.score(model_config, q, inputs)  # [B]
        return jnp.square(probs - batch.labels)  # [B]

    return jax.jvp(losses, (params,), (direction,))[1]  # [B]


def record_influence(model_config, params, direction, train_table, train_builder, batch_size: int) -> np.ndarray:
    """``[N]`` float64: ``grad l_i(params) . direction`` for every record of ``train_table``
    (equation (1) with ``direction = grad L_meta``), in batches of ``batch_size``."""
    return map_records(lambda batch: _loss_derivatives(model_config, params, direction, batch), train_table,
                       train_builder, batch_size, dtype=np.float64)


def export_record_influence(export_dir: str, cfg, data, meta_losses, num_meta_batches: int = 32,
                            progress: bool = False) -> dict[str, dict[str, float]]:
    """``{meta loss: {record key: influence}}`` of ``data``'s training records under the PRM
    exported to ``export_dir``, for each name in ``meta_losses`` (``cfg.aggregation`` scores
    the meta chains; each loss draws its meta batches from a fresh sampler of ``cfg.seed``)."""
    from tqdm.auto import tqdm

    from dreamprm_jax import bilevel
    from dreamprm_jax.train import loop
    from dreamprm_jax.train import step as step_lib

    unknown = [m for m in meta_losses if m not in bilevel.META_LOSSES]
    if unknown:
        raise ValueError(f"export_record_influence: unknown meta loss(es) {unknown}; expected names among "
                         f"{bilevel.META_LOSSES}")
    model = loop.load_model(export_dir, cfg)
    out = {}
    for name in tqdm(meta_losses, desc="meta losses", disable=not progress):
        run_cfg = dataclasses.replace(cfg, meta_loss=name)
        sources = loop.build_batch_sources(run_cfg, model.config, model.processor, data)  # ranking losses: questions
        _, outer_loss = step_lib.make_losses(model.config, run_cfg.aggregation, name)
        direction = meta_gradient(model.config, model.params, outer_loss, sources.meta_builder, sources.meta_sampler,
                                  num_meta_batches)
        values = record_influence(model.config, model.params, direction, sources.train_table, sources.train_builder,
                                  run_cfg.train_batch_size)
        out[name] = dict(zip(sources.train_table.record_keys(), values.tolist()))
    return out
