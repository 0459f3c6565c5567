"""The Qwen2 text decoder with multimodal rotary embedding (M-RoPE), as pure functions.

Also holds the small numerical primitives the vision tower shares (dense, norms, rotary,
scan-over-stacked-blocks with rematerialisation).

Numerics follow transformers' Qwen2-VL: RMSNorm statistics in float32, rotary angles in
float32 (cast to the compute dtype before use, as ``Qwen2VLRotaryEmbedding`` does), attention
softmax in float32; everything else in ``config.dtype``. "float32" here is the *accumulation
dtype* ``accum_dtype(config)``: float32 for the float32 / bfloat16 / float16 compute dtypes,
float64 for float64 compute (with ``jax.enable_x64``), so a float64 model holds no float32 value.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreamprm_jax.utils.remat import apply_remat

from .config import Qwen2VLConfig

# ---------------------------------------------------------------------- primitives


def compute_dtype(config: Qwen2VLConfig):
    return jnp.dtype(config.dtype)


def accum_dtype(config: Qwen2VLConfig):
    """The dtype of norm statistics, rotary angles, attention scores and logits:
    ``promote_types(compute dtype, float32)`` (float32, or float64 for float64 compute)."""
    return jnp.promote_types(compute_dtype(config), jnp.float32)


def dense(x, p, dtype):
    """``x @ kernel + bias`` with float32 master weights cast to the compute dtype.

    ``x [..., in]`` is flattened to one ``[rows, in]`` matrix first, so the kernel's gradient
    ``x^T dy`` contracts a single axis. With ``[B, L, in]`` kept 3-D it contracts two
    (``B`` and ``L``), which XLA:CPU lowers with a transposed copy of the cotangent fused
    into its producer (e.g. SiLU's derivative): ~2.5x slower MLP backward on CPU.
    """
    kernel = p["kernel"].astype(dtype)  # [in, out]
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel)  # [rows, out]
    y = y.reshape(*x.shape[:-1], kernel.shape[-1])  # [..., out]
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def dense_fused(x, ps, dtype):
    """Several projections of the same input as one matmul: ``[x @ k_1 + b_1, x @ k_2 + b_2, ...]``.

    The kernels ``[in, out_i]`` are concatenated along the output axis (fused into their cast
    to the compute dtype) and the product split back, so the forward pass runs one ``[rows, in]
    x [in, sum out_i]`` matmul instead of several narrow ones and the backward pass one for the
    input's cotangent and one for the kernels'. Same maths as :func:`dense` per projection;
    every projection must have a bias or none may.
    """
    kernel = jnp.concatenate([p["kernel"].astype(dtype) for p in ps], axis=-1)  # [in, sum out]
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel)  # [rows, sum out]
    if "bias" in ps[0]:
        y = y + jnp.concatenate([p["bias"].astype(dtype) for p in ps], axis=-1)
    y = y.reshape(*x.shape[:-1], kernel.shape[-1])  # [..., sum out]
    splits = np.cumsum([p["kernel"].shape[-1] for p in ps])[:-1]
    return jnp.split(y, splits, axis=-1)


def rms_norm(x, scale, eps: float):
    """``scale * x / sqrt(mean(x^2) + eps)``; statistics in float32 (float64 for float64 x),
    result in x's dtype."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * y


def layer_norm(x, p, eps: float = 1e-6):
    """``(x - mean) / sqrt(var + eps) * scale + bias``; statistics in float32 (float64 for float64 x)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(variance + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def rotate_half(x):
    """``[x1, x2] -> [-x2, x1]`` over the last axis (the GPT-NeoX rotary layout)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` (cos / sin broadcast against x)."""
    return x * cos + rotate_half(x) * sin


#: Stacks of at most this many blocks run as a Python loop (unrolled in the program); deeper
#: stacks run under ``lax.scan``, whose compile time does not grow with depth.
UNROLL_MAX_BLOCKS = 4


def scan_blocks(config: Qwen2VLConfig, block: Callable, x, stacked_params):
    """``x = block(x, params[i])`` for every row of the stacked params.

    Up to ``UNROLL_MAX_BLOCKS`` rows: a Python loop over static slices (the demo models); more:
    ``lax.scan``. Same values either way. The loop is faster for shallow stacks: a scan keeps
    every per-block residual the backward pass needs in a ``[depth, ...]`` buffer (zero-filled,
    then written and read by dynamic slices: ~10% of a demo bi-level step on XLA:CPU, the
    attention probabilities being the largest), the loop keeps them as plain values.

    With ``config.remat != "none"`` each block is wrapped in ``jax.checkpoint`` with the
    selected policy, so the backward pass recomputes block activations instead of storing them.
    """

    def body(carry, p):
        return block(carry, p), None

    body = apply_remat(body, config.remat, prevent_cse=False)
    depth = jax.tree_util.tree_leaves(stacked_params)[0].shape[0]
    if depth <= UNROLL_MAX_BLOCKS:
        for i in range(depth):
            x, _ = body(x, jax.tree_util.tree_map(lambda a: a[i], stacked_params))
        return x
    x, _ = jax.lax.scan(body, x, stacked_params)
    return x


# ---------------------------------------------------------------------- M-RoPE


def mrope_cos_sin(config: Qwen2VLConfig, position_ids):
    """M-RoPE tables ``cos, sin`` of shape ``[..., B, L, head_dim]`` (``accum_dtype``) for
    ``position_ids [..., 3, B, L]`` (leading axes, e.g. the T of stacked inner batches, kept).

    With ``inv_freq[j] = theta ** (-2j / head_dim)`` for ``j < head_dim / 2`` and the split
    ``mrope_section = (s_t, s_h, s_w)``, frequency ``j`` takes its position from axis
    ``a(j) = 0`` (temporal) for ``j < s_t``, 1 (height) for the next ``s_h``, 2 (width) after:
    ``angle[b, l, j] = position_ids[a(j), b, l] * inv_freq[j]``; the table is duplicated
    (``[angle, angle]``) to cover the two rotate-half halves.
    """
    t = config.text
    hd = t.head_dim
    acc = accum_dtype(config)
    inv_freq = 1.0 / (t.rope_theta ** (jnp.arange(0, hd, 2, dtype=acc) / hd))  # [hd/2]
    axis_of = jnp.concatenate([jnp.full((s,), a, dtype=jnp.int32) for a, s in enumerate(t.mrope_section)])
    pos = jnp.take(position_ids.astype(acc), axis_of, axis=-3)  # [..., hd/2, B, L]
    angles = jnp.moveaxis(pos, -3, -1) * inv_freq  # [..., B, L, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., B, L, hd]
    return jnp.cos(angles), jnp.sin(angles)


# ---------------------------------------------------------------------- decoder


def attention_mask_bias(attention_mask, branch_ids=None, dtype=jnp.float32):
    """Additive causal + key-padding mask ``[B, 1, L, 1, L]`` of ``dtype`` (the attention scores'):
    0 = may attend, else the most negative ``dtype`` number (axes: batch, kv head, query, query
    group, key; see ``self_attention``).

    Added to finite scores it gives exactly ``where(mask, scores, min)``: ``s + 0 = s`` and
    ``s + min = min`` (``|s| << ulp(min) = 2^104``). Its backward, unlike ``where``'s, passes the
    cotangent through without a select over the ``[.., L, L]`` scores.

    ``branch_ids [B, L]`` (optional) packs several sequences that share a prefix into one row
    (a tree): a token of branch ``b > 0`` is seen only by later tokens of the same branch, a
    token of branch 0 (the trunk) by every later token. See ``data.batching.pack_chain``.
    """
    length = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # [L(query), L(key)]
    keys = attention_mask.astype(bool)[:, None, None, None, :]  # [B, 1, 1, 1, L]
    allowed = causal[None, None, :, None, :] & keys  # [B, 1, L, 1, L]
    if branch_ids is not None:
        query_b = branch_ids[:, None, :, None, None]  # [B, 1, L, 1, 1]
        key_b = branch_ids[:, None, None, None, :]  # [B, 1, 1, 1, L]
        allowed = allowed & ((key_b == 0) | (key_b == query_b))
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def self_attention(config: Qwen2VLConfig, p, x, cos, sin, mask):
    """Grouped-query attention with M-RoPE. x: [B, L, H] -> [B, L, H]; mask from
    ``attention_mask_bias``.

    Query head ``h`` reads key/value head ``h // (num_heads / num_kv_heads)`` (transformers'
    ``repeat_kv``); ``softmax(q k^T / sqrt(head_dim) + mask) v`` with the softmax in float32.
    Fully masked query rows (left padding) get a uniform softmax, never NaN.

    Layout: the ``G = num_heads / num_kv_heads`` query heads of a kv head are folded into the
    query axis, so both products are plain batched matmuls over ``n = (batch, kv head)`` with one
    contracting axis, ``[n, L*G, D] x [n, L, D]`` and ``[n, L*G, L] x [n, L, D]``, and the
    ``[.., L, L]`` scores are never transposed (on XLA:CPU every transposed copy of them is a
    slow strided pass).
    """
    t = config.text
    dtype = x.dtype
    batch, length, _ = x.shape
    hd, kvh = t.head_dim, t.num_key_value_heads
    groups = t.num_attention_heads // kvh
    q, k, v = dense_fused(x, [p["q_proj"], p["k_proj"], p["v_proj"]], dtype)
    q = q.reshape(batch, length, kvh, groups, hd)  # [B, L, KV, G, D]
    k = k.reshape(batch, length, kvh, hd)  # [B, L, KV, D]
    v = v.reshape(batch, length, kvh, hd)  # [B, L, KV, D]
    cos, sin = cos.astype(dtype), sin.astype(dtype)
    q = apply_rotary(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
    k = apply_rotary(k, cos[:, :, None, :], sin[:, :, None, :])
    n = batch * kvh
    q = q.transpose(0, 2, 1, 3, 4).reshape(n, length * groups, hd)  # [B*KV, L*G, D]
    k = k.transpose(0, 2, 1, 3).reshape(n, length, hd)  # [B*KV, L, D]
    v = v.transpose(0, 2, 1, 3).reshape(n, length, hd)  # [B*KV, L, D]
    scores = jnp.einsum("nqd,nsd->nqs", q, k, preferred_element_type=accum_dtype(config))  # [B*KV, L*G, L]
    scores = scores.reshape(batch, kvh, length, groups, length) * (hd**-0.5) + mask  # [B, KV, L, G, L]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(n, length * groups, length)
    out = jnp.einsum("nqs,nsd->nqd", probs, v)  # [B*KV, L*G, D]
    out = out.reshape(batch, kvh, length, groups, hd).transpose(0, 2, 1, 3, 4)  # [B, L, KV, G, D]
    return dense(out.reshape(batch, length, t.num_attention_heads * hd), p["o_proj"], dtype)


def decoder_layer(config: Qwen2VLConfig, p, x, cos, sin, mask):
    """Pre-norm block: ``x += attn(rms(x)); x += down(silu(gate(rms(x))) * up(rms(x)))``."""
    eps = config.text.rms_norm_eps
    dtype = x.dtype
    h = rms_norm(x, p["input_layernorm"]["scale"], eps)
    x = x + self_attention(config, p["self_attn"], h, cos, sin, mask)
    h = rms_norm(x, p["post_attention_layernorm"]["scale"], eps)
    mlp = p["mlp"]
    gate, up = dense_fused(h, [mlp["gate_proj"], mlp["up_proj"]], dtype)  # [B, L, I] each
    h = jax.nn.silu(gate) * up  # [B, L, I]
    return x + dense(h, mlp["down_proj"], dtype)


def decoder(config: Qwen2VLConfig, params, inputs_embeds, position_ids, attention_mask, branch_ids=None,
            rope=None):
    """All decoder layers and the final RMSNorm. inputs_embeds [B, L, H] -> [B, L, H].

    ``branch_ids [B, L]``: optional tree packing (see ``attention_mask_bias``). ``rope``: the
    ``mrope_cos_sin`` tables of ``position_ids`` when the caller computed them already."""
    cos, sin = mrope_cos_sin(config, position_ids) if rope is None else rope  # [B, L, D]
    mask = attention_mask_bias(attention_mask, branch_ids, accum_dtype(config))  # [B, 1, L, 1, L]

    def block(x, p):
        return decoder_layer(config, p, x, cos, sin, mask)

    x = scan_blocks(config, block, inputs_embeds, params["layers"])
    return rms_norm(x, params["norm"]["scale"], config.text.rms_norm_eps)
