"""The lower level as a pure function: one optimizer step, and ``T`` of them under ``lax.scan``.

An inner step is

    g_t        = grad_phi L_in(phi_{t-1}, alpha, batch_t)
    u_t, s_t   = optimizer.update(g_t, s_{t-1}, phi_{t-1})
    phi_t      = phi_{t-1} + u_t

with an optax optimizer, so ``phi_T`` is a differentiable function of ``alpha`` (and of
the initial ``phi_0, s_0``). Everything is explicit state: no globals, no mutation.

Why ``eps_root`` matters (see :func:`inner_adamw`): Adam divides by
``sqrt(v_hat + eps_root) + eps``. A parameter whose gradient is exactly zero (a frozen or
unused row, a padded embedding) has ``v = 0``; ``d sqrt(x)/dx = 1/(2 sqrt(x))`` is ``inf``
at ``x = 0`` and the chain rule produces ``0 * inf = NaN`` in the hypergradient. With
``eps_root > 0`` the derivative at ``v = 0`` is ``1/(2 sqrt(eps_root))``, finite.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from dreamprm_jax.utils.remat import apply_remat

__all__ = [
    "inner_adamw",
    "AdamWConstants",
    "ReversibleAdamW",
    "step_lr",
    "inner_step",
    "inner_step_with_grads",
    "unroll",
    "num_steps",
    "batch_at",
    "mixed_value_and_grad",
    "SECOND_ORDER_MODES",
]

#: How reverse mode differentiates *through* an inner step's gradient (see :func:`mixed_value_and_grad`).
SECOND_ORDER_MODES = ("reverse", "mixed")

InnerLoss = Callable[[Any, Any, Any], jax.Array]


def step_lr(learning_rate: float, step_size: int = 5000, gamma: float = 0.5) -> optax.Schedule:
    """``torch.optim.lr_scheduler.StepLR`` (stepped once per inner step) as an optax schedule.

    ``lr(t) = learning_rate * gamma ** floor(t / step_size)``; the count lives in the
    optimizer state, so the schedule works unchanged inside ``lax.scan`` and under ``grad``.
    """
    return optax.exponential_decay(learning_rate, transition_steps=step_size, decay_rate=gamma, staircase=True)


class AdamWConstants(NamedTuple):
    """The constants of an :func:`inner_adamw` step: what undoing the step needs besides the state."""

    learning_rate: float | optax.Schedule
    b1: float
    b2: float
    eps: float
    eps_root: float
    weight_decay: float
    mask: Any = None


class ReversibleAdamW(NamedTuple):
    """An optax transformation (``init``, ``update``) that also carries its :class:`AdamWConstants`,
    so that a step can be inverted (:mod:`dreamprm_jax.bilevel.reversible`)."""

    init: Callable
    update: Callable
    constants: AdamWConstants


def inner_adamw(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float | None = None,
    weight_decay: float = 1e-2,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW for the inner loop, safe to differentiate through.

    The update is optax's ``adamw``::

        m_t = b1 m + (1 - b1) g,      v_t = b2 v + (1 - b2) g^2
        u_t = -lr_t ( m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay * phi )

    ``weight_decay = 1e-2`` is ``torch.optim.AdamW``'s default (the DreamPRM reference uses
    torch's AdamW).

    ``eps_root`` defaults to ``eps ** 2`` (1e-16 for the default ``eps``). Reasoning:

    * it makes ``d/dv sqrt(v + eps_root)`` finite at ``v = 0`` (``1 / (2 eps)``), so
      hypergradients stay finite for parameters with identically zero gradients
      (plain ``eps_root = 0`` gives ``0 * inf = NaN``);
    * ``sqrt(v + eps^2) <= sqrt(v) + eps``, so the denominator moves by at most ``eps``:
      the forward update changes only where ``sqrt(v_hat) <~ eps``, a regime the ``eps``
      term already dominates (at most a factor 2 there, invisible elsewhere);
    * ``1e-16`` is a normal float32 number, and the largest intermediate of the reverse
      pass at ``v = 0`` (``~1 / (2 eps^3) ~ 5e23``) is far inside the float32 range.

    Args:
      learning_rate: float or optax schedule (e.g. :func:`step_lr`).
      b1, b2, eps: Adam constants.
      eps_root: added under the square root; ``None`` means ``eps ** 2``.
      weight_decay: decoupled weight decay.
      mask: optional weight-decay mask (optax semantics).

    Returns:
      optax's ``adamw`` as a :class:`ReversibleAdamW` (the same ``init`` / ``update``, plus
      the constants the ``exact_reversible`` hypergradient inverts the step with).
    """
    if eps_root is None:
        eps_root = eps * eps
    if eps_root <= 0:
        raise ValueError(
            f"inner.inner_adamw: eps_root must be > 0 to keep hypergradients finite at v = 0, got {eps_root}"
        )
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask)
    return ReversibleAdamW(adamw.init, adamw.update,
                           AdamWConstants(learning_rate, b1, b2, eps, eps_root, weight_decay, mask))


