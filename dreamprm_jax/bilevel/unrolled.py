"""Hypergradients by differentiating through the unrolled inner loop.

With ``phi_T(alpha) = Step_T o ... o Step_1 (phi_0, s_0; alpha)`` (see :mod:`inner`), the
quantity all methods here compute is the total derivative

    g = d/d alpha  L_out(phi_T(alpha))
      = sum_{t=1..T} (d L_out / d phi_T) (d phi_T / d z_t) (d z_t / d alpha),   z_t = (phi_t, s_t)   (5)

i.e. the true gradient of what the training loop does (the optimizer state, the
schedule, weight decay and bias correction included), not an approximation of an
idealised ``argmin``.

* ``exact``: reverse mode through ``lax.scan`` (memory grows with ``T``: the carry at every
  step, plus, with ``second_order="reverse"``, the step's gradient tape unless ``remat``;
  with the default ``"mixed"``, only the step's inputs).
* ``exact_forward``: forward mode, one JVP per coordinate of ``alpha`` (``K`` domains), the
  tangents vmapped in chunks of ``chunk_size``; memory is that of ``chunk_size`` forward
  passes, independent of ``T``; cost ~ ``K / chunk_size`` unrolls of ``(1 + chunk_size)``
  JVP width.
* ``exact_lowmem``: reverse mode whose memory does not grow with ``T``: the backward sweep
  recomputes ``(phi_t, s_t)`` from ``(phi_0, s_0)`` for each ``t = T-1..0`` and takes one
  step's VJP there. Memory: two states and one step's activations; compute: ``T(T+1)/2``
  extra forward steps (quadratic in ``T``, cheap for DreamPRM's ``T = 5``); step 1's VJP is
  taken after the loop, for ``alpha`` only (``exact``'s ``peel_first``). Compare
  ``exact`` with ``remat=True`` (linear compute, memory ~ ``T`` carries) and
  ``exact_forward`` (linear in ``T``, ``K`` tangents).
* ``truncated``: reverse mode through only the last ``k`` steps; the first ``T - k`` run
  without gradient (``stop_gradient`` on ``(phi_{T-k}, s_{T-k})``). ``k = T`` is ``exact``.

``exact``, ``exact_lowmem`` and ``truncated`` take ``second_order``: how reverse mode gets
through each step's gradient ``grad_phi L_in``. ``"mixed"`` (the default) computes the step's
VJP as one forward-over-reverse Hessian-vector product (:func:`inner.mixed_value_and_grad`);
``"reverse"`` differentiates ``jax.grad`` with ``jax.grad``. Same numbers up to rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from dreamprm_jax.bilevel import _common
from dreamprm_jax.bilevel.inner import batch_at, inner_step, num_steps, unroll

__all__ = ["exact", "exact_forward", "exact_lowmem", "truncated"]


def exact(
    inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *, remat=False,
    second_order="mixed", peel_first=True, scan_unroll=1,
):
    """Exact hypergradient (5) by reverse mode through the scan: ``jax.grad`` of
    ``alpha -> L_out(unroll(alpha))``.

    Options:
      remat: ``False`` | ``True`` | policy name | policy; ``jax.checkpoint`` on the scanned
        step so only the carry ``(phi_t, s_t)`` is kept per step.
      second_order: ``"mixed"`` (default: forward-over-reverse Hessian-vector products,
        :func:`inner.mixed_value_and_grad`: keeps only each step's inputs, not its
        activations, and recomputes the gradient with its tangent in the backward pass; the
        2B program needs about half the memory) or ``"reverse"`` (``jax.grad`` through each
        step's ``jax.grad``). The same numbers up to rounding.
      peel_first: take the first inner step outside the scan (``inner.unroll``), so that its
        reverse pass computes only the ``alpha`` part of its Hessian-vector product (the
        ``phi_0`` part is never needed): one inner gradient less per hypergradient, the same
        numbers (tests: ``tests/test_bilevel_hypergradient.py``). ``False``: the whole
        ``T``-step loop, a smaller program to compile.
      scan_unroll: ``lax.scan``'s ``unroll`` for the inner steps (:func:`inner.unroll`): ``1``
        keeps the loop, ``True`` the straight-line program; the same maths.
    """

    def objective(a):
        p, s, metrics = unroll(
            inner_loss, optimizer, params, opt_state, a, inner_batches, remat=remat, second_order=second_order,
            peel_first=peel_first, scan_unroll=scan_unroll,
        )
        lo = outer_loss(p, outer_batch)
        return lo, (p, s, metrics)

    (lo, (p, s, metrics)), g = jax.value_and_grad(objective, has_aux=True)(alpha)
    return g, _common.make_aux(p, s, metrics, lo)


def exact_forward(
    inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *, chunk_size=None,
    scan_unroll=1,
):
    """Exact hypergradient (5) in forward mode: ``g_k = jvp(alpha -> L_out(unroll(alpha)), e_k)``.

    The ``n = size(alpha)`` basis tangents are split in ``ceil(n / chunk_size)`` chunks
    (``None``: one chunk of ``n``), each chunk vmapped, chunks run in a ``lax.scan`` so only
    one chunk is live at a time. No tape is kept, so memory does not depend on ``T``.
    ``scan_unroll`` is :func:`exact`'s option.
    """
    flat, unravel = ravel_pytree(alpha)
    n = flat.shape[0]
    c = n if chunk_size is None else max(1, min(int(chunk_size), n))
    num_chunks = -(-n // c)
    eye = jnp.eye(num_chunks * c, n, dtype=flat.dtype)  # [chunks*c, n]; rows past n are zero
    tangents = eye.reshape(num_chunks, c, n)  # [chunks, c, n]

    def f(a_flat):
        p, s, metrics = unroll(inner_loss, optimizer, params, opt_state, unravel(a_flat), inner_batches,
                               scan_unroll=scan_unroll)
        return outer_loss(p, outer_batch), (p, s, metrics)

    def one_chunk(carry, tan):  # tan [c, n]
        def jvp_one(t):
            lo, dlo, aux = jax.jvp(f, (flat,), (t,), has_aux=True)
            return lo, dlo, aux

        lo, dlo, aux = jax.vmap(jvp_one, out_axes=(None, 0, None))(tan)
        return (lo, aux), dlo  # dlo [c]

    init = jax.eval_shape(lambda: f(flat))
    init = jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), init)
    (lo, (p, s, metrics)), dl = lax.scan(one_chunk, init, tangents)  # dl [chunks, c]
    g = unravel(dl.reshape(-1)[:n])
    return g, _common.make_aux(p, s, metrics, lo, chunk_size=c)


def exact_lowmem(
    inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *, second_order="mixed",
    scan_unroll=1,
):
    """Exact hypergradient (5) by reverse mode with recomputation (memory independent of ``T``).

    Adjoint recursion, with ``z_t = (phi_t, s_t)`` and ``z_t = F_t(z_{t-1}, alpha)``:

        zbar_T = (d L_out / d phi_T, 0)
        for t = T..1:  recompute z_{t-1} from z_0;  (zbar_{t-1}, abar_t) = vjp(F_t at z_{t-1}, alpha)(zbar_t)
        g = sum_t abar_t

    Integer leaves of the optimizer state (step counts) are carried, not differentiated.
    ``second_order`` is :func:`exact`'s option: how each step's VJP differentiates its gradient
    (``"mixed"`` keeps one forward-over-reverse pass live instead of the gradient's tape).
    ``scan_unroll`` is :func:`exact`'s option, for the forward trajectory.
    """
    T = num_steps(inner_batches)
    p_T, s_T, metrics = unroll(inner_loss, optimizer, params, opt_state, alpha, inner_batches, scan_unroll=scan_unroll)
    lo, p_bar = jax.value_and_grad(outer_loss)(p_T, outer_batch)
    s_diff_T, _, _ = _common.split_inexact(s_T)
    s_bar = [None if x is None else jnp.zeros_like(x) for x in s_diff_T]
    a_bar = jax.tree.map(jnp.zeros_like, alpha)

    def forward_to(t):
        def step(i, carry):
            p, s = carry
            p, s, _ = inner_step(inner_loss, optimizer, p, s, alpha, batch_at(inner_batches, i))
            return p, s

        return lax.fori_loop(0, t, step, (params, opt_state))

    def step_vjp(t, p_t, s_t, p_bar, s_bar):
        s_diff, s_rest, treedef = _common.split_inexact(s_t)
        b_t = batch_at(inner_batches, t)

        def f(p, sd, a):
            p2, s2, _ = inner_step(inner_loss, optimizer, p, _common.merge_inexact(sd, s_rest, treedef), a, b_t,
                                   second_order=second_order)
            return p2, _common.split_inexact(s2)[0]

        _, vjp = jax.vjp(f, p_t, s_diff, alpha)
        return vjp((p_bar, s_bar))

    def backward(i, carry):
        p_bar, s_bar, a_bar = carry
        t = T - 1 - i
        p_t, s_t = forward_to(t)
        pb, sb, ab = step_vjp(t, p_t, s_t, p_bar, s_bar)
        return pb, sb, jax.tree.map(jnp.add, a_bar, ab)

    # Steps T..2 in the loop; step 1 after it, where only its alpha part is used, so XLA drops
    # the (phi_0, s_0) part of its VJP (see ``exact``'s ``peel_first``).
    p_bar, s_bar, a_bar = lax.fori_loop(0, T - 1, backward, (p_bar, s_bar, a_bar))
    _, _, ab = step_vjp(0, params, opt_state, p_bar, s_bar)
    g = jax.tree.map(jnp.add, a_bar, ab)
    return g, _common.make_aux(p_T, s_T, metrics, lo)


def truncated(
    inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *, k=1, remat=False,
    second_order="mixed", scan_unroll=1,
):
    """Truncated back-propagation: reverse mode through only the last ``k`` of ``T`` steps,

        g_k = d/d alpha L_out(F_T o ... o F_{T-k+1}(sg(z_{T-k}), alpha)),   sg = stop_gradient,

    so the terms ``t <= T - k`` of (5) are dropped. ``k >= T`` equals ``exact``.
    ``remat``, ``second_order`` and ``scan_unroll`` are :func:`exact`'s options.
    """
    T = num_steps(inner_batches)
    k = int(k)
    if k < 1:
        raise ValueError(f"hypergradient 'truncated': option k must be >= 1, got {k}")
    if k >= T:
        return exact(inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, remat=remat,
                     second_order=second_order, scan_unroll=scan_unroll)
    head = _common.slice_batches(inner_batches, 0, T - k)
    tail = _common.slice_batches(inner_batches, T - k, T)
    p0, s0, m_head = unroll(inner_loss, optimizer, params, opt_state, alpha, head, scan_unroll=scan_unroll)
    p0, s0 = lax.stop_gradient((p0, s0))
    g, aux = exact(inner_loss, outer_loss, optimizer, p0, s0, alpha, tail, outer_batch, remat=remat,
                   second_order=second_order, scan_unroll=scan_unroll)
    for key, name in (("inner_losses", "loss"), ("inner_grad_norms", "grad_norm")):
        aux[key] = jnp.concatenate([m_head[name], aux[key]])
    aux["k"] = k
    return g, aux
