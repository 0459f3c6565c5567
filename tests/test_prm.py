"""The DreamPRM head: score equals DreamPRM's torch QwenVL_RM on the same weights and inputs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.models.qwen2_vl.checkpoint import CheckpointError
from tests.tiny_hf import hf_logits, save_tiny_hf, tiny_inputs

score_jit = jax.jit(prm.score, static_argnums=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = save_tiny_hf(tmp_path_factory.mktemp("prm") / "backbone", seed=1)
    config, backbone = qwen2_vl.load_checkpoint(path)
    params = prm.init(config, jax.random.PRNGKey(3), backbone=backbone)
    ids, mask, pix, grid = tiny_inputs(batch=3, left_pad_last=2, seed=2)
    ref_logits = hf_logits(path, ids, mask, pix, grid)  # [B, L, V] torch oracle
    batch = qwen2_vl.prepare_batch(config, ids, mask, pix, grid)
    return dict(path=path, config=config, params=params, batch=batch, mask=mask, ref_logits=ref_logits,
                inputs=(ids, mask, pix, grid))


def _torch_reward(vocab_logits, head):
    """DreamPRM's QwenVL_RM tail: nn.Linear(V, 1) on float32 logits, then sigmoid."""
    import torch

    lin = torch.nn.Linear(vocab_logits.shape[-1], 1)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.array(head["kernel"]).T.copy()))
        lin.bias.copy_(torch.from_numpy(np.array(head["bias"])))
        z = lin(torch.from_numpy(vocab_logits).float())[:, 0]
        return torch.sigmoid(z).numpy(), z.numpy()


def test_score_matches_torch_head(setup):
    probs, z = score_jit(setup["config"], setup["params"], setup["batch"])
    assert probs.shape == z.shape == (3,) and probs.dtype == z.dtype == jnp.float32
    last = setup["mask"].shape[1] - 1 - np.argmax(setup["mask"][:, ::-1], axis=1)  # last real token
    np.testing.assert_array_equal(np.asarray(prm.last_token_index(setup["mask"])), last)
    assert list(last) == [11, 11, 9]  # the third row is right-padded by 2
    ref_p, ref_z = _torch_reward(setup["ref_logits"][np.arange(3), last], setup["params"]["head"])
    np.testing.assert_allclose(np.asarray(z), ref_z, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(probs), ref_p, rtol=0, atol=1e-5)
    # DreamPRM itself reads logits[:, -1, :]: identical on the unpadded rows.
    ref_p_last, _ = _torch_reward(setup["ref_logits"][:, -1], setup["params"]["head"])
    np.testing.assert_allclose(np.asarray(probs)[:2], ref_p_last[:2], rtol=0, atol=1e-5)


def test_logit_is_log_odds_and_stays_finite(setup):
    """z = log(p/(1-p)) where p is not saturated; for a huge bias p == 1.0 but z stays exact."""
    probs, z = score_jit(setup["config"], setup["params"], setup["batch"])
    np.testing.assert_allclose(np.log(probs / (1 - probs)), z, rtol=0, atol=1e-4)
    params = dict(setup["params"], head=dict(setup["params"]["head"], bias=jnp.asarray([40.0])))
    p_sat, z_sat = score_jit(setup["config"], params, setup["batch"])
    assert np.all(np.asarray(p_sat) == 1.0)  # float32 sigmoid saturates ...
    np.testing.assert_allclose(np.asarray(z_sat), np.asarray(z) + 40.0 - float(setup["params"]["head"]["bias"][0]),
                               rtol=0, atol=1e-4)  # ... the logit does not


def test_gathered_head_equals_full_forward(setup):
    """lm_head on the gathered rows == the full [B, L, V] logits at the last real token (atol 1e-5)."""
    config, params, batch = setup["config"], setup["params"], setup["batch"]
    full = jax.jit(qwen2_vl.forward, static_argnums=0)(config, params["backbone"], batch)  # [B, L, V]
    last = prm.last_token_index(batch.attention_mask)
    z_full = prm.head_logit(full[jnp.arange(3), last], params["head"])
    _, z = score_jit(config, params, batch)
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_full), rtol=0, atol=1e-5)


def test_hidden_head_variant_and_grad(setup):
    config = setup["config"]
    params = prm.init(config, jax.random.PRNGKey(0), backbone=setup["params"]["backbone"], head="hidden")
    assert params["hidden_head"]["kernel"].shape == (config.text.hidden_size, 1) and "head" not in params
    probs, z = score_jit(config, params, setup["batch"])
    assert probs.shape == (3,) and np.all(np.isfinite(np.asarray(z)))
    # gradients reach both head and backbone (a small text-only batch keeps the compile cheap)
    text = qwen2_vl.prepare_batch(config, np.array([[5, 6, 7, 8], [9, 10, 11, 0]]), np.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
    loss = lambda p: jnp.mean((prm.score(config, p, text)[0] - 0.5) ** 2)  # noqa: E731
    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(g["hidden_head"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["backbone"]["language_model"]["norm"]["scale"]).sum()) > 0
    with pytest.raises(ValueError, match="exactly one head"):
        prm.score(config, {"backbone": params["backbone"]}, setup["batch"])


def test_save_load_round_trip_and_transformers_backbone(setup, tmp_path):
    config, params = setup["config"], setup["params"]
    out = prm.save(tmp_path / "prm", config, params)
    assert {"config.json", "model.safetensors", prm.HEAD_FILE} <= set(os.listdir(out))
    config2, params2 = prm.load(out)
    assert config2 == config
    np.testing.assert_array_equal(params2["head"]["kernel"], np.asarray(params["head"]["kernel"]))
    np.testing.assert_array_equal(params2["head"]["bias"], np.asarray(params["head"]["bias"]))
    ids, mask, pix, grid = setup["inputs"]
    np.testing.assert_allclose(hf_logits(out, ids, mask, pix, grid), setup["ref_logits"], rtol=0, atol=1e-4)
    # the head file is DreamPRM's nn.Linear layout
    from safetensors.numpy import load_file

    head = load_file(os.path.join(out, prm.HEAD_FILE))
    assert head["LN.weight"].shape == (1, config.text.vocab_size) and head["LN.bias"].shape == (1,)


def test_load_errors_name_the_head_file(setup, tmp_path):
    from safetensors.numpy import save_file

    out = prm.save(tmp_path / "bad", setup["config"], setup["params"])
    file = os.path.join(out, prm.HEAD_FILE)
    save_file({"LN.weight": np.zeros((1, 7), np.float32), "LN.bias": np.zeros((1,), np.float32)}, file)
    with pytest.raises(CheckpointError, match=r"prm_head\.safetensors: tensor 'LN\.weight' has shape \(1, 7\), expected \(1, 128\)"):
        prm.load(out)
    os.remove(file)
    with pytest.raises(CheckpointError, match=r"prm_head\.safetensors: missing"):
        prm.load(out)