def mixed_value_and_grad(inner_loss: InnerLoss) -> Callable:
    """``(params, alpha, batch) -> (L_in, grad_phi L_in)`` whose VJP is computed in forward-over-reverse mode.

    Reverse mode through an inner step needs the VJP of ``g(phi, alpha) = grad_phi L_in`` with
    a cotangent ``v``: ``(H_{phi phi} v, H_{alpha phi} v)``. Plain ``jax.grad`` gets it
    reverse-over-reverse, which stores every intermediate of the gradient computation (the
    forward activations *and* the backward pass's) at every unrolled step and reads them back.
    The Hessian of ``L_in`` in ``(phi, alpha)`` is symmetric, so the same two blocks are one
    JVP of the joint gradient ``G = grad_{(phi, alpha)} L_in`` along ``(v, 0)``:

        J_G (v, 0) = (H_{phi phi} v, H_{alpha phi} v)

    (the mixed-mode product of MixFlow-MG, Kemaev et al. 2025). The forward pass keeps only
    ``(phi, alpha, batch)``; the backward pass recomputes the gradient with its tangent. Same
    numbers as reverse-over-reverse up to rounding (float64 tests on an MLP and the tiny Qwen2-VL
    PRM: ``tests/test_bilevel_hypergradient.py``, ``tests/test_prm_hypergradient.py``). The
    loss output's cotangent ``c`` adds ``c * G``; zero cotangents arrive symbolic
    (``symbolic_zeros=True``), and when the loss is only a metric, as in the unrolled steps,
    the term is skipped and with it the primal weight gradients (XLA drops those matmuls).
    Forward-mode differentiation of the result is not defined (``jax.custom_vjp``):
    ``exact_forward`` uses the plain gradient.
    """

    @jax.custom_vjp
    def value_and_grad(params, alpha, batch):
        return jax.value_and_grad(inner_loss)(params, alpha, batch)

    def fwd(params, alpha, batch):  # arguments as CustomVJPPrimal pytrees (symbolic_zeros=True)
        params, alpha, batch = (_primal_values(x) for x in (params, alpha, batch))
        return value_and_grad(params, alpha, batch), (params, alpha, batch)

    def bwd(residuals, cotangents):
        params, alpha, batch = residuals
        ct_loss, ct_grads = cotangents
        ct_grads = jax.tree.map(lambda c, p: jnp.zeros_like(p) if isinstance(c, SymbolicZero) else c, ct_grads,
                                params, is_leaf=lambda c: isinstance(c, SymbolicZero))

        def joint_grad(p, a):
            return jax.grad(inner_loss, argnums=(0, 1))(p, a, batch)

        zero_alpha = jax.tree.map(jnp.zeros_like, alpha)
        (g_phi, g_alpha), (hv_phi, hv_alpha) = jax.jvp(joint_grad, (params, alpha), (ct_grads, zero_alpha))
        if isinstance(ct_loss, SymbolicZero):
            # The usual case (the loss is only a metric): without the ``c * G`` term nothing reads
            # the primal gradient ``g_phi``, so XLA drops its weight-gradient matmuls (x^T dy per
            # kernel), about a third of a backward pass per step.
            return hv_phi, hv_alpha, None
        ct_params = jax.tree.map(lambda h, g: h + (ct_loss * g).astype(h.dtype), hv_phi, g_phi)
        ct_alpha = jax.tree.map(lambda h, g: h + (ct_loss * g).astype(h.dtype), hv_alpha, g_alpha)
        return ct_params, ct_alpha, None  # no cotangent for the batch

    value_and_grad.defvjp(fwd, bwd, symbolic_zeros=True)
    return value_and_grad


def _primal_values(tree):
    return jax.tree.map(lambda x: x.value, tree, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))


def _value_and_grad(inner_loss: InnerLoss, second_order: str) -> Callable:
    if second_order == "reverse":
        return jax.value_and_grad(inner_loss)
    if second_order == "mixed":
        return mixed_value_and_grad(inner_loss)
    raise ValueError(f"inner: second_order must be one of {SECOND_ORDER_MODES}, got {second_order!r}")


def _apply_update(optimizer: optax.GradientTransformation, grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def inner_step_with_grads(
    inner_loss: InnerLoss,
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    alpha: Any,
    batch: Any,
    *,
    second_order: str = "reverse",
):
    """One inner step that also returns the gradient ``g_t`` (used by SAMA's preconditioner).

    ``second_order`` only changes how reverse mode differentiates through the step:
    ``"reverse"`` (``jax.grad`` of ``jax.grad``) or ``"mixed"`` (:func:`mixed_value_and_grad`).
    """
    loss, grads = _value_and_grad(inner_loss, second_order)(params, alpha, batch)

    # Rematerialised: reverse mode keeps the update's inputs (g, optimizer moments, params;
    # the params are kept for the gradient's VJP anyway) instead of AdamW's intermediates
    # (sqrt(v), 1 / denominator, m_hat, ...): per parameter 4 stacked residuals per unrolled
    # step instead of 7, recomputed elementwise in the backward pass. Same numbers.
    params, opt_state = jax.checkpoint(functools.partial(_apply_update, optimizer))(grads, opt_state, params)
    # Metrics under stop_gradient: a norm has a NaN derivative at 0, and reverse mode
    # multiplies even the unused outputs' zero cotangents through it.
    grad_norm = optax.tree.norm(lax.stop_gradient(grads))
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm}, grads


