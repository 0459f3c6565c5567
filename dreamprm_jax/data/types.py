"""Typed batches of DreamPRM's two levels, registered as pytrees.

* :class:`TrainBatch`: ``B`` step records of the lower level (weighted MSE against the
  Monte-Carlo accuracy of each step).
* :class:`MetaBatch`: ``M`` chains of ``S`` steps of the upper level (the chain's aggregated
  step log-odds against its label).

Both carry the model's :class:`~dreamprm_jax.models.qwen2_vl.inputs.ModelInputs` beside the
level's targets and masks. ``T`` batches stacked for one iteration carry a leading ``[T, ...]``
axis on every array. Fields name their row axis (``row_axis``), from which the trainer
derives how a batch is split over devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from dreamprm_jax.models.qwen2_vl.inputs import BATCH_ROWS, ModelInputs, row_axis, rows_field

__all__ = ["ModelInputs", "TrainBatch", "MetaBatch", "row_axis"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """A training batch of ``B`` rows (dummy rows fill a short batch; ``sample_mask`` zeroes them).

    ``record_ids`` index the training table (row ``i`` of a training table is record ``i`` of
    its file's validated records), so the instance weights' table can be gathered per row;
    dummy rows hold 0 and are masked. ``record_loss`` is each row's squared error under the
    parameters at the start of a bi-level iteration, the Instance Net's feature: filled
    inside the iteration (``None`` in the host batches).
    """

    inputs: ModelInputs  # B rows
    labels: Any = rows_field(BATCH_ROWS)  # [B] float32, Monte-Carlo step accuracy in [0, 1]
    domain_ids: Any = rows_field(BATCH_ROWS)  # [B] int32, index into the domain weights
    sample_mask: Any = rows_field(BATCH_ROWS)  # [B] float32, 1 = real row, 0 = dummy row
    record_ids: Any = rows_field(BATCH_ROWS, default=None)  # [B] int32, index into the training table | None
    record_loss: Any = rows_field(BATCH_ROWS, default=None)  # [B] float32, (p_i - y_i)^2 at phi_0 | None

    def replace(self, **fields) -> "TrainBatch":
        return dataclasses.replace(self, **fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MetaBatch:
    """A meta batch of ``M`` chains x ``S`` steps.

    ``inputs`` holds ``M * S`` step-prefix rows, chain-major (row ``m * S + s`` is step
    ``s + 1`` of chain ``m``), or ``M`` packed rows with ``branch_ids`` and ``score_index``
    ``[M, S]``; either way the model scores ``M * S`` steps. ``question_index`` groups the
    chains by question (equal for the candidates of one question) for the ranking meta
    losses; ``None`` in batches built without it.
    """

    inputs: ModelInputs  # M * S rows, or M packed rows
    step_mask: Any = rows_field(BATCH_ROWS)  # [M, S] float32, 1 = a real step of the chain
    labels: Any = rows_field(BATCH_ROWS)  # [M] float32, 1 = the chain's final answer is correct
    chain_mask: Any = rows_field(BATCH_ROWS)  # [M] float32, 1 = real chain, 0 = dummy chain
    question_index: Any = rows_field(BATCH_ROWS, default=None)  # [M] int32, the chain's question (-1: dummy) | None

    def replace(self, **fields) -> "MetaBatch":
        return dataclasses.replace(self, **fields)
