"""The Qwen2-VL vision tower as pure functions over a padded, static-shape patch sequence.

Input: ``pixel_values [N, C*Tp*P*P]`` (the processor's flattened patches, all images of the
batch concatenated, zero rows appended up to the bucket size ``N``), ``vision_position_ids
[N, 2]`` (row, col of each patch) and ``vision_segment_ids [N]`` (one id per image frame, -1
for padding rows).

1. Patch embedding: the stride-equals-kernel Conv3d is a matmul, ``x = pixel_values @ W``.
2. ``depth`` pre-norm blocks: LayerNorm -> attention with 2D rotary -> residual,
   LayerNorm -> ``fc2(act(fc1(x)))`` -> residual. Attention is non-causal and block-diagonal:
   patch ``i`` attends to patch ``j`` iff ``segment[i] == segment[j]`` (padding rows attend
   only to padding rows, so they stay finite and never touch real patches).
3. Patch merger: LayerNorm, then every ``m^2`` consecutive rows (one merge window, by the
   processor's ordering) are concatenated and mapped by ``Linear -> GELU -> Linear`` to the
   text hidden size: ``[N, E] -> [N / m^2, hidden]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import Qwen2VLConfig
from .text import accum_dtype, apply_rotary, compute_dtype, dense, layer_norm, scan_blocks

_LN_EPS = 1e-6


def activation(name: str):
    """Vision MLP activations by transformers' names (quick_gelu = x * sigmoid(1.702 x))."""
    return {
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
    }[name]


def vision_cos_sin(config: Qwen2VLConfig, vision_position_ids):
    """2D rotary tables ``[..., N, head_dim]`` (``text.accum_dtype``) for ``vision_position_ids [..., N, 2]``.

    ``inv_freq[j] = theta ** (-4j / head_dim)`` for ``j < head_dim / 4``; the angles are
    ``[row * inv_freq, col * inv_freq]`` (head_dim / 2), duplicated for the rotate-half halves.
    """
    v = config.vision
    hd = v.head_dim
    half = hd // 2
    acc = accum_dtype(config)
    inv_freq = 1.0 / (v.rope_theta ** (jnp.arange(0, half, 2, dtype=acc) / half))  # [hd/4]
    angles = vision_position_ids.astype(acc)[..., None] * inv_freq  # [..., N, 2, hd/4]
    angles = angles.reshape(*angles.shape[:-2], half)  # [..., N, hd/2] = [rows..., cols...]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., N, hd]
    return jnp.cos(angles), jnp.sin(angles)


def vision_attention(config: Qwen2VLConfig, p, x, cos, sin, mask):
    """Block-diagonal multi-head attention. x: [N, E] -> [N, E]; rotary applied in float32.

    ``mask``: the additive ``[N, N]`` float32 segment mask (0 = same frame, else the most
    negative float32; see ``text.attention_mask_bias`` for why it is added, not selected).
    """
    v = config.vision
    dtype, acc = x.dtype, accum_dtype(config)
    n = x.shape[0]
    qkv = dense(x, p["qkv"], dtype).reshape(n, 3, v.num_heads, v.head_dim)  # [N, 3, Hv, D]
    q, k, val = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, Hv, D]
    q = apply_rotary(q.astype(acc), cos[:, None, :], sin[:, None, :]).astype(dtype)
    k = apply_rotary(k.astype(acc), cos[:, None, :], sin[:, None, :]).astype(dtype)
    scores = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=acc)  # [Hv, N, N]
    scores = scores * (v.head_dim**-0.5) + mask  # [Hv, N, N]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("hqk,khd->qhd", probs, val).reshape(n, v.embed_dim)  # [N, E]
    return dense(out, p["proj"], dtype)


def vision_block(config: Qwen2VLConfig, p, x, cos, sin, mask):
    dtype = x.dtype
    x = x + vision_attention(config, p["attn"], layer_norm(x, p["norm1"], _LN_EPS), cos, sin, mask)
    h = layer_norm(x, p["norm2"], _LN_EPS)
    h = activation(config.vision.hidden_act)(dense(h, p["mlp"]["fc1"], dtype))  # [N, M]
    return x + dense(h, p["mlp"]["fc2"], dtype)


def patch_merger(config: Qwen2VLConfig, p, x):
    """[N, E] -> [N / m^2, hidden]: LayerNorm, concatenate m^2 consecutive rows, MLP (exact GELU)."""
    v = config.vision
    dtype = x.dtype
    x = layer_norm(x, p["ln_q"], _LN_EPS).reshape(-1, v.merge_dim)  # [N/m^2, m^2 E]
    x = jax.nn.gelu(dense(x, p["mlp_0"], dtype), approximate=False)
    return dense(x, p["mlp_2"], dtype)  # [N/m^2, hidden]


def encode_images(config: Qwen2VLConfig, params, pixel_values, vision_position_ids, vision_segment_ids, rope=None):
    """Image features ``[N / m^2, text hidden]`` in the compute dtype (rows in patch order).

    ``rope``: the ``vision_cos_sin`` tables of ``vision_position_ids`` when the caller computed
    them already."""
    v = config.vision
    n = pixel_values.shape[0]
    if n % (v.spatial_merge_size**2):
        raise ValueError(f"encode_images: {n} patch rows is not a multiple of spatial_merge_size^2")
    dtype = compute_dtype(config)
    x = dense(pixel_values.astype(dtype), params["patch_embed"], dtype)  # [N, E]
    cos, sin = vision_cos_sin(config, vision_position_ids) if rope is None else rope  # [N, D]
    segments = vision_segment_ids
    same = segments[:, None] == segments[None, :]  # [N, N]
    acc = accum_dtype(config)
    mask = jnp.where(same, 0.0, jnp.finfo(acc).min).astype(acc)  # [N, N]

    def block(h, p):
        return vision_block(config, p, h, cos, sin, mask)

    x = scan_blocks(config, block, x, params["blocks"])
    return patch_merger(config, params["merger"], x)
