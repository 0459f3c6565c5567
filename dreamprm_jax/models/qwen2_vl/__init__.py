"""Qwen2-VL in JAX: config, vision tower, M-RoPE decoder, hub-name conversion, checkpoints,
and the model as Flax NNX modules (:class:`Qwen2VL`, :mod:`.modules`).

    from dreamprm_jax.models import qwen2_vl
    config, params = qwen2_vl.load_checkpoint(path)      # local HF directory, safetensors only
    logits = qwen2_vl.logits(config, params, input_ids, attention_mask, pixel_values, image_grid_thw)

For training, prepare static-shape batches on the host and jit the pure forward:

    inputs = qwen2_vl.prepare_batch(config, input_ids, attention_mask, pixel_values, grid_thw,
                                    num_patches=bucket)      # a ModelInputs pytree
    out = jax.jit(qwen2_vl.forward)(config, params, inputs)  # config is a static pytree
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import (
    DTYPES,
    REMAT_POLICIES,
    Qwen2VLConfig,
    TextConfig,
    VisionConfig,
    demo,
    qwen2_vl_2b,
    tiny,
)
from .convert import hf_from_params, normalize_hf_name, param_shapes, params_from_hf
from .inputs import ROPE_FIELDS, ModelInputs
from .model import forward, hidden_states, init_params, lm_head, logits, prepare_batch, with_rope_tables
from .modules import Qwen2VL
from .rope import rope_index, vision_position_ids, vision_segment_ids

__all__ = [
    "DTYPES",
    "REMAT_POLICIES",
    "ROPE_FIELDS",
    "ModelInputs",
    "Qwen2VL",
    "Qwen2VLConfig",
    "TextConfig",
    "VisionConfig",
    "demo",
    "forward",
    "hf_from_params",
    "hidden_states",
    "init_params",
    "lm_head",
    "load_checkpoint",
    "logits",
    "normalize_hf_name",
    "param_shapes",
    "params_from_hf",
    "prepare_batch",
    "qwen2_vl_2b",
    "rope_index",
    "save_checkpoint",
    "tiny",
    "vision_position_ids",
    "vision_segment_ids",
    "with_rope_tables",
]
