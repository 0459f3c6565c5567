"""Training configurations: a frozen dataclass and presets as code."""

from dreamprm_jax.configs.presets import PRESETS, default, get, qwen2_vl_2b
from dreamprm_jax.configs.train_config import TrainConfig, add_arguments, from_arguments

__all__ = ["PRESETS", "TrainConfig", "add_arguments", "default", "from_arguments", "get", "qwen2_vl_2b"]
