"""Each training record's squared error ``(p_i - y_i)^2`` under a PRM, and ``record_losses.json``.

The PRM's own disagreement with a record's label is the simplest way to rank labels by
trust (the small-loss heuristic of learning with noisy labels), with no weight learned. The
reweighting study measures it under the vanilla PRM as the baseline a learned instance
weight is set against: an instance weighting that separates wrong labels no better than this
ranking has learned nothing the unweighted PRM did not already say.

``record_losses.json`` is one JSON object, record key -> squared error, in table order (keys
as in ``instance_weights.json``: :func:`dreamprm_jax.data.records.record_keys`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dreamprm_jax.data.jsonfiles import read_number_map, write_number_map
from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train import sharding

__all__ = ["LOSSES_FILE", "map_records", "record_losses", "export_record_losses", "write_record_losses", "read_record_losses",
           "small_loss_weights"]

#: The file name in a run directory.
LOSSES_FILE = "record_losses.json"


@functools.partial(jax.jit, static_argnums=0)
def _squared_errors(model_config, params, batch):
    probs, _ = prm.score(model_config, params, qwen2_vl.with_rope_tables(model_config, batch.inputs))  # [B]
    return jnp.square(probs - batch.labels)  # [B]


def map_records(fn, train_table, train_builder, batch_size: int, mesh=None, dtype=np.float32) -> np.ndarray:
    """``[N]``: ``fn(batch)`` (``[B]``, one value per row) for every record of ``train_table``, in
    order, in batches of ``batch_size``; with a ``mesh`` each batch is placed on it and the values
    are gathered from every host."""
    n = len(train_table.samples)
    values = np.zeros((n,), dtype)  # [N]
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        batch, _ = train_builder.train_batch(rows)
        if mesh is not None:
            batch = sharding.put_batch(batch, mesh, stacked=False)
        out = sharding.to_host(fn(batch), mesh)  # [B]; a mesh only to gather across hosts
        values[rows] = out[: len(rows)]
    return values


def record_losses(model_config, params, train_table, train_builder, batch_size: int, mesh=None) -> np.ndarray:
    """``[N]`` float32: every record of ``train_table`` scored once (batches of ``batch_size``)."""
    return map_records(lambda batch: _squared_errors(model_config, params, batch), train_table, train_builder,
                       batch_size, mesh)


def export_record_losses(export_dir: str, cfg, data) -> dict[str, float]:
    """``{record key: squared error}`` of ``data``'s training records under the PRM exported
    to ``export_dir`` (a run's ``export/``), batched and bucketed as ``cfg`` says."""
    from dreamprm_jax.train import loop

    model = loop.load_model(export_dir, cfg)
    sources = loop.build_batch_sources(cfg, model.config, model.processor, data)
    losses = record_losses(model.config, model.params, sources.train_table, sources.train_builder,
                           cfg.train_batch_size)
    return {k: float(v) for k, v in zip(sources.train_table.record_keys(), losses)}


def write_record_losses(out_dir: str, losses: dict[str, float]) -> str:
    """``out_dir/record_losses.json`` (written to a temporary file and renamed)."""
    return write_number_map(os.path.join(out_dir, LOSSES_FILE), losses)


def read_record_losses(path: str) -> dict[str, float]:
    """``{record key: squared error}`` from a ``record_losses.json``."""
    return read_number_map(path, "{record key: squared error}")


def small_loss_weights(losses: Mapping[str, float], max_weight: float = 2.0) -> dict[str, float]:
    """Fixed per-record weights from a PRM's losses, no weight learned: the small-loss heuristic
    as a weighting, to set a learned instance weighting against.

        w_i = max_weight * (1 - (rank_i + 1/2) / N),   rank_i = the position of loss_i in ascending order

    so the record with the smallest loss weighs almost ``max_weight``, the largest almost 0, and
    the weights are spread evenly in between, with mean ``max_weight / 2`` (1 at the default
    range); equal losses share their mean rank. Rank-based, so it needs no threshold and no
    guess of the noise rate.
    """
    keys = list(losses)
    loss = np.array([float(losses[k]) for k in keys], np.float64)  # [N]
    if not np.all(np.isfinite(loss)):
        raise ValueError("small_loss_weights: expected finite losses")
    order = np.argsort(loss, kind="stable")
    rank = np.empty(len(keys), np.float64)
    rank[order] = np.arange(len(keys), dtype=np.float64)  # [N]
    _, group, count = np.unique(loss, return_inverse=True, return_counts=True)
    rank = (np.bincount(group, weights=rank) / count)[group]  # ties: their mean rank
    weights = max_weight * (1.0 - (rank + 0.5) / len(keys))  # [N], in (0, max_weight)
    return dict(zip(keys, weights.tolist()))
