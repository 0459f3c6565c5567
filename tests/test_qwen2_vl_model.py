"""Qwen2-VL forward parity with transformers' PyTorch model, rope index, shapes, compilation.

Tolerance for every logits comparison: max |jax - torch| <= 1e-4 (float32, CPU), on the
non-padding positions (padding positions are finite but not compared).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dreamprm_jax.models import qwen2_vl
from dreamprm_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig, convert

ATOL = 1e-4
BUCKET = (2, 40, 32)  # (batch, length, patches) shared by all parity cases


def _odd_config() -> Qwen2VLConfig:
    """GQA ratio 3, odd vocabulary / intermediate sizes, untied head, patch 3, 3 layers."""
    return Qwen2VLConfig(
        text=TextConfig(vocab_size=211, hidden_size=72, intermediate_size=101, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0,
                        mrope_section=(2, 2, 2), rms_norm_eps=1e-5, tie_word_embeddings=False,
                        bos_token_id=None, eos_token_id=None),
        vision=VisionConfig(depth=3, embed_dim=24, num_heads=2, mlp_ratio=3, patch_size=3,
                            temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_size=72),
        image_token_id=207, video_token_id=208, vision_start_token_id=203, vision_end_token_id=204,
    )


CONFIGS = {"tiny": lambda: qwen2_vl.tiny(num_key_value_heads=2), "odd_gqa3": _odd_config}


class Pair:
    """A JAX model and transformers' model with the same weights, plus a shared jitted forward."""

    def __init__(self, config):
        self.config = config
        hf_config = transformers.Qwen2VLConfig(**config.to_hf_dict())
        hf_config._attn_implementation = "eager"
        torch.manual_seed(0)
        self.torch_model = transformers.Qwen2VLForConditionalGeneration(hf_config).eval()
        with torch.no_grad():
            # HF init (std 0.02) gives near-uniform attention; scale the matrices (std 0.12) so
            # masks and rotary positions matter, and make norms / biases non-trivial.
            for name, p in self.torch_model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.mul_(6.0)
        state = ((k, v.detach().numpy()) for k, v in self.torch_model.state_dict().items())
        self.params = jax.tree.map(jnp.asarray, convert.params_from_hf(config, state))
        self.traces = 0

        def counted(config, params, batch):
            self.traces += 1  # Python side effect: runs once per trace, not per call
            return qwen2_vl.forward(config, params, batch)

        # Every case below is padded to one bucket, so this compiles exactly once per config.
        self.forward = jax.jit(counted)

    def sample(self, rng, prefix, grids, suffix):
        """Token ids: text, then per image <vision_start> <image_pad>*k <vision_end> text."""
        c = self.config
        m2 = c.vision.spatial_merge_size ** 2
        ids = list(rng.integers(0, 200, prefix))
        for t, h, w in grids:
            ids += [c.vision_start_token_id] + [c.image_token_id] * (t * h * w // m2) + [c.vision_end_token_id]
            ids += list(rng.integers(0, 200, 2))
        ids += list(rng.integers(0, 200, suffix))
        return ids

    def compare(self, rows, grids, sides):
        """Pad rows (left/right per row), run both models, return max |diff| on real tokens."""
        c = self.config
        rng = np.random.default_rng(1)
        length = max(len(r) for r in rows)
        input_ids = np.zeros((len(rows), length), np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for b, (row, side) in enumerate(zip(rows, sides)):
            sl = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[b, sl] = row
            mask[b, sl] = 1
        grid_arr = np.array(grids, np.int64).reshape(-1, 3)
        n = int(grid_arr.prod(-1).sum()) if len(grids) else 0
        pixel_values = rng.standard_normal((n, c.vision.patch_dim)).astype(np.float32) if n else None
        kwargs = dict(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask))
        if n:
            kwargs.update(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid_arr),
                          mm_token_type_ids=torch.from_numpy((input_ids == c.image_token_id).astype(np.int64)))
        with torch.no_grad():
            want = self.torch_model(**kwargs).logits.numpy()
        # JAX side: the shared bucket (extra all-padding rows / right columns / patch rows).
        ids_b = np.zeros(BUCKET[:2], np.int64)
        mask_b = np.zeros(BUCKET[:2], np.int64)
        ids_b[:len(rows), :length] = input_ids
        mask_b[:len(rows), :length] = mask
        batch = qwen2_vl.prepare_batch(c, ids_b, mask_b, pixel_values, grid_arr if n else None,
                                       num_patches=BUCKET[2])
        got = np.asarray(self.forward(c, self.params, batch))
        assert got.dtype == np.float32 and got.shape == BUCKET[:2] + (c.text.vocab_size,)
        assert np.all(np.isfinite(got))  # padding rows and padding patches included
        got = got[:len(rows), :length]
        real = mask.astype(bool)
        return float(np.max(np.abs(got[real] - want[real])))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return Pair(CONFIGS[request.param]())


