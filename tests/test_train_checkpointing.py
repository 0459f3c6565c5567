"""Tests for dreamprm_jax.train.checkpointing: bitwise round trips, retention, atomicity."""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamprm_jax.train.checkpointing import CheckpointConfig, Checkpointer, abstract_like
from dreamprm_jax.utils.jsonable import to_jsonable

sys.path.insert(0, os.path.dirname(__file__))
from _ckpt_worker import extra_at, state_at  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_ckpt_worker.py")


def assert_bitwise_equal(expected, actual):
    """Same tree structure, and per leaf the same dtype, shape and bytes (tolerance: exact)."""
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    flat_a = jax.tree.leaves(actual)
    for (path, e), a in zip(flat_e, flat_a):
        name = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(getattr(e, "dtype", np.float32), jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key), name
            e, a = jax.random.key_data(e), jax.random.key_data(a)
        e, a = np.asarray(e), np.asarray(a)
        assert e.dtype == a.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert e.shape == a.shape, f"{name}: shape {a.shape} != {e.shape}"
        assert e.tobytes() == a.tobytes(), f"{name}: bytes differ"


def rich_state():
    """Parameters, an optax AdamW state (NamedTuples), PRNG key data, several dtypes."""
    params = {"w": jax.random.normal(jax.random.key(1), (4, 3), jnp.float32),
              "b": jnp.linspace(-1, 1, 3, dtype=jnp.float32)}
    opt_state = optax.adamw(1e-3).init(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "alpha": jnp.array([0.0, -0.5, 1.25], jnp.float32),
        "bf16": jnp.array([1.0, 3.14159, -2.7e-3, 65504.0], jnp.bfloat16),
        "count": jnp.int32(-17),
        "rng": jax.random.key_data(jax.random.key(42)),  # uint32 [2]
        "typed_key": jax.random.key(7),
        "np_int64": np.arange(5, dtype=np.int64) * 2**40,
        "np_f64": np.array([np.pi, np.e]),
        "special": jnp.array([np.inf, -np.inf, np.nan, -0.0], jnp.float32),
    }


def test_round_trip_is_bitwise(tmp_path):
    state = rich_state()
    extra = {"sampler": {"position": np.int64(12), "order": np.arange(3)}, "config": {"lr": 5e-7, "name": "x"}}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.save(3, state, extra)
        step, restored, extra_back = ckpt.restore_latest(abstract_like(state))
    assert step == 3
    assert_bitwise_equal(state, restored)
    assert extra_back == {"sampler": {"position": 12, "order": [0, 1, 2]}, "config": {"lr": 5e-7, "name": "x"}}
    # numpy targets come back as numpy (int64 survives without jax x64)
    assert isinstance(restored["np_int64"], np.ndarray)
    assert isinstance(restored["params"]["w"], jax.Array)


def test_restore_with_concrete_target_and_without_target(tmp_path):
    state = state_at(5)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, force=True)
        _, from_concrete, extra = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, state))
        _, untargeted, _ = ckpt.restore_latest()
    assert extra == {}
    assert_bitwise_equal(state, from_concrete)
    assert_bitwise_equal(state, untargeted)


def test_dtype_mismatch_is_an_error_unless_cast_allowed(tmp_path):
    state = state_at(2)
    target = jax.eval_shape(lambda: state)
    target["alpha"] = jax.ShapeDtypeStruct((5,), jnp.bfloat16)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, force=True)
        with pytest.raises(ValueError, match=r"leaf 'alpha' is stored as float32.*bfloat16"):
            ckpt.restore_latest(target)
        _, cast, _ = ckpt.restore_latest(target, allow_cast=True)
    assert cast["alpha"].dtype == jnp.bfloat16
    # 0.02 is not representable in bf16: the cast value is within bf16 rounding (rtol 2**-8)
    np.testing.assert_allclose(np.asarray(cast["alpha"], np.float32), 0.02, rtol=2**-8)


def test_empty_directory_returns_none(tmp_path):
    with Checkpointer(tmp_path / "none_yet") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore_latest(jax.eval_shape(lambda: state_at(0))) is None
        with pytest.raises(FileNotFoundError, match="no committed checkpoint for step 4"):
            ckpt.restore(4)


def test_interval_keep_last_k_and_duplicate_steps(tmp_path):
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [ckpt.save(s, state_at(s), extra_at(s)) for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.save(7, state_at(7), extra_at(7), force=True)  # the final save
        assert not ckpt.save(7, state_at(7), force=True)  # already on disk: skipped
        assert ckpt.all_steps() == [6, 7]
        assert sorted(os.listdir(tmp_path)) == ["6", "7"]
        state6, extra6 = ckpt.restore(6, jax.eval_shape(lambda: state_at(6)))
    assert_bitwise_equal(state_at(6), state6)
    assert extra6 == extra_at(6)
    # a new Checkpointer on the same directory sees the same steps (resume)
    with Checkpointer(tmp_path, config=CheckpointConfig(save_every=2, keep=2)) as again:
        assert again.latest_step() == 7


def test_async_save_round_trip(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=True) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, state_at(s), extra_at(s))
        ckpt.wait_until_finished()
        step, state, extra = ckpt.restore_latest(jax.eval_shape(lambda: state_at(0)))
        assert ckpt.all_steps() == [3]
    assert step == 3 and extra == extra_at(3)
    assert_bitwise_equal(state_at(3), state)


def test_extra_must_be_json_able():
    assert to_jsonable({"a": (1, np.float32(0.5)), "b": jnp.arange(2)}, where="extra") == {"a": [1, 0.5], "b": [0, 1]}
    with pytest.raises(TypeError, match=r"extra\.cfg: value of type object"):
        to_jsonable({"cfg": object()}, where="extra")
    with pytest.raises(ValueError, match=r"extra\.loss: non-finite"):
        to_jsonable({"loss": float("nan")}, where="extra")


@pytest.mark.parametrize("where", ["after_create", "before_rename"])
def test_killed_mid_save_keeps_previous_checkpoint(tmp_path, where):
    """SIGKILL inside the save of step 2 (before any data / just before the commit rename)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, WORKER, "kill", str(tmp_path), where],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    leftovers = sorted(os.listdir(tmp_path))
    assert leftovers == ["1", "2.orbax-checkpoint-tmp"], leftovers  # killed inside the write of step 2

    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.all_steps() == [1]
        assert "2.orbax-checkpoint-tmp" not in os.listdir(tmp_path)  # cleaned at start-up
        step, state, extra = ckpt.restore_latest(jax.eval_shape(lambda: state_at(0)))
        assert step == 1 and extra == extra_at(1)
        assert_bitwise_equal(state_at(1), state)
        # training resumes: step 2 can be written again
        assert ckpt.save(2, state_at(2), extra_at(2))
        assert ckpt.all_steps() == [1, 2]
