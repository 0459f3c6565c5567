"""Tiny random transformers Qwen2-VL models for tests (torch: the oracle only).

Reuse from any test::

    from tests.tiny_hf import save_tiny_hf, hf_logits, tiny_inputs
    path = save_tiny_hf(tmp_path / "ckpt")                  # hub names, one model.safetensors
    path = save_tiny_hf(tmp_path / "v5", original_format=False)   # transformers-5 names
    path = save_tiny_hf(tmp_path / "sh", max_shard_size="20KB")   # sharded + index.json
    ids, mask, pix, grid = tiny_inputs()                    # numpy, one image per row
    ref = hf_logits(path, ids, mask, pix, grid)             # [B, L, V] float32 numpy

The model (``TINY``): vocab 128, hidden 32, 2 text layers (4 heads, 2 kv heads, head_dim 8,
mrope_section (2, 1, 1)), 2 vision blocks (embed 32, 4 heads), patch 14, temporal 2,
merge 2; special ids image 120, video 121, vision_start 122, vision_end 123. Builds and
saves in well under a second once torch is imported.
"""

from __future__ import annotations

import os

import numpy as np

#: Keyword arguments of transformers' Qwen2VLConfig for the tiny test model.
TINY = dict(
    text_config=dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
    ),
    vision_config=dict(
        depth=2,
        embed_dim=32,
        hidden_size=32,
        num_heads=4,
        mlp_ratio=2,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
    ),
    image_token_id=120,
    video_token_id=121,
    vision_start_token_id=122,
    vision_end_token_id=123,
)


def tiny_hf_config(tie_word_embeddings: bool = False, vocab_size: int | None = None, **special_ids):
    """transformers ``Qwen2VLConfig`` of the tiny model (optionally tied / another vocab)."""
    from transformers import Qwen2VLConfig

    kw = {**TINY, "text_config": dict(TINY["text_config"]), **special_ids}
    if vocab_size is not None:
        kw["text_config"]["vocab_size"] = vocab_size
    kw["text_config"]["tie_word_embeddings"] = tie_word_embeddings
    return Qwen2VLConfig(tie_word_embeddings=tie_word_embeddings, **kw)


def tiny_hf_model(seed: int = 0, **config_kw):
    """A random tiny ``Qwen2VLForConditionalGeneration`` in eval mode (float32).

    The default init leaves small weights; every float parameter is redrawn from
    N(0, 0.2^2) (norms around 1) so that logits differ visibly between tokens.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_hf_config(**config_kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return model


def save_tiny_hf(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    original_format: bool = True,
    max_shard_size: str | int | None = None,
    dtype: str | None = None,
    **config_kw,
) -> str:
    """Build a tiny random model and ``save_pretrained`` it into ``path``; returns ``path``.

    original_format=True writes hub names (``model.layers.*``, ``visual.*``, ``lm_head``);
    False writes transformers-5 names (``model.language_model.*``, ``model.visual.*``).
    max_shard_size (e.g. "20KB") forces sharded files + ``model.safetensors.index.json``.
    dtype ("bfloat16", ...) casts the weights before saving.
    """
    import torch

    model = tiny_hf_model(seed=seed, **config_kw)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    kwargs = {"save_original_format": original_format}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    path = os.fspath(path)
    model.save_pretrained(path, **kwargs)
    return path


def tiny_inputs(batch: int = 2, text_len: int = 6, grid_hw: tuple[int, int] = (4, 4), seed: int = 0,
                vocab_size: int = 118, image_token_id: int = 120, vision_start_token_id: int = 122,
                vision_end_token_id: int = 123, left_pad_last: int = 0):
    """Random HF-style inputs: each row ``<vs> <img>*n <ve> text``, one image per row.

    Returns numpy (input_ids int64 [B, L], attention_mask int64 [B, L],
    pixel_values float32 [B*h*w, 3*2*14*14], image_grid_thw int64 [B, 3]).
    ``left_pad_last`` > 0 right-pads the last row's text short by that many tokens
    (mask 0, pad id 0) to exercise padding.
    """
    rng = np.random.default_rng(seed)
    h, w = grid_hw
    n_img = h * w // 4
    rows = []
    for _ in range(batch):
        text = rng.integers(2, vocab_size, size=text_len)
        rows.append(np.concatenate([[vision_start_token_id], [image_token_id] * n_img, [vision_end_token_id], text]))
    ids = np.stack(rows).astype(np.int64)
    mask = np.ones_like(ids)
    if left_pad_last:
        ids[-1, -left_pad_last:] = 0
        mask[-1, -left_pad_last:] = 0
    pixel_values = rng.standard_normal((batch * h * w, 3 * 2 * 14 * 14)).astype(np.float32)
    grid = np.tile(np.array([[1, h, w]], dtype=np.int64), (batch, 1))
    return ids, mask, pixel_values, grid


def hf_logits(model_or_path, input_ids, attention_mask, pixel_values=None, image_grid_thw=None) -> np.ndarray:
    """Logits [B, L, V] (float32 numpy) of a transformers model or a saved directory."""
    import torch

    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(os.fspath(model_or_path), dtype=torch.float32).eval()
    else:
        model = model_or_path
    kw = {}
    if pixel_values is not None:
        # transformers 5 wants the modality of each token for M-RoPE: 1 image, 2 video, 0 text.
        ids = np.asarray(input_ids)
        mm = np.where(ids == model.config.image_token_id, 1, np.where(ids == model.config.video_token_id, 2, 0))
        kw = dict(pixel_values=torch.from_numpy(np.asarray(pixel_values, np.float32)),
                  image_grid_thw=torch.from_numpy(np.asarray(image_grid_thw, np.int64)),
                  mm_token_type_ids=torch.from_numpy(mm.astype(np.int64)))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(attention_mask, np.int64)), **kw)
    return out.logits.float().numpy()