def test_text_only(pair):
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, 200, 9))
    assert pair.compare([ids], [], ["right"]) <= ATOL
    # padded text-only batch (transformers uses arange positions here; RoPE is shift-invariant)
    assert pair.compare([ids[:5], ids], [], ["left", "right"]) <= ATOL


def test_one_image(pair):
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6)]
    assert pair.compare([pair.sample(rng, 3, grids, 4)], grids, ["right"]) <= ATOL


def test_two_images_of_different_sizes_in_one_sample(pair):
    rng = np.random.default_rng(0)
    grids = [(1, 4, 4), (1, 2, 6)]
    assert pair.compare([pair.sample(rng, 2, grids, 3)], grids, ["right"]) <= ATOL


def test_padded_batch_left_and_right(pair):
    rng = np.random.default_rng(0)
    row0 = pair.sample(rng, 2, [(1, 2, 4)], 2)  # shorter: padded
    row1 = pair.sample(rng, 3, [(1, 4, 2), (1, 2, 2)], 5)
    grids = [(1, 2, 4), (1, 4, 2), (1, 2, 2)]
    assert pair.compare([row0, row1], grids, ["left", "right"]) <= ATOL
    assert pair.compare([row1, row0], [grids[1], grids[2], grids[0]], ["right", "left"]) <= ATOL


def test_convenience_logits_matches_forward(pair):
    c = pair.config
    if c.text.vocab_size != 256:
        pytest.skip("one config is enough (saves a compilation)")
    rng = np.random.default_rng(3)
    grids = np.array([[1, 2, 2]])
    ids = np.array([pair.sample(rng, 2, grids.tolist(), 2)])
    pv = rng.standard_normal((4, c.vision.patch_dim)).astype(np.float32)
    mask = np.ones_like(ids)
    out = qwen2_vl.logits(c, pair.params, ids, mask, pv, grids)
    ref = jax.jit(qwen2_vl.forward)(c, pair.params, qwen2_vl.prepare_batch(c, ids, mask, pv, grids))
    assert out.shape == (1, ids.shape[1], c.text.vocab_size) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- host helpers


