"""Config round trips: our dataclasses <-> both config.json layouts <-> transformers' class."""

import json

import pytest

from dreamprm_jax.models import qwen2_vl
from dreamprm_jax.models.qwen2_vl import Qwen2VLConfig

PRESETS = [qwen2_vl.qwen2_vl_2b, qwen2_vl.tiny, qwen2_vl.demo]

# The released Qwen/Qwen2-VL-2B-Instruct config.json (flat hub layout), written out by hand.
HUB_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
    "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def test_hub_2b_json_is_the_preset():
    assert Qwen2VLConfig.from_hf_dict(HUB_2B) == qwen2_vl.qwen2_vl_2b()


@pytest.mark.parametrize("preset", PRESETS)
def test_flat_layout_round_trip(preset):
    config = preset()
    d = json.loads(json.dumps(config.to_hf_dict()))
    assert Qwen2VLConfig.from_hf_dict(d) == config
    hash(config)  # usable as a jit static argument


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_reads_ours_and_we_read_its_nested_layout(preset, tmp_path):
    import transformers

    config = preset()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    hf = transformers.Qwen2VLConfig.from_pretrained(tmp_path)
    assert hf.text_config.hidden_size == config.text.hidden_size
    assert hf.text_config.num_key_value_heads == config.text.num_key_value_heads
    assert list(hf.text_config.rope_parameters["mrope_section"]) == list(config.text.mrope_section)
    assert hf.tie_word_embeddings == config.text.tie_word_embeddings
    assert hf.vision_config.in_channels == config.vision.in_channels
    assert hf.vision_config.patch_size == config.vision.patch_size
    assert hf.image_token_id == config.image_token_id
    # transformers 5 writes the nested layout (text_config / rope_parameters); read it back.
    out = tmp_path / "saved"
    hf.save_pretrained(out)
    nested = json.loads((out / "config.json").read_text())
    assert "text_config" in nested
    assert Qwen2VLConfig.from_hf_dict(nested) == config
    assert Qwen2VLConfig.from_hf_dict(hf.to_dict()) == config


def test_nested_layout_with_untied_head_and_policies():
    config = qwen2_vl.tiny(tie_word_embeddings=False, num_key_value_heads=1)
    d = config.to_hf_dict()
    nested = {k: v for k, v in d.items() if k in ("model_type", "vision_config", "image_token_id",
                                                   "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id", "tie_word_embeddings")}
    nested["text_config"] = {k: v for k, v in d.items() if k not in nested and k != "rope_scaling"}
    nested["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_theta"],
                                                "mrope_section": list(config.text.mrope_section)}
    back = Qwen2VLConfig.from_hf_dict(nested, dtype="bfloat16", remat="dots_saveable")
    assert back == config.replace(dtype="bfloat16", remat="dots_saveable")


def test_invalid_fields_are_named():
    with pytest.raises(ValueError, match="remat"):
        qwen2_vl.tiny(remat="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        qwen2_vl.tiny(dtype="int8")
    with pytest.raises(ValueError, match="mrope_section"):
        bad = dict(HUB_2B, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 25]})
        Qwen2VLConfig.from_hf_dict(bad)
    with pytest.raises(ValueError, match="image_token_id"):
        qwen2_vl.tiny(vocab_size=64, image_token_id=100)
