"""Exact hypergradients through a *reversed* AdamW unroll: memory independent of ``T``, compute linear in ``T``.

An inner step of :func:`inner.inner_adamw` (optax's ``adamw``; ``c = t``, the step's count, and
``lr = lr(t - 1)``, the schedule at the count before the step)

    m_t = b1 m_{t-1} + (1 - b1) g_t,          v_t = b2 v_{t-1} + (1 - b2) g_t^2,     g_t = grad L_in(p_{t-1})
    d_t = (m_t / (1 - b1^c)) / (sqrt(v_t / (1 - b2^c) + eps_root) + eps)
    p_t = (1 - lr wd) p_{t-1} - lr d_t

is invertible in real arithmetic without the trajectory: ``d_t`` is a function of ``(m_t, v_t)``
alone, so

    p_{t-1} = (p_t + lr d_t) / (1 - lr wd),    g_t = grad L_in(p_{t-1}) (recomputed),
    m_{t-1} = (m_t - (1 - b1) g_t) / b1,       v_{t-1} = (v_t - (1 - b2) g_t^2) / b2

(``wd`` is 0 where the weight-decay mask is off; ``v_{t-1}`` is clipped at 0, where rounding
alone can take it). The reverse sweep of reverse mode walks ``z_t = (p_t, s_t)`` back from
``z_T`` this way and takes each step's VJP at the reconstructed ``z_{t-1}``: neither
``exact``'s stored trajectory nor ``exact_lowmem``'s recomputation from ``z_0`` (``T(T+1)/2``
extra steps).

Rounding: the reconstruction divides each step's rounding error in ``m`` by ``b1`` (and in ``v``
by ``b2``), so the reconstructed state drifts from the forward's by about ``b1^-k`` ulps after
``k`` reversed steps. From a fresh optimizer state (``m = v = 0``, a run's first iteration) the
second moment of an element whose gradient grows between steps holds the earlier, smaller
``g^2`` below its rounding, and undoing it cancels them: float32 hypergradients are then off by
~1e-5 (``T = 5``) to ~1e-2 (``T = 20``); from a warm state, by float32 ``exact``'s own rounding
(``docs/reversible.md``: ``python -m benchmarks.reversible_error``; ``tests/test_bilevel_reversible.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dreamprm_jax.bilevel import _common
from dreamprm_jax.bilevel.inner import (AdamWConstants, ReversibleAdamW, _value_and_grad, batch_at, num_steps,
                                        unroll)

__all__ = ["adamw_constants", "undo_update", "undo_moments", "adamw_vjp", "adamw_vjp_scaled", "reverse_unroll",
           "exact_reversible"]


def _is_node(x) -> bool:
    return isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def _nodes(opt_state, kind) -> list:
    return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_node) if isinstance(x, kind)]


def adamw_constants(optimizer, opt_state) -> AdamWConstants:
    """The :class:`inner.AdamWConstants` of ``optimizer``, checked against the layout of ``opt_state``.

    Raises ``ValueError`` unless ``optimizer`` is :func:`inner.inner_adamw`'s (a
    :class:`inner.ReversibleAdamW`, possibly wrapped by ``train.sharding.constrain_optimizer``)
    and ``opt_state`` holds exactly one Adam state (and one schedule count for a scheduled rate).
    """
    constants = getattr(optimizer, "constants", None) if isinstance(optimizer, ReversibleAdamW) else None
    if not isinstance(constants, AdamWConstants):
        raise ValueError(
            "hypergradient 'exact_reversible': the inner optimizer must be bilevel.inner_adamw(...) (a "
            f"ReversibleAdamW, whose constants invert a step), got {type(optimizer).__name__}; a chain with "
            "gradient clipping (train.step.inner_optimizer(grad_clip > 0)) cannot be inverted this way")
    adam = _nodes(opt_state, optax.ScaleByAdamState)
    schedules = _nodes(opt_state, optax.ScaleByScheduleState)
    if len(adam) != 1 or len(schedules) != (1 if callable(constants.learning_rate) else 0):
        raise ValueError(
            "hypergradient 'exact_reversible': opt_state must be inner_adamw's state (one ScaleByAdamState, and one "
            f"ScaleByScheduleState for a scheduled learning rate); found {len(adam)} and {len(schedules)}")
    return constants


def _step_constants(constants: AdamWConstants, opt_state):
    """``(lr, 1 - b1^c, 1 - b2^c, adam state)`` of the step that produced ``opt_state``."""
    (adam,) = _nodes(opt_state, optax.ScaleByAdamState)
    if callable(constants.learning_rate):
        (schedule,) = _nodes(opt_state, optax.ScaleByScheduleState)
        lr = constants.learning_rate(schedule.count - 1)  # the count before the step
    else:
        lr = constants.learning_rate
    return lr, 1 - constants.b1 ** adam.count, 1 - constants.b2 ** adam.count, adam


def _weight_decay_tree(constants: AdamWConstants, params):
    """Per-leaf weight decay: ``constants.weight_decay``, 0 where the mask is off (optax's mask semantics)."""
    if constants.mask is None:
        return jax.tree.map(lambda _: constants.weight_decay, params)
    mask = constants.mask(params) if callable(constants.mask) else constants.mask
    return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: constants.weight_decay if m else 0.0, sub),
                        mask, params)


