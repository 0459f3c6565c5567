"""Checkpoint I/O: transformers-saved directories in, transformers-loadable directories out.

Every bad-input test asserts that the message names the file / tensor and the expectation.
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dreamprm_jax.models.qwen2_vl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.tiny_hf import hf_logits, save_tiny_hf, tiny_hf_model, tiny_inputs


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("hub") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def state_dict():
    """The hub-named float32 tensors of the seed-0 tiny model (the oracle)."""
    return {k: v.numpy() for k, v in _hub_state_dict(tiny_hf_model(seed=0)).items()}


def _hub_state_dict(model):
    # save_pretrained(original_format=True) is the canonical hub naming; read it back.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        import torch
        from safetensors.torch import load_file as load_torch

        return {k: v.to(torch.float32) for k, v in load_torch(os.path.join(d, "model.safetensors")).items()}


def _check_against(params, sd):
    lm, vis = params["language_model"], params["visual"]
    np.testing.assert_array_equal(lm["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(lm["layers"]["self_attn"]["q_proj"]["kernel"][1], sd["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(lm["layers"]["mlp"]["down_proj"]["kernel"][0], sd["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(vis["blocks"]["attn"]["qkv"]["bias"][1], sd["visual.blocks.1.attn.qkv.bias"])
    np.testing.assert_array_equal(vis["merger"]["mlp_2"]["kernel"], sd["visual.merger.mlp.2.weight"].T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    w = sd["visual.patch_embed.proj.weight"]
    np.testing.assert_array_equal(vis["patch_embed"]["kernel"], w.reshape(w.shape[0], -1).T)


# ----------------------------------------------------------------------------- good inputs
def test_load_hub_names_v5_names_and_shards(hub_dir, state_dict, tmp_path):
    config, params = load_checkpoint(hub_dir)
    assert config.text.num_hidden_layers == 2 and config.image_token_id == 120
    _check_against(params, state_dict)
    v5 = save_tiny_hf(tmp_path / "v5", seed=0, original_format=False)
    assert any(k.startswith("model.language_model.") for k in load_file(os.path.join(v5, "model.safetensors")))
    _check_against(load_checkpoint(v5)[1], state_dict)
    sharded = save_tiny_hf(tmp_path / "sharded", seed=0, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    _check_against(load_checkpoint(sharded)[1], state_dict)


def test_load_bf16_and_tied(tmp_path, state_dict):
    import ml_dtypes

    _, params = load_checkpoint(save_tiny_hf(tmp_path / "bf16", seed=0, dtype="bfloat16"))
    ref = state_dict["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    emb = params["language_model"]["embed_tokens"]["embedding"]
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, ref)  # bf16 -> f32 is exact
    config, params = load_checkpoint(save_tiny_hf(tmp_path / "tied", seed=0, tie_word_embeddings=True))
    assert config.text.tie_word_embeddings and "lm_head" not in params


def test_save_then_transformers_loads_same_logits(hub_dir, tmp_path):
    """Export -> Qwen2VLForConditionalGeneration.from_pretrained -> logits; torch parity <= 1e-4."""
    config, params = load_checkpoint(hub_dir)
    out = save_checkpoint(tmp_path / "export", config, params)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    ids, mask, pix, grid = tiny_inputs(left_pad_last=2)
    ref = hf_logits(hub_dir, ids, mask, pix, grid)
    got = hf_logits(out, ids, mask, pix, grid)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    # and our own reader gets the identical tree back
    config2, params2 = load_checkpoint(out)
    assert config2 == config
    np.testing.assert_array_equal(params2["visual"]["blocks"]["mlp"]["fc1"]["kernel"],
                                  params["visual"]["blocks"]["mlp"]["fc1"]["kernel"])


def test_save_tied_and_device_params(tmp_path):
    """Tied embeddings export without lm_head; jax (device) leaves are accepted."""
    import jax

    src = save_tiny_hf(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    config, params = load_checkpoint(src)
    out = save_checkpoint(tmp_path / "export", config, jax.device_put(params))
    assert "lm_head.weight" not in load_file(os.path.join(out, "model.safetensors"))
    ids, mask, pix, grid = tiny_inputs(batch=1)
    np.testing.assert_allclose(hf_logits(out, ids, mask, pix, grid), hf_logits(src, ids, mask, pix, grid),
                               rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- bad inputs
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(d, edit):
    file = os.path.join(d, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.*checkpoint directory does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "c")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(d)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickled_checkpoint_refused(hub_dir, tmp_path, name):
    d = _copy(hub_dir, tmp_path / "p")
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, name), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: pickled .* arbitrary code.*safetensors"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint(os.path.join(d, name))


def test_missing_tensor(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.1\.mlp\.up_proj\.weight \(64, 32\)"):
        load_checkpoint(d)


def test_unexpected_tensor(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "u")
    file = _rewrite(d, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(CheckpointError, match=rf"{file}: .*unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_checkpoint(d)


def test_wrong_shape(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "s")
    file = _rewrite(d, lambda t: t.__setitem__("model.norm.weight", np.ones((31,), np.float32)))
    with pytest.raises(CheckpointError, match=rf"{file}: .*'model\.norm\.weight' has shape \(31,\), expected \(32,\)"):
        load_checkpoint(d)


def test_wrong_dtype(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "d")
    file = _rewrite(d, lambda t: t.__setitem__("model.norm.weight", np.ones((32,), np.int64)))
    with pytest.raises(CheckpointError, match=rf"{file}: tensor 'model\.norm\.weight' has dtype I64; expected a floating"):
        load_checkpoint(d)


def test_config_weights_mismatch(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "cfg")
    cfg_file = os.path.join(d, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["text_config"]["num_hidden_layers"] = 3
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.2\..*config\.json"):
        load_checkpoint(d)
    cfg["text_config"]["num_hidden_layers"] = 2
    cfg["text_config"]["intermediate_size"] = 48
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*mlp.*has shape \((32, 64|64, 32)\), expected \((32, 48|48, 32)\).*config\.json"):
        load_checkpoint(d)


def test_corrupt_safetensors(hub_dir, tmp_path):
    d = _copy(hub_dir, tmp_path / "t")
    file = os.path.join(d, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(40)  # header length says more bytes than remain
    with pytest.raises(CheckpointError, match=rf"{file}: not a valid safetensors file .*truncated or corrupt"):
        load_checkpoint(d)


def test_index_points_at_missing_shard(tmp_path):
    d = save_tiny_hf(tmp_path / "sh", seed=0, max_shard_size="20KB")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(d, shard))
    with pytest.raises(CheckpointError, match=rf"{shard}: shard listed in .*index\.json.*does not exist"):
        load_checkpoint(d)
