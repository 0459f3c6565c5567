"""One remat rule for the model's blocks and the engine's inner steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax.utils.remat import apply_remat, remat_policy


def test_settings_map_to_policies():
    assert remat_policy(None) == remat_policy(False) == remat_policy("none") == (False, None)
    assert remat_policy(True) == remat_policy("full") == (True, jax.checkpoint_policies.nothing_saveable)
    assert remat_policy("dots_saveable") == (True, jax.checkpoint_policies.dots_saveable)
    own = jax.checkpoint_policies.everything_saveable
    assert remat_policy(own) == (True, own)
    with pytest.raises(ValueError, match="'sometimes'"):
        remat_policy("sometimes")
    with pytest.raises(TypeError, match="int"):
        remat_policy(3)


@pytest.mark.parametrize("remat", ["none", "full", True, "dots_saveable"])
def test_gradients_do_not_depend_on_remat(remat):
    def f(x):
        return jnp.sum(jnp.tanh(x @ x.T) ** 2)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
    wrapped = apply_remat(f, remat)
    assert (wrapped is f) == (remat == "none")
    # same operations recomputed: equal to float32 rounding (atol 1e-6, rtol 1e-6)
    np.testing.assert_allclose(jax.grad(wrapped)(x), jax.grad(f)(x), atol=1e-6, rtol=1e-6)
