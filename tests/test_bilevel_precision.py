"""Why parameters and optimizer state are stored in float32: an inner AdamW step at
DreamPRM's learning rate 5e-7 (``bilevel.inner_adamw``) is resolved in float32 storage
and rounded away in bfloat16 storage (bf16 keeps 8 bits of significand)."""

import jax
import jax.numpy as jnp
import optax

from dreamprm_jax import bilevel


def test_small_lr_moves_float32_params_and_vanishes_in_bfloat16():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(k1, (64, 32), jnp.float32) * 0.1 + 0.05}
    x = jax.random.normal(k2, (16, 64), jnp.float32)
    y = jax.random.normal(k3, (16, 32), jnp.float32)
    grads = jax.grad(lambda p: jnp.mean(jnp.square(x @ p["w"] - y)))(params)
    opt = bilevel.inner_adamw(5e-7, weight_decay=0.0)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.float32
    changed = float(jnp.mean(new["w"] != params["w"]))
    assert changed >= 0.99, changed  # float32 resolves an lr 5e-7 Adam step (|update| ~ 5e-7)
    # the same update applied to bfloat16 storage is rounded away almost everywhere
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    new16 = optax.apply_updates(p16, updates)
    assert new16["w"].dtype == jnp.bfloat16
    changed16 = float(jnp.mean(new16["w"] != p16["w"]))
    assert changed16 <= 0.05, changed16
