"""One entry point for every hypergradient method: :func:`hypergradient`.

Every method is a pure function

    method(inner_loss, outer_loss, optimizer, params, opt_state, alpha,
           inner_batches, outer_batch, **options) -> (g_alpha, aux)

where ``inner_loss(params, alpha, batch) -> scalar``, ``outer_loss(params, batch) -> scalar``,
``optimizer`` is the optax transformation of the inner steps and ``inner_batches`` is a
pytree whose leaves are stacked on a leading axis ``T``. Methods and their formulas:

====================  =========================================================  ==============
name                  computes                                                   module
====================  =========================================================  ==============
``exact``             reverse mode through the ``T``-step unroll, eq. (5)        unrolled
``exact_forward``     forward mode through the unroll, eq. (5)                   unrolled
``exact_lowmem``      reverse mode with recomputation, eq. (5), O(1) in T memory unrolled
``exact_reversible``  reverse mode over the inverted AdamW steps, eq. (5)        reversible
``truncated``         reverse mode through the last ``k`` steps                  unrolled
``darts``             ``-lr_eff * finite-diff mixed product`` (Betty)            darts
``darts_exact``       ``-lr_eff * (d2 L_in/da dphi) v`` (exact)                  darts
``sama``              DARTS with optimizer-preconditioned ``v``                  darts
``neumann``           implicit (6), Neumann series for ``H^{-1} v``              implicit
``cg``                implicit (6), conjugate gradient for ``H^{-1} v``          implicit
====================  =========================================================  ==============

``aux`` always holds ``params`` / ``opt_state`` after the ``T`` inner steps (so a training
loop never recomputes the unroll), ``inner_losses [T]``, ``inner_grad_norms [T]`` and
``outer_loss`` (at ``params``), plus per-method diagnostics (``epsilon``, ``v_norm``,
``residual``, ``solver_ok``, ...).

Every built-in method takes the option ``scan_unroll``, ``lax.scan``'s ``unroll`` for the inner
steps (``bilevel.unroll``): ``1`` (default) keeps the loop, ``True`` compiles straight-line
code; the same maths, a different program (smaller for ``exact``'s reverse pass on a large
model, larger for the forward-only unrolls).

Example::

    g, aux = hypergradient("exact", inner_loss, outer_loss, opt, params, opt_state, r,
                           inner_batches, outer_batch)
    step = jax.jit(functools.partial(hypergradient, "darts", inner_loss, outer_loss, opt, R=0.01))
"""

from __future__ import annotations

from typing import Callable

from dreamprm_jax.bilevel import darts as _darts
from dreamprm_jax.bilevel import implicit as _implicit
from dreamprm_jax.bilevel import reversible as _reversible
from dreamprm_jax.bilevel import unrolled as _unrolled

__all__ = ["hypergradient", "METHODS", "EXACT_METHODS", "register_method"]

METHODS: dict[str, Callable] = {
    "exact": _unrolled.exact,
    "exact_forward": _unrolled.exact_forward,
    "exact_lowmem": _unrolled.exact_lowmem,
    "exact_reversible": _reversible.exact_reversible,
    "truncated": _unrolled.truncated,
    "darts": _darts.darts,
    "darts_exact": _darts.darts_exact,
    "sama": _darts.sama,
    "neumann": _implicit.neumann,
    "cg": _implicit.cg,
}

#: Methods that compute the same number as ``exact`` (up to rounding).
EXACT_METHODS = ("exact", "exact_forward", "exact_lowmem", "exact_reversible")


def register_method(name: str, fn: Callable | None = None):
    """Register a new method under ``name`` (usable as a decorator)."""

    def deco(f):
        if name in METHODS:
            raise ValueError(f"hypergradient.register_method: method {name!r} is already registered")
        METHODS[name] = f
        return f

    return deco if fn is None else deco(fn)


def hypergradient(method, inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches,
                  outer_batch, **options):
    """Hypergradient ``d L_out / d alpha`` of one bilevel iteration by ``method``.

    Args:
      method: a name in :data:`METHODS` (see the module table).
      inner_loss: ``(params, alpha, batch) -> scalar`` lower-level loss.
      outer_loss: ``(params, batch) -> scalar`` upper-level loss (no direct ``alpha`` term).
      optimizer: optax transformation used for the inner steps.
      params, opt_state: inner state before the ``T`` steps.
      alpha: upper-level variable (pytree; DreamPRM: raw domain weights ``[K]``).
      inner_batches: pytree with leaves stacked ``[T, ...]``.
      outer_batch: one meta batch.
      **options: method options (``scan_unroll``, ``remat``, ``chunk_size``, ``k``, ``R``, ``lr_eff``,
        ``point``, ``step_size``, ``damping``, ``max_relative_residual``, ...); unknown
        options raise ``TypeError``.

    Returns:
      ``(g_alpha, aux)``: ``g_alpha`` has ``alpha``'s structure.
    """
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"hypergradient: unknown method {method!r}; expected one of {sorted(METHODS)}") from None
    return fn(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, **options)