def test_rope_index_matches_transformers():
    pair_config = _odd_config()
    hf_config = transformers.Qwen2VLConfig(**pair_config.to_hf_dict())
    hf = transformers.Qwen2VLModel(hf_config)
    p = Pair.__new__(Pair)
    p.config = pair_config
    rng = np.random.default_rng(5)
    rows = [p.sample(rng, 1, [(1, 4, 6), (1, 2, 2)], 3), p.sample(rng, 4, [(1, 6, 2)], 1)]
    length = max(map(len, rows)) + 2
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    ids[0, :len(rows[0])] = rows[0]; mask[0, :len(rows[0])] = 1
    ids[1, length - len(rows[1]):] = rows[1]; mask[1, length - len(rows[1]):] = 1
    grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 2]])
    want, _ = hf.get_rope_index(torch.from_numpy(ids), torch.from_numpy((ids == 207).astype(np.int64)),
                                torch.from_numpy(grids), attention_mask=torch.from_numpy(mask))
    got = qwen2_vl.rope_index(pair_config, ids, mask, grids)
    np.testing.assert_array_equal(got, want.numpy())  # exact (integers)
    from transformers.vision_utils import get_vision_position_ids
    np.testing.assert_array_equal(qwen2_vl.vision_position_ids(pair_config, grids),
                                  get_vision_position_ids(torch.from_numpy(grids), 2).numpy())
    np.testing.assert_array_equal(qwen2_vl.vision_segment_ids(pair_config, np.array([[2, 2, 2], [1, 2, 4]])),
                                  [0] * 4 + [1] * 4 + [2] * 8)


def test_prepare_batch_errors_and_padding():
    c = qwen2_vl.tiny()
    ids = np.array([[1, c.vision_start_token_id] + [c.image_token_id] * 2 + [c.vision_end_token_id]])
    pv = np.zeros((8, c.vision.patch_dim), np.float32)
    batch = qwen2_vl.prepare_batch(c, ids, None, pv, [[1, 2, 4]], num_patches=16)
    assert isinstance(batch, qwen2_vl.ModelInputs) and batch.has_images and batch.branch_ids is None
    assert batch.pixel_values.shape == (16, c.vision.patch_dim)
    np.testing.assert_array_equal(batch.vision_segment_ids, [0] * 8 + [-1] * 8)
    assert batch.position_ids.shape == (3, 1, 5) and batch.position_ids.dtype == np.int32
    with pytest.raises(ValueError, match="image tokens"):
        qwen2_vl.prepare_batch(c, ids, None, pv[:4], [[1, 2, 2]])
    with pytest.raises(ValueError, match="num_patches"):
        qwen2_vl.prepare_batch(c, ids, None, pv, [[1, 2, 4]], num_patches=10)
    with pytest.raises(ValueError, match="no pixel_values"):
        qwen2_vl.prepare_batch(c, ids, None)


# ----------------------------------------------------------------------------- shapes, jit


