"""One DreamPRM bi-level iteration as a pure function of the training state.

    state = {params, opt_state, raw_weights, meta_opt_state, step}
    T inner AdamW steps on the PRM (domain-weighted MSE, weights w = softplus(r)/mean softplus(r))
    -> hypergradient dL_meta/dr by the chosen method -> one meta AdamW step on r.

The engine (:mod:`dreamprm_jax.bilevel`) sees only the two losses defined here; the model
sees nothing of the engine. The iteration is jitted once per batch shape bucket with the
state donated, so the T-step unroll and the meta update are one compiled program.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel import _common
from dreamprm_jax.data.types import MetaBatch, TrainBatch
from dreamprm_jax.models import prm, qwen2_vl

State = dict[str, Any]


def make_losses(model_config, aggregation: str, meta_loss: str = "chain_mse") -> tuple[Callable, Callable]:
    """The lower- and upper-level losses of DreamPRM over typed batches.

    inner_loss(params, r, batch: TrainBatch) = sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i
    outer_loss(params, batch: MetaBatch)     = mean_chains (sigmoid(A) - label)^2  (``chain_mse``),
        A = mean (or sum) over the chain's steps of the step logit z_s = log(p_s / (1 - p_s));
        or a ranking of A within each question (``listwise`` / ``pairwise``,
        :func:`dreamprm_jax.bilevel.meta_loss`).
    """
    if meta_loss not in bilevel.META_LOSSES:
        raise ValueError(f"make_losses: meta_loss must be one of {bilevel.META_LOSSES}, got {meta_loss!r}")

    def inner_loss(params, raw_weights, batch: TrainBatch):
        probs, _ = prm.score(model_config, params, batch.inputs)  # [B]
        return bilevel.weighted_mse(probs, batch.labels, batch.domain_ids, raw_weights, batch.sample_mask)

    def outer_loss(params, batch: MetaBatch):
        _, step_logits = prm.score(model_config, params, batch.inputs)  # [M * S]
        m, s = batch.step_mask.shape
        if meta_loss == "chain_mse":
            return bilevel.aggregation_loss(
                step_logits.reshape(m, s), batch.step_mask, batch.labels, batch.chain_mask, reduce=aggregation)
        return bilevel.meta_loss(meta_loss, step_logits.reshape(m, s), batch.step_mask, batch.labels,
                                 batch.chain_mask, batch.question_index, reduce=aggregation)

    return inner_loss, outer_loss


def inner_optimizer(lr: float, step_size: int, gamma: float, weight_decay: float, grad_clip: float = 0.0):
    """AdamW with the reference's StepLR schedule (lr * gamma ** floor(step / step_size))."""
    adamw = bilevel.inner_adamw(bilevel.step_lr(lr, step_size, gamma), weight_decay=weight_decay)
    if grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return adamw


CLIP_WINDOW = 32  # hypergradient norms remembered by clip_by_recent_median


class RecentNormsState(NamedTuple):
    norms: jax.Array  # [CLIP_WINDOW] float32, NaN where not filled yet
    count: jax.Array  # [] int32: hypergradients seen


def clip_by_recent_median(factor: float, window: int = CLIP_WINDOW) -> optax.GradientTransformation:
    """Scale a gradient down to ``factor`` times the median norm of the last ``window`` ones.

    Scale-free (no threshold to tune per model) and robust to the spikes themselves: the
    median ignores them, and the unclipped norm is what is remembered. The first gradient,
    with no history, passes unchanged.
    """
    if factor <= 0 or window < 1:
        raise ValueError(f"clip_by_recent_median: expected factor > 0 and window >= 1, got {factor}, {window}")

    def init(params):
        del params
        return RecentNormsState(jnp.full((window,), jnp.nan, jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        norm = _common.tree_norm(updates).astype(jnp.float32)
        limit = factor * jnp.nanmedian(state.norms)  # NaN before the first gradient
        scale = jnp.where(jnp.isfinite(limit) & (norm > limit), limit / jnp.maximum(norm, 1e-30), 1.0)
        norms = state.norms.at[state.count % window].set(norm)
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), RecentNormsState(norms, state.count + 1)

    return optax.GradientTransformation(init, update)


def meta_optimizer(lr: float, weight_decay: float, warmup: int = 0, clip: float = 0.0):
    """AdamW on the raw domain weights.

    ``warmup > 0``: the learning rate ramps linearly from 0 to ``lr`` over the first ``warmup``
    meta steps. ``clip > 0``: each hypergradient is first clipped to ``clip`` times the median
    norm of the last :data:`CLIP_WINDOW` (:func:`clip_by_recent_median`). Both keep their
    counts in the optimizer state, so a resumed run continues where it was.
    """
    if warmup < 0 or clip < 0:
        raise ValueError(f"meta_optimizer: warmup and clip must be >= 0, got {warmup}, {clip}")
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    adamw = optax.adamw(schedule, weight_decay=weight_decay)
    return optax.chain(clip_by_recent_median(clip), adamw) if clip > 0 else adamw


def init_state(params, num_domains: int, optimizer, meta_opt) -> State:
    raw_weights = jnp.zeros((num_domains,), jnp.float32)  # r = 0: all domains weigh 1
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "raw_weights": raw_weights,
        "meta_opt_state": meta_opt.init(raw_weights),
        "step": jnp.zeros((), jnp.int32),
    }


