"""Hub-name <-> tree conversion: exact round trips through transformers' own state dict."""

import numpy as np
import pytest
import torch
import transformers

from dreamprm_jax.models import qwen2_vl
from dreamprm_jax.models.qwen2_vl import convert


def _hf_model(config):
    hf_config = transformers.Qwen2VLConfig(**config.to_hf_dict())
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(hf_config).eval()


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


@pytest.fixture(scope="module", params=["tied", "untied"])
def model_and_config(request):
    config = qwen2_vl.tiny(tie_word_embeddings=request.param == "tied", num_key_value_heads=1)
    return config, _hf_model(config)


def test_normalize_hf_name():
    assert convert.normalize_hf_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert convert.normalize_hf_name("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert convert.normalize_hf_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    for hub in ("model.norm.weight", "visual.merger.mlp.0.weight", "lm_head.weight"):
        assert convert.normalize_hf_name(hub) == hub


def test_tree_matches_contract_and_round_trips(model_and_config, tmp_path):
    config, model = model_and_config
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # transformers-5 names
    params = convert.params_from_hf(config, state.items())
    shapes = convert.param_shapes(config)
    got = {p: leaf.shape for p, leaf in _flatten(params)}
    want = {p: s for p, s in _flatten(shapes)}
    assert got == want
    assert all(leaf.dtype == np.float32 for _, leaf in _flatten(params))
    # exact layout rewrites (tolerance 0: pure copies / transposes)
    np.testing.assert_array_equal(
        params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][1],
        state["model.language_model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(
        params["visual"]["patch_embed"]["kernel"],
        state["model.visual.patch_embed.proj.weight"].reshape(config.vision.embed_dim, -1).T)
    back = dict(convert.hf_from_params(config, params))
    hub_state = {convert.normalize_hf_name(k): v for k, v in state.items()}
    if config.text.tie_word_embeddings:
        hub_state.pop("lm_head.weight")
    assert set(back) == set(hub_state)
    for name, value in back.items():
        np.testing.assert_array_equal(value, hub_state[name], err_msg=name)
    # transformers loads what we write (hub names) and gets the same weights (tolerance 0)
    import json
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(back, str(tmp_path / "model.safetensors"))
    loaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)


def test_errors_name_the_tensor(model_and_config):
    config, model = model_and_config
    state = {convert.normalize_hf_name(k): v.detach().numpy() for k, v in model.state_dict().items()}
    if config.text.tie_word_embeddings:
        state.pop("lm_head.weight")
    bad = dict(state)
    bad.pop("model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.down_proj\.weight"):
        convert.params_from_hf(config, bad.items())
    bad = dict(state, **{"visual.blocks.0.attn.qkv.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"visual\.blocks\.0\.attn\.qkv\.weight.*\(3, 3\).*expected \(96, 32\)"):
        convert.params_from_hf(config, bad.items())
    bad = dict(state, **{"model.layers.7.mlp.up_proj.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.7"):
        convert.params_from_hf(config, bad.items())
    bad = dict(state, **{"visual.extra.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'visual\.extra\.weight'"):
        convert.params_from_hf(config, bad.items())
