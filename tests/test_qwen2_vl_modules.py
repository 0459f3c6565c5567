"""The Flax NNX modules (``Qwen2VL``, ``ProcessRewardModel``) against the functional API and torch.

Tolerances: the modules compute with the functional API's pure functions, so their logits,
scores and gradients equal it bit for bit (``np.array_equal``); against transformers'
PyTorch model max |diff| <= 1e-4 (float32, CPU, real tokens); bfloat16 compute within 0.1
of float32 compute (logits of magnitude ~10); float64 compute within 1e-4 of float32.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamprm_jax.data.batching import BatchSpec, Sample, collate_meta, model_prepare_fn
from dreamprm_jax.models import ProcessRewardModel, Qwen2VL, prm, qwen2_vl
from tests.tiny_hf import hf_logits, save_tiny_hf

ATOL_TORCH = 1e-4
PATCH_DIM = 3 * 2 * 14 * 14  # the tiny transformers model: 3 channels, temporal 2, patch 14


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("nnx") / "ckpt")


@pytest.fixture(scope="module")
def model(checkpoint):
    return Qwen2VL.from_pretrained(checkpoint)


def _inputs(config, case: str):
    """``(input_ids, attention_mask, pixel_values, image_grid_thw)``, right-padded.

    ``text``: two text rows of different lengths. ``two_sizes``: one image per row, a 4x4 and a
    2x6 patch grid (different token counts, different rotary positions).
    """
    rng = np.random.default_rng(0)
    grids = {"text": [None, None], "two_sizes": [(1, 4, 4), (1, 2, 6)]}[case]
    rows, pixels = [], []
    for b, grid in enumerate(grids):
        ids = []
        if grid is not None:
            ids = [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(grid)) // 4)
            ids += [config.vision_end_token_id]
            pixels.append(rng.standard_normal((int(np.prod(grid)), PATCH_DIM)).astype(np.float32))
        rows.append(ids + list(rng.integers(2, 118, 7 - 2 * b)))
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    if not pixels:
        return input_ids, mask, None, None
    return input_ids, mask, np.concatenate(pixels), np.array(grids, np.int64)


@pytest.mark.parametrize("case", ["text", "two_sizes"])
def test_logits_equal_functional_bitwise_and_transformers(checkpoint, model, case):
    """model(...) == qwen2_vl.logits(...) bit for bit; merged inside jax.jit too; torch within 1e-4."""
    config, params = qwen2_vl.load_checkpoint(checkpoint)
    ids, mask, pix, grid = _inputs(config, case)
    got = np.asarray(model(ids, mask, pixel_values=pix, image_grid_thw=grid))
    want = np.asarray(qwen2_vl.logits(config, params, ids, mask, pix, grid))
    assert got.dtype == np.float32 and got.shape == ids.shape + (config.text.vocab_size,)
    np.testing.assert_array_equal(got, want)

    graphdef, state = nnx.split(model, nnx.Param)
    inputs = qwen2_vl.prepare_batch(config, ids, mask, pix, grid)
    merged = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, inputs)
    np.testing.assert_array_equal(np.asarray(merged), want)

    ref = hf_logits(checkpoint, ids, mask, pix, grid)
    real = mask.astype(bool)
    assert float(np.max(np.abs(got[real] - ref[real]))) <= ATOL_TORCH


def test_2b_parameter_count_with_nnx_eval_shape():
    """nnx.eval_shape builds the 2B model abstractly: 2,208,985,600 parameters, nothing allocated."""
    abstract = nnx.eval_shape(lambda: Qwen2VL(qwen2_vl.qwen2_vl_2b(), rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.dtype == jnp.float32 for x in leaves)
    assert sum(x.size for x in leaves) == 2_208_985_600


@pytest.mark.parametrize("tie", [True, False])
def test_attribute_paths_are_parameter_names(tie):
    """The Param state is the functional tree (paths and shapes of param_shapes), the model holds
    no other state (rotary tables are computed, not stored), and rngs draw init_params' values."""
    config = qwen2_vl.tiny(tie_word_embeddings=tie)
    model = Qwen2VL(config, rngs=nnx.Rngs(0))
    shapes = jax.tree.map(lambda x: tuple(x.shape), model.params())
    assert shapes == qwen2_vl.param_shapes(config)
    assert model.language_model.layers.self_attn.q_proj.kernel[...].shape == (2, 64, 64)
    assert hasattr(model, "lm_head") is not tie
    assert len(jax.tree.leaves(nnx.state(model))) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    want = qwen2_vl.init_params(config, nnx.Rngs(0).params())
    jax.tree.map(np.testing.assert_array_equal, model.params(), want)


def test_dtype_policy_bfloat16(model, checkpoint):
    """param_dtype is the storage dtype, dtype the compute dtype; logits stay float32."""
    config = model.config
    ids, mask, pix, grid = _inputs(config, "two_sizes")
    ref = np.asarray(model(ids, mask, pixel_values=pix, image_grid_thw=grid))
    bf16 = Qwen2VL.from_pretrained(checkpoint, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert bf16.config.dtype == "bfloat16" and bf16.dtype == jnp.bfloat16 and bf16.param_dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params()))
    got = np.asarray(bf16(ids, mask, pixel_values=pix, image_grid_thw=grid))
    assert got.dtype == np.float32
    real = mask.astype(bool)
    assert 0 < float(np.max(np.abs(got[real] - ref[real]))) <= 0.1
    stored = Qwen2VL.from_params(config, model.params(), param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(stored.params()))
    with pytest.raises(ValueError, match="param_dtype=int32"):
        Qwen2VL.from_params(config, model.params(), param_dtype=jnp.int32)


