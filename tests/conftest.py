"""Shared pytest set-up: CPU only, a persistent compile cache so reruns skip XLA work."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# XLA's backend optimisation level 0 halves compile times of the second-order programs and
# leaves the numbers the tests compare unchanged; tests measure correctness, never speed.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "dreamprm_jax_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A generated benchmark with a handful of chains per domain (one per test module)."""
    from tests.tiny_run import tiny_benchmark

    return tiny_benchmark(tmp_path_factory.mktemp("synthetic"))
