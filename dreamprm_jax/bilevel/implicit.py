"""Implicit-function-theorem hypergradients at the final inner parameters.

If ``phi*(alpha)`` satisfies ``grad_phi L_in(phi*, alpha) = 0`` and the Hessian
``H = d^2 L_in / d phi^2`` is invertible there, then

    d phi* / d alpha = -H^{-1} (d^2 L_in / d phi d alpha)
    g = -(d^2 L_in / d alpha d phi) H^{-1} v,       v = d L_out / d phi (phi*)          (6)

evaluated here at ``phi* := phi_T`` (after the ``T`` unrolled steps) on the last inner
batch, with ``q ~= H^{-1} v`` from a few Hessian-vector products (forward-over-reverse,
optionally damped: ``H + damping I``):

* ``neumann`` (Lorraine et al. 2020; Betty's ``neumann.py``, ``neumann_alpha`` = ``step_size``):
  ``q = step_size * sum_{j=0..k} (I - step_size H)^j v``, convergent when
  ``0 < step_size < 2 / lambda_max(H)`` and ``H`` is positive definite.
* ``cg``: ``k`` conjugate-gradient iterations on ``H q = v`` from ``q_0 = 0``.

The final mixed product is one VJP: ``g = -vjp(alpha -> grad_phi L_in(phi_T, alpha))(q)``.

Diagnostics in aux: ``residual = ||H q - v|| / ||v||`` (relative residual of the linear
solve; ``1`` is what ``q = 0`` achieves), ``v_norm``, and for cg ``min_curvature`` (the
smallest ``p^T H p / p^T p`` met; negative means ``H`` is indefinite there).

Failure is loud: a non-finite ``g`` / residual, or ``residual > max_relative_residual``
(default 1: the solve did not reduce the residual), raises ``FloatingPointError`` when
the call is not traced; under ``jit`` the returned ``g`` is all-NaN instead (never zeros)
and ``aux["solver_ok"]`` is False. ``scan_unroll`` is ``lax.scan``'s ``unroll`` for the ``T`` steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dreamprm_jax.bilevel import _common
from dreamprm_jax.bilevel.inner import unroll
import optax

__all__ = ["neumann", "cg", "implicit_hypergradient"]


def _setup(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, damping,
           scan_unroll):
    p_T, s_T, metrics = unroll(inner_loss, optimizer, params, opt_state, alpha, inner_batches, scan_unroll=scan_unroll)
    lo, v = jax.value_and_grad(outer_loss)(p_T, outer_batch)
    b = _common.last_batch(inner_batches)
    grad_phi = lambda p: jax.grad(inner_loss)(p, alpha, b)
    _, hvp_lin = jax.linearize(grad_phi, p_T)

    def hvp(u):
        hu = hvp_lin(u)
        if damping:
            hu = jax.tree.map(lambda h, x: h + damping * x, hu, u)
        return hu

    return p_T, s_T, metrics, lo, v, b, hvp


def implicit_hypergradient(inner_loss, params, alpha, batch, q):
    """``-(d^2 L_in / d alpha d phi) q = -vjp(alpha -> grad_phi L_in(params, alpha, batch))(q)``."""
    _, vjp = jax.vjp(lambda a: jax.grad(inner_loss)(params, a, batch), alpha)
    (mixed,) = vjp(q)
    return jax.tree.map(jnp.negative, mixed)


def _finish(name, inner_loss, alpha, p_T, s_T, metrics, lo, v, b, hvp, q, max_relative_residual, extra):
    g = implicit_hypergradient(inner_loss, p_T, alpha, b, q)
    vn = _common.tree_norm(v)
    r = optax.tree.sub(hvp(q), v)
    rel = _common.tree_norm(r) / jnp.maximum(vn, jnp.finfo(vn.dtype).tiny)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)])) & jnp.isfinite(rel)
    ok = finite & (rel <= max_relative_residual)
    g = _common.check_or_poison(
        g, ok,
        f"hypergradient {name!r}: linear solve failed (relative residual ||Hq - v||/||v|| = {rel} "
        f"> max_relative_residual = {max_relative_residual}, or non-finite g); options {extra}. "
        "Use a smaller step_size / more iterations / damping, or another method.",
    )
    return g, _common.make_aux(p_T, s_T, metrics, lo, residual=rel, v_norm=vn, solver_ok=ok, **extra)


def neumann(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *,
            k=3, step_size=1.0, damping=0.0, max_relative_residual=1.0, scan_unroll=1):
    """Implicit hypergradient (6) with a ``k``-term Neumann series:
    ``q = step_size * sum_{j=0..k} (I - step_size H)^j v`` (``k`` HVPs; Betty's ``approx_inverse_hvp``)."""
    p_T, s_T, metrics, lo, v, b, hvp = _setup(
        inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, damping, scan_unroll)

    def body(_, carry):
        cur, acc = carry
        cur = jax.tree.map(lambda c, h: c - step_size * h, cur, hvp(cur))
        return cur, optax.tree.add(acc, cur)

    _, acc = lax.fori_loop(0, int(k), body, (v, v))
    q = optax.tree.scale(step_size, acc)
    return _finish("neumann", inner_loss, alpha, p_T, s_T, metrics, lo, v, b, hvp, q, max_relative_residual,
                   dict(k=int(k), step_size=step_size, damping=damping))


def cg(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *,
       k=3, damping=0.0, max_relative_residual=1.0, scan_unroll=1):
    """Implicit hypergradient (6) with ``k`` conjugate-gradient iterations on ``H q = v`` (``q_0 = 0``).

    Iterations whose residual is already zero are no-ops (safe divisions), so ``k`` larger
    than needed is harmless.
    """
    p_T, s_T, metrics, lo, v, b, hvp = _setup(
        inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, damping, scan_unroll)

    def safe_div(a, c):
        nz = c != 0
        return jnp.where(nz, a / jnp.where(nz, c, 1.0), 0.0)

    def body(_, carry):
        x, r, p, rs, min_curv = carry
        hp = hvp(p)
        php = optax.tree.vdot(p, hp)
        pp = optax.tree.vdot(p, p)
        step = safe_div(rs, php)
        x = optax.tree.add_scale(x, step, p)
        r = optax.tree.add_scale(r, -step, hp)
        rs_new = optax.tree.vdot(r, r)
        p = optax.tree.add_scale(r, safe_div(rs_new, rs), p)
        curv = jnp.where(pp > 0, safe_div(php, pp), min_curv)
        return x, r, p, rs_new, jnp.minimum(min_curv, curv)

    x0 = jax.tree.map(jnp.zeros_like, v)
    rs0 = optax.tree.vdot(v, v)
    init = (x0, v, v, rs0, jnp.asarray(jnp.inf, rs0.dtype))
    q, _, _, _, min_curv = lax.fori_loop(0, int(k), body, init)
    return _finish("cg", inner_loss, alpha, p_T, s_T, metrics, lo, v, b, hvp, q, max_relative_residual,
                   dict(k=int(k), damping=damping, min_curvature=min_curv))
