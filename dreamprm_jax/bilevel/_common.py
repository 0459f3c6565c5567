"""Small helpers shared by the hypergradient methods (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_aux(params, opt_state, metrics, outer_loss_value, **extra) -> dict:
    """The aux dict every method returns (see :func:`dreamprm_jax.bilevel.hypergradient`)."""
    aux = {
        "params": params,
        "opt_state": opt_state,
        "inner_losses": metrics["loss"],
        "inner_grad_norms": metrics["grad_norm"],
        "outer_loss": outer_loss_value,
    }
    aux.update(extra)
    return aux


def is_inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def split_inexact(tree):
    """Split ``tree`` into (inexact leaves, other leaves, treedef); missing entries are None."""
    leaves, treedef = jax.tree.flatten(tree)
    diff = [x if is_inexact(x) else None for x in leaves]
    rest = [None if is_inexact(x) else x for x in leaves]
    return diff, rest, treedef


def merge_inexact(diff, rest, treedef):
    return jax.tree.unflatten(treedef, [d if r is None else r for d, r in zip(diff, rest)])


def tree_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def last_batch(inner_batches):
    return jax.tree.map(lambda x: x[-1], inner_batches)


def slice_batches(inner_batches, start: int, stop: int):
    return jax.tree.map(lambda x: x[start:stop], inner_batches)


def concrete_bool(x) -> bool | None:
    """``bool(x)`` if ``x`` is concrete, ``None`` under tracing (jit/vmap/grad)."""
    try:
        return bool(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        return None


def check_or_poison(g_alpha: Any, ok: jax.Array, message: str):
    """Raise ``FloatingPointError(message)`` when ``ok`` is concretely False; under tracing
    return ``g_alpha`` with every entry NaN where not ``ok`` (never silent zeros)."""
    verdict = concrete_bool(ok)
    if verdict is False:
        raise FloatingPointError(message)
    if verdict is None:
        return jax.tree.map(lambda g: jnp.where(ok, g, jnp.nan), g_alpha)
    return g_alpha