def inner_step(
    inner_loss: InnerLoss,
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    alpha: Any,
    batch: Any,
    *,
    second_order: str = "reverse",
):
    """One pure inner optimizer step.

    Args:
      inner_loss: ``(params, alpha, batch) -> scalar``.
      optimizer: optax transformation (its ``update`` receives ``params``, for weight decay).
      params, opt_state: current ``phi_{t-1}``, ``s_{t-1}``.
      alpha: upper-level variable (e.g. raw domain weights ``[K]``).
      batch: one inner batch (no leading ``T`` axis).
      second_order: ``"reverse"`` | ``"mixed"``: how reverse mode differentiates through the
        step's gradient (:func:`inner_step_with_grads`); the step itself is the same.

    Returns:
      ``(params, opt_state, metrics)`` with ``metrics = {"loss": L_in(phi_{t-1}),
      "grad_norm": ||g_t||}``.
    """
    params, opt_state, metrics, _ = inner_step_with_grads(
        inner_loss, optimizer, params, opt_state, alpha, batch, second_order=second_order
    )
    return params, opt_state, metrics


def num_steps(inner_batches: Any) -> int:
    """Length ``T`` of the leading axis shared by every leaf of ``inner_batches``."""
    leaves = jax.tree.leaves(inner_batches)
    if not leaves:
        raise ValueError("inner.num_steps: inner_batches has no array leaves; expected leaves stacked on [T, ...]")
    lengths = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in leaves}
    if len(lengths) != 1 or -1 in lengths:
        paths = [(jax.tree_util.keystr(p), jnp.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(inner_batches)]
        raise ValueError(f"inner.num_steps: inner_batches leaves must share a leading axis T; got shapes {paths}")
    return lengths.pop()


def batch_at(inner_batches: Any, t) -> Any:
    """Batch ``t`` (int or traced int) of a stack of batches."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, t, axis=0, keepdims=False), inner_batches)


def unroll(
    inner_loss: InnerLoss,
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    alpha: Any,
    inner_batches: Any,
    *,
    remat: Any = False,
    scan_unroll: int | bool = 1,
    second_order: str = "reverse",
    peel_first: bool = False,
):
    """``T`` inner steps with ``lax.scan`` over the leading axis of ``inner_batches``.

    Differentiating the result with respect to ``alpha`` in reverse mode stores the carry
    ``(phi_t, s_t)`` at every step, plus the step's activations unless ``remat`` is set,
    in which case ``jax.checkpoint`` recomputes them from the carry in the backward pass.

    ``scan_unroll`` is ``lax.scan``'s ``unroll``: ``1`` keeps the loop, ``True`` unrolls it into
    straight-line code (same maths), ``n`` runs ``n`` steps per loop iteration. The trade-off is
    per program: differentiated in reverse mode (the ``exact`` hypergradient), the loop stacks
    every step's residuals into ``[T, ...]`` buffers that the straight-line program does not
    need (2B ``exact``, one device: 315 GiB looped against 211 GiB unrolled,
    ``benchmarks.memory``); a forward-only unroll is the smaller program as a loop, and on the
    CPU demo the loop also compiles and runs faster. ``second_order`` is passed to :func:`inner_step`.

    ``peel_first`` takes step 1 outside the scan (same maths). For callers that differentiate
    with respect to ``alpha`` only (the hypergradient; ``phi_0, s_0`` are constants): reverse
    mode then needs step 1's VJP for ``alpha`` alone, ``H_{alpha phi} v``, a forward pass and
    its tangent, and outside the loop XLA drops the rest of that step's Hessian-vector product
    (the backward pass through the model and ``H_{phi phi} v``), which inside the loop body it
    must compute because the other iterations need it. Saves about one inner gradient per
    hypergradient; costs one more copy of the step in the compiled program.

    Returns:
      ``(params_T, opt_state_T, metrics)``; each metric is stacked ``[T]``.
    """
    T = num_steps(inner_batches)  # validates the stacking

    def body(carry, batch):
        p, s = carry
        p, s, metrics = inner_step(inner_loss, optimizer, p, s, alpha, batch, second_order=second_order)
        return (p, s), metrics

    body = apply_remat(body, remat)
    if peel_first and T > 1:
        (params, opt_state), first = body((params, opt_state), batch_at(inner_batches, 0))
        rest = jax.tree.map(lambda x: x[1:], inner_batches)
        (params, opt_state), metrics = lax.scan(body, (params, opt_state), rest, unroll=scan_unroll)
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, metrics)
        return params, opt_state, metrics
    (params, opt_state), metrics = lax.scan(body, (params, opt_state), inner_batches, unroll=scan_unroll)
    return params, opt_state, metrics
