"""Mixed precision as a policy: float32 storage, bfloat16 compute.

An inner learning rate of ``5e-7`` (DreamPRM) is below bfloat16's resolution: a weight of
magnitude ``|w|`` only moves when the update exceeds ``~|w| * 2^-9`` (bf16 has 8 bits of
significand), i.e. ``~2e-4`` for ``|w| ~ 0.1``. So parameters and optimizer state are
*stored* in float32 and only *cast* to bfloat16 inside the loss. The cast is
differentiable (its transpose casts the cotangent back), so gradients arrive in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["Policy", "cast_floating", "with_compute_dtype", "BF16_COMPUTE"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """``param_dtype`` for storage (params and optimizer state), ``compute_dtype`` inside the
    loss, ``output_dtype`` of the scalar returned."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.bfloat16
    output_dtype: Any = jnp.float32


BF16_COMPUTE = Policy()


def cast_floating(tree: Any, dtype) -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype``; integer / bool leaves are left alone."""

    def cast(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def with_compute_dtype(loss_fn: Callable, policy: Policy = BF16_COMPUTE, *, cast_args: bool = False) -> Callable:
    """Wrap ``loss_fn(params, *args)`` so ``params`` (and, with ``cast_args``, the other floating
    arguments) are cast to ``policy.compute_dtype`` inside, and the output to ``output_dtype``.

    ``jax.grad`` of the wrapped function w.r.t. float32 params returns float32 gradients.
    """

    @functools.wraps(loss_fn)
    def wrapped(params, *args, **kwargs):
        p = cast_floating(params, policy.compute_dtype)
        if cast_args:
            args = cast_floating(args, policy.compute_dtype)
        out = loss_fn(p, *args, **kwargs)
        return cast_floating(out, policy.output_dtype)

    return wrapped