def undo_update(constants: AdamWConstants, params, opt_state):
    """``p_{t-1} = (p_t + lr d_t) / (1 - lr wd)`` from the state ``(p_t, s_t)`` after step ``t``."""
    lr, bc1, bc2, adam = _step_constants(constants, opt_state)

    def one(p, m, v, wd):
        lr_ = jnp.asarray(lr, p.dtype)
        direction = (m / bc1.astype(p.dtype)) / (jnp.sqrt(v / bc2.astype(p.dtype) + constants.eps_root) + constants.eps)
        return (p + lr_ * direction) / (1 - lr_ * wd)

    return jax.tree.map(one, params, adam.mu, adam.nu, _weight_decay_tree(constants, params))


def undo_moments(constants: AdamWConstants, opt_state, grads):
    """``s_{t-1}`` from ``s_t`` and the step's gradient ``g_t``: moments and counts undone."""
    b1, b2 = constants.b1, constants.b2

    def previous(node):
        if isinstance(node, optax.ScaleByAdamState):
            mu = jax.tree.map(lambda m, g: (m - (1 - b1) * g) / b1, node.mu, grads)
            nu = jax.tree.map(lambda v, g: jnp.maximum((v - (1 - b2) * (g * g)) / b2, 0), node.nu, grads)
            return optax.ScaleByAdamState(count=node.count - 1, mu=mu, nu=nu)
        if isinstance(node, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(count=node.count - 1)
        return node

    return jax.tree.map(previous, opt_state, is_leaf=_is_node)


def _next_counts(opt_state):
    """``opt_state`` with its step counts advanced by one (the counts after the step)."""
    def advance(node):
        return node._replace(count=node.count + 1) if _is_node(node) else node

    return jax.tree.map(advance, opt_state, is_leaf=_is_node)


def adamw_vjp(constants: AdamWConstants, opt_state, grads, p_bar, s_bar):
    """VJP of the AdamW step from ``opt_state`` (``s_{t-1}``) with the gradient ``g_t``.

    With ``(pbar, mbar, vbar)`` the cotangents of ``(p_t, m_t, v_t)`` and
    ``den = sqrt(v_hat + eps_root) + eps``:

        mtilde = mbar - pbar lr / ((1 - b1^c) den)
        vtilde = vbar + pbar lr m_hat / (2 (1 - b2^c) den^2 sqrt(v_hat + eps_root))
        gbar = (1 - b1) mtilde + 2 (1 - b2) g vtilde
        mbar' = b1 mtilde,   vbar' = b2 vtilde,   pbar' = (1 - lr wd) pbar

    Returns ``(gbar, (mbar', vbar'), pbar')``. Written out rather than ``jax.vjp`` of the update
    (the same numbers to rounding: one elementwise expression per output instead of optax's
    transposed chain).
    """
    lr, bc1, bc2, adam = _step_constants(constants, _next_counts(opt_state))
    b1, b2 = constants.b1, constants.b2
    m_bar, v_bar = s_bar

    def one(g, m, v, pb, mb, vb, wd):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * (g * g)  # the step's m_t, v_t
        lr_ = jnp.asarray(lr, g.dtype)
        c1, c2 = bc1.astype(g.dtype), bc2.astype(g.dtype)
        root = jnp.sqrt(v / c2 + constants.eps_root)
        den = root + constants.eps
        m_tilde = mb - pb * lr_ / (c1 * den)
        v_tilde = vb + pb * lr_ * (m / c1) / (2 * c2 * den * den * root)
        return (1 - b1) * m_tilde + 2 * (1 - b2) * g * v_tilde, b1 * m_tilde, b2 * v_tilde, (1 - lr_ * wd) * pb

    out = jax.tree.map(one, grads, adam.mu, adam.nu, p_bar, m_bar, v_bar, _weight_decay_tree(constants, p_bar))
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
    return pick(0), (pick(1), pick(2)), pick(3)


def adamw_vjp_scaled(constants: AdamWConstants, opt_state, grads, p_bar, s_bar_scaled):
    """:func:`adamw_vjp` with the moment cotangents carried divided by ``b1``, ``b2``.

    With ``(M, V) = (mbar / b1, vbar / b2)`` the recursion of :func:`adamw_vjp` reads

        M' = b1 M - pbar lr / ((1 - b1^c) den)                           (mtilde)
        V' = b2 V + pbar lr m_hat / (2 (1 - b2^c) den^2 sqrt(v_hat + eps_root))   (vtilde)
        gbar = (1 - b1) M' + 2 (1 - b2) g V'

    so the carried adjoints are the new ``(M', V')`` themselves and ``gbar`` is computed from
    them: each is one elementwise update of its own buffer, and nothing but ``gbar`` is new
    (:func:`adamw_vjp` materialises ``mtilde`` and ``vtilde`` beside the old and the new
    cotangents). ``pbar' = (1 - lr wd) pbar`` is left to the caller (it adds the Hessian-vector
    product to it). Returns ``(gbar, (M', V'))``.
    """
    lr, bc1, bc2, adam = _step_constants(constants, _next_counts(opt_state))
    b1, b2 = constants.b1, constants.b2
    m_c, v_c = s_bar_scaled

    def one(g, m, v, pb, mc, vc):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * (g * g)  # the step's m_t, v_t
        lr_ = jnp.asarray(lr, g.dtype)
        c1, c2 = bc1.astype(g.dtype), bc2.astype(g.dtype)
        root = jnp.sqrt(v / c2 + constants.eps_root)
        den = root + constants.eps
        mc = b1 * mc - pb * lr_ / (c1 * den)
        vc = b2 * vc + pb * lr_ * (m / c1) / (2 * c2 * den * den * root)
        return (1 - b1) * mc + 2 * (1 - b2) * g * vc, mc, vc

    out = jax.tree.map(one, grads, adam.mu, adam.nu, p_bar, m_c, v_c)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
    return pick(0), (pick(1), pick(2))


def reverse_unroll(inner_loss, optimizer, params, opt_state, alpha, inner_batches):
    """``(phi_0, s_0)`` reconstructed from ``(phi_T, s_T)`` by ``T`` inverted steps (no adjoints).

    The inverse of :func:`inner.unroll` up to rounding: what ``exact_reversible`` walks through;
    the distance to the true ``(phi_0, s_0)`` measures the reconstruction's drift.
    """
    constants = adamw_constants(optimizer, opt_state)
    T = num_steps(inner_batches)

    def body(i, carry):
        p, s = carry
        p = undo_update(constants, p, s)
        g = jax.grad(inner_loss)(p, alpha, batch_at(inner_batches, T - 1 - i))
        return p, undo_moments(constants, s, g)

    return lax.fori_loop(0, T, body, (params, opt_state))


def _zeros_of(fn, *args):
    """Zeros shaped like ``fn(*args)`` (``fn`` traced for its shapes only)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *args))


def exact_reversible(
    inner_loss, outer_loss, optimizer, params, opt_state, alpha, inner_batches, outer_batch, *, second_order="mixed",
    reforward=True, scan_unroll=1, in_place=False,
):
    """Exact hypergradient (5) by reverse mode over the reversed AdamW unroll (module docstring).

    Adjoint recursion (``exact_lowmem``'s), with ``z_{t-1}`` reconstructed from ``z_t`` instead of
    recomputed from ``z_0``:

        zbar_T = (d L_out / d phi_T, 0)
        for t = T..1:  p_{t-1} = undo_update(z_t);  g_t = grad L_in(p_{t-1});  s_{t-1} = undo_moments(s_t, g_t)
                       (gbar, sbar_{t-1}, pbar') = vjp(AdamW update at (g_t, s_{t-1}, p_{t-1}))(zbar_t)
                       (pbar'', abar_t) = vjp(g at (p_{t-1}, alpha))(gbar);  pbar_{t-1} = pbar' + pbar''
        g = sum_t abar_t

    Each reversed step costs one inner gradient and one Hessian-vector product (``exact``'s
    VJP); step 1's VJP is taken after the loop, for ``alpha`` only (``exact``'s ``peel_first``).
    Memory: the walking state, its adjoint and one step's VJP, whatever ``T`` (2B, one device,
    ``benchmarks.memory``: 89.1 GiB at ``T`` = 3, 5 and 8; 71.7 with ``in_place``).

    Options:
      second_order: :func:`unrolled.exact`'s option (``"mixed"``: forward-over-reverse
        Hessian-vector products, :func:`inner.mixed_value_and_grad`; ``"reverse"``).
      reforward: ``True`` (default): the state after the ``T`` steps (``aux["params"]``,
        ``aux["opt_state"]``) is recomputed by ``T`` more inner steps from the reconstructed
        ``z_0``, so neither ``z_0`` nor ``z_T`` is kept through the reverse sweep: the smallest
        program (the input state's buffers are the walking state), the same ``z_T`` up to the
        reconstruction's rounding. ``False``: ``z_T`` of the first unroll, bitwise ``exact``'s,
        kept live through the sweep (one more copy of parameters and moments).
      scan_unroll: :func:`unrolled.exact`'s option, for the forward unrolls.
      in_place: ``False`` (default): the sweep above. ``True``: the same adjoints in an order XLA
        can run in place (2B, one device: 71.7 GiB at ``T`` = 3, 5 and 8 against 89.1,
        ``docs/reversible.md``): the moment cotangents carried divided by ``b1``, ``b2``
        (:func:`adamw_vjp_scaled`), the Hessian-vector product in a conditional of its own, and
        step 1 in the loop like the others (about one inner gradient more than the peeled step).
        The same numbers to rounding (float64 tests: 1e-10 relative to ``exact``).

    Requires :func:`inner.inner_adamw` as ``optimizer`` (:func:`adamw_constants`).
    """
    constants = adamw_constants(optimizer, opt_state)
    T = num_steps(inner_batches)
    value_and_grad = _value_and_grad(inner_loss, second_order)
    p_T, s_T, metrics = unroll(inner_loss, optimizer, params, opt_state, alpha, inner_batches, scan_unroll=scan_unroll)
    lo, p_bar = jax.value_and_grad(outer_loss)(p_T, outer_batch)
    s_bar = (jax.tree.map(jnp.zeros_like, p_bar), jax.tree.map(jnp.zeros_like, p_bar))  # (mbar_T, vbar_T): 0
    a_bar = jax.tree.map(jnp.zeros_like, alpha)

    def reverse_step(t, p, s, p_bar, s_bar):
        """``(z_t, zbar_t) -> (z_{t-1}, zbar_{t-1}, abar_t)`` for inner step ``t + 1`` (0-based batch ``t``)."""
        batch = batch_at(inner_batches, t)
        # Optimisation barriers order the phases (undo the update; gradient and undo the moments;
        # AdamW's VJP; Hessian-vector product), so that each phase's inputs can die there
        # (2B, one device: 89.1 GiB against 90.8 without them, benchmarks.memory).
        p_prev, s = lax.optimization_barrier((undo_update(constants, p, s), s))
        # The gradient at p_{t-1} and its VJP in one: the loss is an aux output, so its cotangent is a
        # symbolic zero and the mixed VJP skips the primal weight gradients.
        g, grad_vjp = jax.vjp(lambda q, a: value_and_grad(q, a, batch)[::-1], p_prev, alpha, has_aux=True)[:2]
        s_prev, g = lax.optimization_barrier((undo_moments(constants, s, g), g))
        g_bar, s_bar_prev, p_bar_prev = adamw_vjp(constants, s_prev, g, p_bar, s_bar)
        g_bar, s_bar_prev, p_bar_prev, p_prev, s_prev = lax.optimization_barrier(
            (g_bar, s_bar_prev, p_bar_prev, p_prev, s_prev))
        hv_p, hv_a = grad_vjp(g_bar)
        return p_prev, s_prev, jax.tree.map(jnp.add, p_bar_prev, hv_p), s_bar_prev, hv_a

    def reverse_step_in_place(t, p, s, p_bar, s_bar):
        """``reverse_step`` with ``s_bar = (mbar / b1, vbar / b2)`` (``in_place=True``)."""
        batch = batch_at(inner_batches, t)
        lr = _step_constants(constants, s)[0]
        p_prev = undo_update(constants, p, s)
        g, grad_vjp = jax.vjp(lambda q, a: value_and_grad(q, a, batch)[::-1], p_prev, alpha, has_aux=True)[:2]
        s_prev = undo_moments(constants, s, g)
        g_bar, s_bar = adamw_vjp_scaled(constants, s_prev, g, p_bar, s_bar)
        # The Hessian-vector product in a conditional that always runs (t >= 0): a branch is an XLA
        # computation of its own, so the zero-filled buffers its scans write their outputs into are
        # allocated there, when it runs, instead of at the top of the loop body, shared with the
        # gradient's scans (2B, one device: 71.7 GiB against 80.0 without it, benchmarks.memory).
        hv_p, hv_a = lax.cond(t >= 0, grad_vjp, functools.partial(_zeros_of, grad_vjp), g_bar)
        p_bar = jax.tree.map(lambda pb, h, wd: (1 - jnp.asarray(lr, pb.dtype) * wd) * pb + h, p_bar, hv_p,
                             _weight_decay_tree(constants, p_bar))
        return p_prev, s_prev, p_bar, s_bar, hv_a

    def backward(i, carry):
        p, s, p_bar, s_bar, a_bar = carry
        step = reverse_step_in_place if in_place else reverse_step
        p, s, p_bar, s_bar, ab = step(T - 1 - i, p, s, p_bar, s_bar)
        return p, s, p_bar, s_bar, jax.tree.map(jnp.add, a_bar, ab)

    if in_place:
        p_0, s_0, _, _, g = lax.fori_loop(0, T, backward, (p_T, s_T, p_bar, s_bar, a_bar))
        if reforward:
            p_T, s_T, _ = unroll(inner_loss, optimizer, p_0, s_0, alpha, inner_batches, scan_unroll=scan_unroll)
        return g, _common.make_aux(p_T, s_T, metrics, lo)

    # Steps T..2 in the loop; step 1 after it, where only its alpha part (and z_0) is used, so XLA
    # drops the phi part of its VJP.
    p_1, s_1, p_bar, s_bar, a_bar = lax.fori_loop(0, T - 1, backward, (p_T, s_T, p_bar, s_bar, a_bar))
    p_0, s_0, _, _, ab = reverse_step(0, p_1, s_1, p_bar, s_bar)
    g = jax.tree.map(jnp.add, a_bar, ab)
    if reforward:
        p_T, s_T, _ = unroll(inner_loss, optimizer, p_0, s_0, alpha, inner_batches, scan_unroll=scan_unroll)
    return g, _common.make_aux(p_T, s_T, metrics, lo)
