"""Qwen2VLForConditionalGeneration as pure functions: host batch preparation, init, forward.

The forward pass, for a batch prepared on the host by ``prepare_batch``:

1. ``x = embed_tokens[input_ids]``                                   ``[B, L, H]``
2. if the batch has image slots: ``f = encode_images(pixel_values)`` ``[N / m^2, H]`` and the
   ``k``-th ``<|image_pad|>`` token of the batch (row-major over ``input_ids``) takes ``f[k]``:
   ``rank = cumsum(input_ids == image_token_id) - 1``, ``x = where(is_image, f[rank], x)``
   (transformers' ``masked_scatter``, with static shapes).
3. the M-RoPE decoder and the final RMSNorm                        ``[B, L, H]``
4. logits ``= x @ embed_tokens^T`` (tied) or ``x @ lm_head``      ``[B, L, V]`` float32.

Every function except ``prepare_batch`` / ``logits`` is jittable with ``config`` static; shapes
come from the batch, so one compilation serves every batch of the same bucket
``(B, L, N)``. Nothing here places arrays on devices.

Parity: float32 logits match transformers' ``Qwen2VLForConditionalGeneration`` (eager
attention) to max |diff| ~5e-6 on CPU (tests/test_qwen2_vl_model.py asserts <= 1e-4). On GPU /
TPU the default float32 matmul precision may use TF32 / bf16 passes; wrap calls in
``jax.default_matmul_precision("highest")`` for reference-grade numbers.

Memory: vision attention is dense over the padded patch bucket (``[heads, N, N]`` float32
scores, block-diagonal by mask), text attention dense over ``[B, heads, L, L]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen2VLConfig
from .convert import param_shapes
from .inputs import ModelInputs
from .rope import _grids, rope_index, vision_position_ids, vision_segment_ids
from .text import accum_dtype, compute_dtype, decoder, mrope_cos_sin
from .vision import encode_images, vision_cos_sin

# ---------------------------------------------------------------------- host


def prepare_batch(
    config: Qwen2VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    *,
    num_patches: int | None = None,
) -> ModelInputs:
    """Build the model inputs (numpy, static shapes) from transformers-style inputs.

    Args:
      input_ids: ``[B, L]`` token ids (already padded to the sequence bucket, left or right).
      attention_mask: ``[B, L]``, 1 = token, 0 = padding (None = all tokens).
      pixel_values: ``[n, C*Tp*P*P]`` the processor's patches of all images in batch order,
        or None.
      image_grid_thw: ``[num_images, 3]`` (t, h, w) per image, or None.
      num_patches: the patch bucket ``N >= n`` (a multiple of ``spatial_merge_size ** 2``);
        rows ``n..N-1`` are zero with segment id -1. Given without pixel_values, the batch still
        gets (all-padding) image slots, so text-only and image batches share one compilation.

    Returns:
      :class:`ModelInputs` with ``input_ids [B, L]``, ``attention_mask [B, L]`` and
      ``position_ids [3, B, L]`` (int32) and, with image slots, ``pixel_values [N, D]`` float32,
      ``vision_position_ids [N, 2]`` and ``vision_segment_ids [N]`` int32.

    Raises ValueError when the image tokens, grids and patch rows disagree.
    """
    v = config.vision
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"prepare_batch: input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"prepare_batch: attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    grids = _grids(image_grid_thw)
    n_tokens = int(np.sum(input_ids == config.image_token_id))
    if pixel_values is None and (n_tokens or grids.shape[0]):
        raise ValueError(
            f"prepare_batch: input_ids hold {n_tokens} image tokens / {grids.shape[0]} grids but no pixel_values"
        )
    text = ModelInputs(input_ids=input_ids.astype(np.int32), attention_mask=mask,
                       position_ids=rope_index(config, input_ids, mask, grids))
    if pixel_values is None and num_patches is None:
        return text
    if pixel_values is None:
        pixel_values = np.zeros((0, v.patch_dim), np.float32)
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != v.patch_dim:
        raise ValueError(
            f"prepare_batch: pixel_values has shape {pixel_values.shape}, expected [patches, {v.patch_dim}] "
            f"(C*Tp*P*P = {v.in_channels}*{v.temporal_patch_size}*{v.patch_size}*{v.patch_size})"
        )
    n = pixel_values.shape[0]
    expected_rows = int(np.sum(np.prod(grids, axis=-1))) if grids.size else 0
    if n != expected_rows:
        raise ValueError(f"prepare_batch: pixel_values has {n} rows but image_grid_thw implies {expected_rows}")
    merge = v.spatial_merge_size**2
    if n_tokens * merge != n:
        raise ValueError(
            f"prepare_batch: input_ids hold {n_tokens} image tokens but pixel_values has {n} rows "
            f"(= {n / merge:g} tokens after {v.spatial_merge_size}x{v.spatial_merge_size} merging)"
        )
    total = n if num_patches is None else int(num_patches)
    if total < n or total % merge or total == 0:
        raise ValueError(
            f"prepare_batch: num_patches={total} must be > 0, >= {n} (the real patches) and a multiple of {merge}"
        )
    pad = total - n
    return text.replace(
        pixel_values=np.concatenate([pixel_values, np.zeros((pad, v.patch_dim), np.float32)]),  # [N, D]
        vision_position_ids=np.concatenate([vision_position_ids(config, grids), np.zeros((pad, 2), np.int32)]),
        vision_segment_ids=np.concatenate([vision_segment_ids(config, grids), np.full((pad,), -1, np.int32)]),
    )


# ---------------------------------------------------------------------- params


def init_params(config: Qwen2VLConfig, rng, param_dtype=jnp.float32) -> dict:
    """Random parameters like transformers' init: kernels / embeddings ~ N(0, 0.02^2)
    (``initializer_range``), biases 0, norm scales 1. Works under ``jax.eval_shape``.

    Drawn in float32 and stored as ``param_dtype`` (the same draws for every storage dtype)."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(leaves))
    out = []
    for key, (path, shape) in zip(keys, leaves):
        names = [p.key for p in path]
        std = config.vision.initializer_range if names[0] == "visual" else config.text.initializer_range
        if names[-1] == "scale":
            out.append(jnp.ones(shape, param_dtype))
        elif names[-1] == "bias":
            out.append(jnp.zeros(shape, param_dtype))
        else:
            out.append((std * jax.random.normal(key, shape, jnp.float32)).astype(param_dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------- forward


def scatter_image_features(config: Qwen2VLConfig, inputs_embeds, input_ids, features):
    """Put ``features[k]`` at the k-th image token of the batch (row-major). Static shapes."""
    batch, length, hidden = inputs_embeds.shape
    is_image = (input_ids == config.image_token_id).reshape(-1)  # [B*L]
    rank = jnp.cumsum(is_image.astype(jnp.int32)) - 1  # [B*L]
    rank = jnp.clip(rank, 0, features.shape[0] - 1)
    gathered = jnp.take(features.astype(inputs_embeds.dtype), rank, axis=0)  # [B*L, H]
    out = jnp.where(is_image[:, None], gathered, inputs_embeds.reshape(-1, hidden))
    return out.reshape(batch, length, hidden)


def hidden_states(config: Qwen2VLConfig, params, inputs: ModelInputs) -> jax.Array:
    """Final-norm hidden states ``[B, L, H]`` in the compute dtype."""
    dtype = compute_dtype(config)
    lm = params["language_model"]
    x = jnp.take(lm["embed_tokens"]["embedding"], inputs.input_ids, axis=0).astype(dtype)  # [B, L, H]
    if inputs.has_images:
        features = encode_images(
            config, params["visual"], inputs.pixel_values, inputs.vision_position_ids, inputs.vision_segment_ids,
            rope=_tables(inputs.vision_rope_cos, inputs.vision_rope_sin),
        )  # [N/m^2, H]
        x = scatter_image_features(config, x, inputs.input_ids, features)
    rope = _tables(inputs.rope_cos, inputs.rope_sin)
    return decoder(config, lm, x, inputs.position_ids, inputs.attention_mask, inputs.branch_ids, rope=rope)


def with_rope_tables(config: Qwen2VLConfig, inputs: ModelInputs) -> ModelInputs:
    """``inputs`` with its rotary tables: ``rope_cos`` / ``rope_sin [..., B, L, head_dim]`` and,
    with image slots, ``vision_rope_cos`` / ``vision_rope_sin [..., N, vision head_dim]``
    (float32; leading axes such as the T of stacked inner batches are kept).

    Same numbers as the forward pass computing them itself; the reason to call it is speed.
    Inside one XLA program the ``cos`` / ``sin`` of the angles are elementwise producers that
    XLA:CPU fuses into every consumer: each ``q`` / ``k`` rotation, its tangent and its
    transpose re-evaluates them per element, heads times over (the fusions holding a ``sin``
    took 12 % of the op time of a demo ``exact`` iteration, 17 % of a ``darts`` one). Computed
    once at the top of the bi-level step (``train.step``), the tables enter the inner scan as
    sliced inputs and are read, not recomputed: paired A/B on the CPU demo, ``exact`` -7 %,
    ``darts`` -12 %. (``jax.lax.optimization_barrier`` does not stop the fusion: XLA:CPU
    expands it first.)
    """
    rope_cos, rope_sin = mrope_cos_sin(config, inputs.position_ids)
    out = inputs.replace(rope_cos=rope_cos, rope_sin=rope_sin)
    if inputs.has_images:
        vision_cos, vision_sin = vision_cos_sin(config, inputs.vision_position_ids)
        out = out.replace(vision_rope_cos=vision_cos, vision_rope_sin=vision_sin)
    return out


def _tables(cos, sin):
    return None if cos is None else (cos, sin)


def lm_head(config: Qwen2VLConfig, params, hidden) -> jax.Array:
    """``hidden [..., H] -> logits [..., V]`` float32 (``text.accum_dtype``; tied: the embedding
    matrix transposed)."""
    dtype, acc = hidden.dtype, accum_dtype(config)
    if config.text.tie_word_embeddings:
        weight = params["language_model"]["embed_tokens"]["embedding"].astype(dtype)  # [V, H]
        return jnp.einsum("...h,vh->...v", hidden, weight, preferred_element_type=acc)
    kernel = params["lm_head"]["kernel"].astype(dtype)  # [H, V]
    return jnp.einsum("...h,hv->...v", hidden, kernel, preferred_element_type=acc)


def forward(config: Qwen2VLConfig, params, inputs: ModelInputs) -> jax.Array:
    """Logits ``[B, L, V]`` float32 for the inputs from ``prepare_batch``."""
    return lm_head(config, params, hidden_states(config, params, inputs))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(config, params, inputs):
    return forward(config, params, inputs)


def logits(config: Qwen2VLConfig, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None):
    """Transformers-style convenience: ``[B, L, V]`` float32 logits (host prep + jitted forward)."""
    inputs = prepare_batch(config, input_ids, attention_mask, pixel_values, image_grid_thw)
    return _forward_jit(config, params, inputs)
