"""float32 master weights with bf16 compute (dreamprm_jax/bilevel/precision.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamprm_jax import bilevel


def _setup():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(k1, (64, 32), jnp.float32) * 0.1 + 0.05}
    x = jax.random.normal(k2, (16, 64), jnp.float32)
    y = jax.random.normal(k3, (16, 32), jnp.float32)
    loss = lambda p, x, y: jnp.mean(jnp.square(x.astype(p["w"].dtype) @ p["w"] - y.astype(p["w"].dtype)))
    return params, x, y, loss


def test_bf16_compute_returns_float32_grads_and_small_lr_moves_float32_params():
    params, x, y, loss = _setup()
    wrapped = bilevel.with_compute_dtype(loss)
    value, grads = jax.value_and_grad(wrapped)(params, x, y)
    assert value.dtype == jnp.float32 and grads["w"].dtype == jnp.float32
    opt = bilevel.inner_adamw(5e-7, weight_decay=0.0)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.float32
    changed = float(jnp.mean(new["w"] != params["w"]))
    assert changed >= 0.99, changed  # float32 resolves an lr 5e-7 Adam step (|update| ~ 5e-7)
    # contrast: the same update applied to bfloat16 storage is rounded away almost everywhere
    p16 = bilevel.cast_floating(params, jnp.bfloat16)
    new16 = optax.apply_updates(p16, updates)
    assert new16["w"].dtype == jnp.bfloat16
    changed16 = float(jnp.mean(new16["w"] != p16["w"]))
    assert changed16 <= 0.05, changed16


def test_cast_floating_leaves_integers_alone():
    tree = {"a": jnp.ones(2, jnp.float32), "ids": jnp.arange(3), "b": np.ones(2, np.float64)}
    out = bilevel.cast_floating(tree, jnp.bfloat16)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.bfloat16 and out["ids"].dtype == jnp.int32
