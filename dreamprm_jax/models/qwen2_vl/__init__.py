"""Qwen2-VL in JAX: config, vision tower, M-RoPE decoder, hub-name conversion.

    from dreamprm_jax.models import qwen2_vl
    config, params = qwen2_vl.load_checkpoint(path)
    logits = qwen2_vl.logits(config, params, input_ids, attention_mask, pixel_values, image_grid_thw)
"""

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

try:  # the model lands after config/convert; keep the package importable meanwhile
    from .model import forward, hidden_states, init_params, lm_head, logits, prepare_batch
    from .rope import rope_index, vision_position_ids, vision_segment_ids
except ImportError:  # pragma: no cover
    pass

try:  # checkpoint.py is owned by helper PRM and may not exist yet
    from .checkpoint import load_checkpoint, save_checkpoint
except ImportError:  # pragma: no cover
    pass