def test_2b_parameter_count_without_allocating():
    shapes = jax.eval_shape(qwen2_vl.init_params, qwen2_vl.qwen2_vl_2b(), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 2_208_985_600
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    assert "lm_head" not in shapes


def test_compiles_once_per_bucket(pair):
    """Different images (24, 24, 8 real patches) in the same bucket reuse one compilation."""
    rng = np.random.default_rng(7)
    for grid in ((1, 4, 6), (1, 6, 4), (1, 2, 4)):
        assert pair.compare([pair.sample(rng, 2, [grid], 3)], [grid], ["right"]) <= ATOL
    assert pair.traces == 1


def test_remat_gradients_and_bf16_forward():
    """Per-block remat: finite float32 grads, same loss as without remat (rtol 1e-6).
    bf16 compute: float32 logits within atol 0.05 of the float32 model (bf16 has ~3 digits)."""
    c32 = qwen2_vl.tiny()
    params = qwen2_vl.init_params(c32, jax.random.key(0))
    # text only: a gradient through the vision tower too costs ~3x the compile time on CPU,
    # and both towers share scan_blocks (where remat is applied).
    batch = qwen2_vl.prepare_batch(c32, np.array([[1, 5, 9, 2, 7], [3, 4, 0, 0, 0]]),
                                   np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))

    def loss(p, config):
        return jnp.mean(qwen2_vl.forward(config, p, batch) ** 2)

    remat = c32.replace(remat="dots_saveable")
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.max(jnp.abs(grads["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]))) > 0
    l32 = jax.jit(qwen2_vl.forward)(c32, params, batch)
    np.testing.assert_allclose(float(value), float(jnp.mean(l32 ** 2)), rtol=1e-6)
    l16 = jax.jit(qwen2_vl.forward)(c32.replace(dtype="bfloat16"), params, batch)
    assert l16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(l16 - l32))) <= 0.05


def test_fused_projections_equal_separate_ones():
    """``text.dense_fused`` (q/k/v and gate/up as one matmul) gives each projection's ``dense``, with
    and without biases, and splits the gradients back onto the separate kernels."""
    from dreamprm_jax.models.qwen2_vl import text

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)  # [B, L, in]
    ps = [{"kernel": jnp.asarray(rng.normal(size=(8, n)), jnp.float32), "bias": jnp.asarray(rng.normal(size=(n,)),
                                                                                       jnp.float32)}
          for n in (8, 4, 4)]
    for with_bias in (True, False):
        qs = ps if with_bias else [{"kernel": p["kernel"]} for p in ps]
        fused = text.dense_fused(x, qs, jnp.float32)
        assert [f.shape for f in fused] == [(2, 5, 8), (2, 5, 4), (2, 5, 4)]
        for f, p in zip(fused, qs):
            np.testing.assert_allclose(f, text.dense(x, p, jnp.float32), rtol=1e-6, atol=1e-6)

    def loss(fn, qs):
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(fn(qs)))

    g_fused = jax.grad(lambda qs: loss(lambda q: text.dense_fused(x, q, jnp.float32), qs))(ps)
    g_sep = jax.grad(lambda qs: loss(lambda q: [text.dense(x, p, jnp.float32) for p in q], qs))(ps)
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_sep)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rope_tables_given_equal_rope_tables_computed(pair):
    """``with_rope_tables`` adds cos / sin tables that the forward pass reads instead of
    computing them: same logits (and so the same parity with transformers); stacked batches
    ``[T, ...]`` get per-slice tables."""
    c = pair.config
    rng = np.random.default_rng(3)
    grids = [(1, 4, 6), (1, 2, 4)]
    rows = [pair.sample(rng, 2, grids[:1], 3), pair.sample(rng, 1, grids[1:], 2)]
    ids = np.zeros(BUCKET[:2], np.int64)
    mask = np.zeros(BUCKET[:2], np.int64)
    for b, r in enumerate(rows):
        ids[b, BUCKET[1] - len(r):] = r  # left-padded: positions start past the padding
        mask[b, BUCKET[1] - len(r):] = 1
    n = sum(t * h * w for t, h, w in grids)
    pixels = rng.standard_normal((n, c.vision.patch_dim)).astype(np.float32)
    batch = qwen2_vl.prepare_batch(c, ids, mask, pixels, np.array(grids), num_patches=BUCKET[2])
    with_tables = jax.jit(qwen2_vl.with_rope_tables, static_argnums=0)(c, batch)
    assert all(getattr(batch, f) is None for f in qwen2_vl.ROPE_FIELDS)  # a new structure, the old one unchanged
    assert all(getattr(with_tables, f) is not None for f in qwen2_vl.ROPE_FIELDS)
    assert with_tables.rope_cos.shape == BUCKET[:2] + (c.text.head_dim,)
    assert with_tables.vision_rope_sin.shape == (BUCKET[2], c.vision.head_dim)
    np.testing.assert_array_equal(pair.forward(c, pair.params, with_tables), pair.forward(c, pair.params, batch))

    stacked = jax.tree.map(lambda v: np.stack([v, v[..., ::-1]]), batch)  # [2, ...], the second reversed
    tables = qwen2_vl.with_rope_tables(c, stacked)
    for t in range(2):
        one = qwen2_vl.with_rope_tables(c, jax.tree.map(lambda v: v[t], stacked))
        for f in qwen2_vl.ROPE_FIELDS:
            np.testing.assert_allclose(getattr(tables, f)[t], getattr(one, f), rtol=1e-6, atol=1e-6)