def test_dtype_policy_float64(model):
    """float64 needs jax x64 (an error names it); with it, a float64 model within 1e-4 of float32."""
    config = model.config
    ids, mask, pix, grid = _inputs(config, "two_sizes")
    ref = np.asarray(model(ids, mask, pixel_values=pix, image_grid_thw=grid))
    with pytest.raises(ValueError, match="enable_x64"):
        Qwen2VL.from_params(config, model.params(), dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        f64 = Qwen2VL.from_params(config, model.params(), dtype=jnp.float64, param_dtype=jnp.float64)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(f64.params()))
        got = np.asarray(f64(ids, mask, pixel_values=pix, image_grid_thw=grid))
    assert got.dtype == np.float64
    real = mask.astype(bool)
    assert float(np.max(np.abs(got[real] - ref[real]))) <= 1e-4


def test_save_pretrained_loads_in_transformers(model, tmp_path):
    """save_pretrained -> transformers logits within 1e-4; from_pretrained gives the same params bitwise."""
    out = model.save_pretrained(tmp_path / "out")
    ids, mask, pix, grid = _inputs(model.config, "two_sizes")
    got = np.asarray(model(ids, mask, pixel_values=pix, image_grid_thw=grid))
    ref = hf_logits(out, ids, mask, pix, grid)
    real = mask.astype(bool)
    assert float(np.max(np.abs(got[real] - ref[real]))) <= ATOL_TORCH
    jax.tree.map(np.testing.assert_array_equal, Qwen2VL.from_pretrained(out).params(), model.params())


def _meta_batch(config):
    """Two chains of 3 and 2 step prefixes (one image each) in a meta batch of M=3 chains x S=3."""
    rng = np.random.default_rng(3)
    chains = []
    for n_steps, grid in ((3, (1, 4, 4)), (2, (1, 2, 4))):
        head = [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(grid)) // 4)
        head += [config.vision_end_token_id] + list(rng.integers(2, 118, 3))
        pixels = rng.standard_normal((int(np.prod(grid)), PATCH_DIM)).astype(np.float32)
        steps = [list(rng.integers(2, 118, 2)) for _ in range(n_steps)]
        chains.append([Sample(np.asarray(head + sum(steps[: s + 1], []), np.int32), pixels, np.asarray(grid))
                       for s in range(n_steps)])
    spec = BatchSpec(3, (32, 64), (64,), pad_id=0, patch_dim=PATCH_DIM, max_steps=3)
    batch, _ = collate_meta(chains, [1.0, 0.0], spec, model_prepare_fn(config))
    return batch


def test_prm_module_scores_steps_and_round_trips(checkpoint, tmp_path):
    """ProcessRewardModel.score_steps == prm.score per step (bitwise), masked; save/load round trip;
    gradients through nnx.split / nnx.merge inside jax.jit equal those of the pure tree bitwise."""
    config, backbone = qwen2_vl.load_checkpoint(checkpoint)
    params = prm.init(config, jax.random.key(0), backbone)
    prm.save(tmp_path / "prm", config, params)
    module = ProcessRewardModel.from_pretrained(tmp_path / "prm")
    assert sorted(module.params()) == ["backbone", "head"]
    jax.tree.map(np.testing.assert_array_equal, module.params(), params)

    batch = _meta_batch(config)
    probs, z = module.score_steps(batch)  # [M, S]
    want_p, want_z = prm.score(config, params, batch.inputs)
    mask = batch.step_mask > 0
    np.testing.assert_array_equal(np.asarray(z)[mask], np.asarray(want_z).reshape(mask.shape)[mask])
    np.testing.assert_array_equal(np.asarray(probs)[mask], np.asarray(want_p).reshape(mask.shape)[mask])
    assert np.all(np.asarray(probs)[~mask] == 0) and mask.sum() == 5

    graphdef, state = nnx.split(module, nnx.Param)

    @jax.jit
    @jax.grad
    def grad_merged(s):
        return jnp.sum(nnx.merge(graphdef, s).score(batch.inputs)[1] * batch.step_mask.reshape(-1))

    @jax.jit
    @jax.grad
    def grad_pure(p):
        return jnp.sum(prm.score(config, p, batch.inputs)[1] * batch.step_mask.reshape(-1))

    got = nnx.to_pure_dict(grad_merged(state))
    want = grad_pure(jax.tree.map(jnp.asarray, params))
    jax.tree.map(np.testing.assert_array_equal, got, want)

    out = module.save_pretrained(tmp_path / "again")
    jax.tree.map(np.testing.assert_array_equal, prm.load(out)[1], params)


def test_prm_module_init_matches_functional_init():
    """ProcessRewardModel(config, rngs=...) draws what prm.init draws from the same key."""
    config = qwen2_vl.tiny()
    module = ProcessRewardModel(config, head="hidden", rngs=nnx.Rngs(1))
    want = prm.init(config, nnx.Rngs(1).params(), head="hidden")
    jax.tree.map(np.testing.assert_array_equal, module.params(), want)
    with pytest.raises(ValueError, match="rngs"):
        ProcessRewardModel(config)


def test_docs_example_runs(tmp_path):
    """The example of docs/model_api.md runs as written (its output directory moved to tmp_path)."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "model_api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0].replace("/tmp/qwen2_vl_tiny", str(tmp_path / "tiny")), "docs/model_api.md", "exec"),
         namespace)
    assert namespace["logits"].shape == (1, 5, 256) and namespace["bf16"].config.dtype == "bfloat16"
    assert jax.tree.structure(namespace["grads"]) == jax.tree.structure(namespace["params"])
    assert namespace["probs"].shape == (1,)
