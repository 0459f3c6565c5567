"""Shared pytest set-up: CPU only, a persistent compile cache so reruns skip XLA work."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "dreamprm_jax_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
