"""What the model reads: :class:`ModelInputs`, a typed pytree built on the host by ``prepare_batch``.

Every field is an array (numpy on the host, ``jax.Array`` or tracer inside jit) or ``None``
when the batch does not carry it; ``None`` fields are empty subtrees, so a batch without
images and one with image slots are different pytree structures (and different programs).
Stacked batches (the ``T`` inner batches of one iteration) carry a leading ``[T, ...]`` axis
on every field.

Each field's metadata names the axis that indexes its rows, for code that splits a batch
over devices without knowing the model (:func:`row_axis`): ``("batch", d)`` for per-row
fields (``d`` is that field's batch axis), ``("patches", 0)`` for the image-patch rows,
which are global to the batch (the model fills the ``<|image_pad|>`` tokens of all rows, in
row-major order, from one concatenation of every image's patches).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

__all__ = ["ModelInputs", "ROPE_FIELDS", "BATCH_ROWS", "PATCH_ROWS", "rows_field", "row_axis"]

#: ``row_axis`` kinds: rows of the batch (one per sequence) and image-patch rows.
BATCH_ROWS, PATCH_ROWS = "batch", "patches"
#: Fields added by ``with_rope_tables``.
ROPE_FIELDS = ("rope_cos", "rope_sin", "vision_rope_cos", "vision_rope_sin")


def rows_field(kind: str, axis: int = 0, default: Any = dataclasses.MISSING):
    """A dataclass field whose rows lie along ``axis`` (before any stacking axis) and are of ``kind``."""
    return dataclasses.field(default=default, metadata={"rows": (kind, axis)})


def row_axis(field: dataclasses.Field) -> tuple[str, int] | None:
    """``(kind, axis)`` of a batch structure's field (``None``: a field without rows)."""
    return field.metadata.get("rows")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """A Qwen2-VL batch with static shapes (``prepare_batch``; packed meta rows: ``data.batching``).

    ``B`` rows of ``L`` tokens, ``N`` patch rows of ``D = C * Tp * P * P`` values (the patch
    bucket, padded at the end), ``S`` scored positions per packed row.
    """

    input_ids: Any = rows_field(BATCH_ROWS)  # [B, L] int32
    attention_mask: Any = rows_field(BATCH_ROWS)  # [B, L] int32, 1 = token, 0 = padding
    position_ids: Any = rows_field(BATCH_ROWS, 1)  # [3, B, L] int32, M-RoPE (temporal, height, width)
    pixel_values: Any = rows_field(PATCH_ROWS, default=None)  # [N, D] float32 | None
    vision_position_ids: Any = rows_field(PATCH_ROWS, default=None)  # [N, 2] int32 (row, column) | None
    vision_segment_ids: Any = rows_field(PATCH_ROWS, default=None)  # [N] int32 frame id, -1 = padding | None
    # Packed meta rows (``BatchSpec(pack_chains=True)``): each step's tail attends only to itself.
    branch_ids: Any = rows_field(BATCH_ROWS, default=None)  # [B, L] int32, 0 = shared trunk, k + 1 = tail of prefix k | None
    score_index: Any = rows_field(BATCH_ROWS, default=None)  # [B, S] int32 positions scored per row | None
    # Rotary tables (``with_rope_tables``), computed once per iteration outside the inner scan.
    rope_cos: Any = rows_field(BATCH_ROWS, default=None)  # [B, L, head_dim] float32 | None
    rope_sin: Any = rows_field(BATCH_ROWS, default=None)  # [B, L, head_dim] float32 | None
    vision_rope_cos: Any = rows_field(PATCH_ROWS, default=None)  # [N, vision head_dim] float32 | None
    vision_rope_sin: Any = rows_field(PATCH_ROWS, default=None)  # [N, vision head_dim] float32 | None

    @property
    def has_images(self) -> bool:
        """Whether the batch has image slots (``pixel_values`` and its position / segment ids)."""
        return self.pixel_values is not None

    def replace(self, **fields) -> "ModelInputs":
        return dataclasses.replace(self, **fields)