#: Methods whose program gets smaller when the inner scan is unrolled: ``exact`` runs reverse
#: mode through the T steps, and as a loop it stacks every step's residuals in ``[T, ...]``
#: buffers (2B, one device: 315 GiB looped, 211 unrolled). Every other method runs the unroll
#: forward only (``darts``, the implicit methods, ``exact_lowmem``'s trajectory, ``truncated``'s
#: head), where the loop is the smaller program: XLA schedules the straight-line T steps with
#: more of them live at once (2B ``darts``: 50 GiB looped, 81 unrolled).
UNROLL_PAYS_METHODS = ("exact",)


def inner_scan_unrolled(method: str, unroll_inner: bool, reweighting: bool = True) -> bool:
    """What ``make_bilevel_step(unroll_inner=...)`` does with the inner scan for ``method``:
    ``True`` (unrolled) only for :data:`UNROLL_PAYS_METHODS` with reweighting on, ``False``
    (a loop) otherwise."""
    return bool(unroll_inner) and reweighting and method in UNROLL_PAYS_METHODS


def make_bilevel_step(model_config, optimizer, meta_opt, *, method: str = "exact", aggregation: str = "mean",
                      reweighting: bool = True, method_options: dict | None = None,
                      unroll_inner: bool = False, meta_loss: str = "chain_mse") -> Callable:
    """Returns ``step(state, inner_batches, meta_batch) -> (state, metrics)`` (not jitted).

    ``inner_batches`` carries a leading axis of length T. With ``reweighting=False`` the
    domain weights stay at 1 (the vanilla PRM) and only the meta loss is evaluated.
    ``unroll_inner``: ``True`` unrolls the T-step inner scan into straight-line code where that
    saves memory (:func:`inner_scan_unrolled`: ``exact``; the other methods keep the loop),
    ``False`` keeps the loop (same maths either way). It sets the method option ``scan_unroll``
    (``bilevel.hypergradient``), which ``method_options`` must then leave unset. ``meta_loss``:
    the upper-level loss (:data:`dreamprm_jax.bilevel.META_LOSSES`; ranking losses need meta
    batches with ``question_index``).
    """
    inner_loss, outer_loss = make_losses(model_config, aggregation, meta_loss)
    options = dict(method_options or {})
    if inner_scan_unrolled(method, unroll_inner, reweighting):
        if "scan_unroll" in options:
            raise ValueError(f"make_bilevel_step: unroll_inner=True sets the {method!r} option scan_unroll; "
                             f"method_options must not set it too (got scan_unroll={options['scan_unroll']!r})")
        options["scan_unroll"] = True

    def step(state: State, inner_batches: TrainBatch, meta_batch: MetaBatch):
        # The rotary tables once per iteration, outside the unroll (see qwen2_vl.with_rope_tables).
        inner_batches = inner_batches.replace(inputs=qwen2_vl.with_rope_tables(model_config, inner_batches.inputs))
        meta_batch = meta_batch.replace(inputs=qwen2_vl.with_rope_tables(model_config, meta_batch.inputs))
        raw = state["raw_weights"]
        if reweighting:
            g_raw, aux = bilevel.hypergradient(
                method, inner_loss, outer_loss, optimizer, state["params"], state["opt_state"], raw,
                inner_batches, meta_batch, **options)
            updates, meta_opt_state = meta_opt.update(g_raw, state["meta_opt_state"], raw)
            raw = optax.apply_updates(raw, updates)
            params, opt_state = aux["params"], aux["opt_state"]
            meta_loss, inner_losses = aux["outer_loss"], aux["inner_losses"]
        else:
            params, opt_state, inner_metrics = bilevel.unroll(
                inner_loss, optimizer, state["params"], state["opt_state"], raw, inner_batches)
            inner_losses = inner_metrics["loss"]
            meta_loss = outer_loss(params, meta_batch)
            g_raw, meta_opt_state = jnp.zeros_like(raw), state["meta_opt_state"]
        new_state = {"params": params, "opt_state": opt_state, "raw_weights": raw,
                     "meta_opt_state": meta_opt_state, "step": state["step"] + 1}
        metrics = {
            "inner_loss": jnp.mean(inner_losses),
            "inner_loss_last": inner_losses[-1],
            "meta_loss": meta_loss,
            "hypergrad_norm": jnp.linalg.norm(g_raw),
            "hypergradient": g_raw,  # [K] d meta_loss / d raw weights (zeros without reweighting)
            "weights": bilevel.domain_weights(raw),
        }
        metrics["finite"] = jnp.isfinite(metrics["inner_loss"]) & jnp.isfinite(meta_loss) & jnp.all(jnp.isfinite(raw))
        return new_state, metrics

    return step


def jit_bilevel_step(step: Callable) -> Callable:
    """Jit at the boundary with the state donated (its buffers are reused for the new state)."""
    return jax.jit(step, donate_argnums=(0,))
