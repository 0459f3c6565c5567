"""First-order (DARTS-style) hypergradients at the final inner parameters.

All three methods approximate the implicit-function hypergradient (see :mod:`implicit`)

    g = - (d^2 L_in / d alpha d phi)(phi*, alpha) [H^{-1}] v,    v = d L_out / d phi (phi*)

evaluated at ``phi* = phi_T`` (after the ``T`` unrolled steps) on the LAST inner batch,
replacing ``H^{-1}`` by a cheap matrix ``P``:

* ``darts``: Betty's ``betty/hypergradient/darts.py`` (leopard-ai/betty). With ``R`` =
  ``darts_alpha`` (Betty's default 0.01) and ``eps = R / ||v||``:

      g = -lr_eff * ( d_alpha L_in(phi_T + eps v, alpha) - d_alpha L_in(phi_T - eps v, alpha) ) / (2 eps)

  Betty computes ``(grad_n - grad_p) / (2 eps)``, i.e. exactly this with ``lr_eff = 1``
  (``P = I``: the inverse Hessian is taken as the identity; no learning rate). That is our
  default. ``lr_eff = xi`` gives the DARTS paper's one-step form ``P = xi I`` (for one SGD
  step of size ``xi`` from the point where the mixed derivative is taken, it is exact).
  Betty adds the result to the direct gradient of the outer loss w.r.t. alpha, which is
  zero here (``outer_loss`` does not take ``alpha``).
* ``darts_exact``: the same quantity with the finite difference replaced by an exact
  mixed Hessian-vector product (``jvp`` over ``phi`` of ``grad_alpha L_in``): no ``eps``.
  ``darts`` -> ``darts_exact`` as ``R -> 0`` (error ``O(R^2)`` plus rounding ``O(u / R)``).
* ``sama``: DARTS with ``v`` preconditioned by the optimizer's own update map,
  ``v' = (d Delta / d g)^T v`` with ``Delta(g) = optimizer.update(g, s_{T-1}, phi_{T-1})``
  at the last inner step, computed as an exact VJP; then ``eps = R / ||v'||`` and
  ``g = (d_alpha L_in(phi + eps v') - d_alpha L_in(phi - eps v')) / (2 eps)`` (``Delta``
  already carries ``-lr``). For AdamW, ``-(d Delta/d g) = lr_t * diag(du/dg)`` with
  ``u = m_hat / (sqrt(v_hat + eps_root) + eps)``. Differences from Betty's SAMA
  (``betty/hypergradient/utils.py:precondition_adam``): Betty uses the uncorrected
  moments ``m, v`` (no ``1 - beta^t`` bias correction), replaces
  ``sqrt(v) (sqrt(v) + eps)^2`` by ``(sqrt(v) + eps)^3``, ignores ``eps_root``, and uses
  the param group's base ``lr`` rather than the scheduled one; here the exact derivative of
  the optax update at that step is used, so any optax optimizer works. Betty's SAMA
  also adds ``1e-12`` to ``||v'||``; we use ``eps = R / max(||v'||, tiny)``, giving g = 0
  for v' = 0.

Option ``point`` chooses where the mixed derivative is evaluated: ``"final"`` (``phi_T``,
Betty) or ``"previous"`` (``phi_{T-1}``, where the last inner gradient was taken; with
``T = 1`` and ``lr_eff`` = the SGD step, ``darts_exact`` / ``sama`` then equal ``exact``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamprm_jax.bilevel import _common
from dreamprm_jax.bilevel.inner import inner_step_with_grads, num_steps, unroll

__all__ = ["darts", "darts_exact", "sama"]


def _run(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, scan_unroll):
    """Unroll ``T - 1`` steps, take the last one explicitly (keeping ``phi_{T-1}, s_{T-1}, g_T``).

    ``scan_unroll`` is ``lax.scan``'s ``unroll`` for the ``T - 1`` steps (:func:`inner.unroll`).
    """
    T = num_steps(inner_batches)
    head = _common.slice_batches(inner_batches, 0, T - 1)
    b_last = _common.last_batch(inner_batches)
    if T > 1:
        p_prev, s_prev, m_head = unroll(inner_loss, optimizer, params, opt_state, alpha, head, scan_unroll=scan_unroll)
    else:
        p_prev, s_prev, m_head = params, opt_state, None
    p_T, s_T, m_last, g_last = inner_step_with_grads(inner_loss, optimizer, p_prev, s_prev, alpha, b_last)
    m_last = jax.tree.map(lambda x: x[None], m_last)
    metrics = m_last if m_head is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), m_head, m_last)
    lo, v = jax.value_and_grad(outer_loss)(p_T, outer_batch)
    return dict(p_prev=p_prev, s_prev=s_prev, p_T=p_T, s_T=s_T, g_last=g_last, b_last=b_last,
                metrics=metrics, outer_loss=lo, v=v)


def _point(run, point):
    if point == "final":
        return run["p_T"]
    if point == "previous":
        return run["p_prev"]
    raise ValueError(f"hypergradient darts family: option point must be 'final' or 'previous', got {point!r}")


def _grad_alpha(inner_loss, phi, alpha, batch):
    return jax.grad(inner_loss, argnums=1)(phi, alpha, batch)


def _central_difference(inner_loss, phi, alpha, batch, direction, radius):
    """``(d_alpha L(phi + e d) - d_alpha L(phi - e d)) / (2 e)`` with ``e = R / ||d||``."""
    norm = _common.tree_norm(direction)
    tiny = jnp.finfo(norm.dtype).tiny
    e = radius / jnp.maximum(norm, tiny)
    plus = jax.tree.map(lambda p, d: p + (e * d).astype(p.dtype), phi, direction)
    minus = jax.tree.map(lambda p, d: p - (e * d).astype(p.dtype), phi, direction)
    gp = _grad_alpha(inner_loss, plus, alpha, batch)
    gm = _grad_alpha(inner_loss, minus, alpha, batch)
    return jax.tree.map(lambda a, b: (a - b) / (2 * e), gp, gm), e, norm


def darts(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *,
          R=0.01, lr_eff=1.0, point="final", scan_unroll=1):
    """DARTS hypergradient (Betty's convention, see the module docstring):
    ``g = -lr_eff (d_a L_in(phi + eps v) - d_a L_in(phi - eps v)) / (2 eps)``, ``eps = R / ||v||``.

    ``scan_unroll``: ``lax.scan``'s ``unroll`` for the inner steps (``1``: the loop, ``True``: straight-line
    code; the same maths). Aux adds ``epsilon`` and ``v_norm``.
    """
    run = _run(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, scan_unroll)
    phi = _point(run, point)
    fd, e, vn = _central_difference(inner_loss, phi, alpha, run["b_last"], run["v"], R)
    g = jax.tree.map(lambda x: -lr_eff * x, fd)
    return g, _common.make_aux(run["p_T"], run["s_T"], run["metrics"], run["outer_loss"], epsilon=e, v_norm=vn)


def darts_exact(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *,
                lr_eff=1.0, point="final", scan_unroll=1):
    """``g = -lr_eff (d^2 L_in / d alpha d phi) v`` by an exact mixed Hessian-vector product:
    ``jvp`` over ``phi`` (direction ``v``) of ``grad_alpha L_in``. The ``R -> 0`` limit of ``darts``
    (``scan_unroll``: as in ``darts``)."""
    run = _run(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, scan_unroll)
    phi = _point(run, point)
    b = run["b_last"]
    _, mixed = jax.jvp(lambda p: _grad_alpha(inner_loss, p, alpha, b), (phi,), (run["v"],))
    g = jax.tree.map(lambda x: -lr_eff * x, mixed)
    aux = _common.make_aux(run["p_T"], run["s_T"], run["metrics"], run["outer_loss"], v_norm=_common.tree_norm(run["v"]))
    return g, aux


def sama(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *,
         R=0.01, point="final", finite_difference=True, scan_unroll=1):
    """SAMA: DARTS with ``v`` preconditioned by the exact derivative of the last optimizer update.

    ``v' = (d Delta / d g)^T v`` at ``(g_T, s_{T-1}, phi_{T-1})``;
    ``g = (d_a L_in(phi + eps v') - d_a L_in(phi - eps v')) / (2 eps)``, ``eps = R / ||v'||``
    (``finite_difference=False``: the exact mixed product ``(d^2 L_in / d a d phi) v'``).
    ``scan_unroll``: as in ``darts``. Aux adds ``epsilon``, ``v_norm`` and ``preconditioned_norm``.
    """
    run = _run(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, scan_unroll)
    phi = _point(run, point)
    b = run["b_last"]

    def delta(g):
        updates, _ = optimizer.update(g, run["s_prev"], run["p_prev"])
        return updates

    _, vjp = jax.vjp(delta, run["g_last"])
    (vp,) = vjp(jax.tree.map(lambda v, g: v.astype(g.dtype), run["v"], run["g_last"]))  # Delta carries -lr
    vn = _common.tree_norm(run["v"])
    if finite_difference:
        g, e, pn = _central_difference(inner_loss, phi, alpha, b, vp, R)
    else:
        _, g = jax.jvp(lambda p: _grad_alpha(inner_loss, p, alpha, b), (phi,), (vp,))
        e, pn = jnp.zeros(()), _common.tree_norm(vp)
    aux = _common.make_aux(run["p_T"], run["s_T"], run["metrics"], run["outer_loss"],
                           epsilon=e, v_norm=vn, preconditioned_norm=pn)
    return g, aux
