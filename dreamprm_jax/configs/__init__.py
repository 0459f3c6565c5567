"""Training configurations: a frozen dataclass and presets as code."""

from dreamprm_jax.configs.presets import PRESETS, default, get, qwen2_vl_2b
from dreamprm_jax.configs.train_config import TrainConfig, add_arguments, from_arguments, parse_override

__all__ = ["PRESETS", "TrainConfig", "add_arguments", "default", "from_arguments", "get", "parse_override", "qwen2_vl_2b"]
