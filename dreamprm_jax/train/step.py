"""One DreamPRM bi-level iteration as a pure function of the training state.

    state = {params, opt_state, raw_weights, meta_opt_state, step}
    T inner AdamW steps on the PRM (weighted MSE) -> hypergradient dL_meta/dr by the chosen
    method -> one meta AdamW step on r.

``raw_weights`` is the upper-level variable, a pytree whose form ``weighting`` chooses:

* ``"domain"``: ``[K]``, weights ``w = softplus(r) / mean softplus(r)`` per domain (DreamPRM);
* ``"instance_table"``: ``[N]``, one per training record, ``w_i = w_max sigmoid(r_i)``
  (:mod:`dreamprm_jax.bilevel.instance_weights`);
* ``"instance_net"``: the parameters of a small network from a record's loss and domain to
  its weight (:mod:`dreamprm_jax.bilevel.instance_net`); the losses are taken at the
  parameters the iteration starts from, before the unroll.

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
from dreamprm_jax.bilevel.instance_net import DEFAULT_HIDDEN
from dreamprm_jax.configs.train_config import WEIGHTINGS
from dreamprm_jax.data.types import MetaBatch, TrainBatch
from dreamprm_jax.models import prm, qwen2_vl

State = dict[str, Any]


def row_weights(weighting: str, upper, batch: TrainBatch, max_weight: float = bilevel.DEFAULT_MAX_WEIGHT,
                normalize: str = "none"):
    """``[..., B]`` weight of each row of ``batch`` under the upper-level variable ``upper``
    (``weighting``: one of :data:`WEIGHTINGS`); instance weights are then normalised within
    the batch as ``normalize`` says (:func:`dreamprm_jax.bilevel.normalize_row_weights`)."""
    if weighting == "domain":
        if normalize != "none":
            raise ValueError(f"row_weights: normalize={normalize!r} applies to instance weights only; domain "
                             "weights are normalised over the domains")
        return bilevel.sample_weights(upper, batch.domain_ids)
    w = _instance_row_weights(weighting, upper, batch, max_weight)  # [..., B]
    return bilevel.normalize_row_weights(w, batch.labels, batch.sample_mask, normalize)


def _instance_row_weights(weighting: str, upper, batch: TrainBatch, max_weight: float):
    if weighting == "instance_table":
        if batch.record_ids is None:
            raise ValueError("instance_table weighting: the training batch carries no record_ids; expected batches "
                             "from BatchBuilder (or collate_train(record_ids=...))")
        return bilevel.record_weights(upper, batch.record_ids, max_weight)
    if weighting == "instance_net":
        if batch.record_loss is None:
            raise ValueError("instance_net weighting: the training batch carries no record_loss; expected the "
                             "bi-level step to fill it (with_record_loss)")
        return bilevel.instance_net_weights(upper, batch.record_loss, batch.domain_ids, max_weight)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def with_record_loss(model_config, params, inner_batches: TrainBatch) -> TrainBatch:
    """``inner_batches [T, B]`` with ``record_loss``: each row's ``(p_i - y_i)^2`` under ``params``
    (the Instance Net's feature; no gradient flows through it)."""

    def one(batch: TrainBatch):
        probs, _ = prm.score(model_config, params, batch.inputs)  # [B]
        return jnp.square(probs - batch.labels.astype(probs.dtype))  # [B]

    return inner_batches.replace(record_loss=jax.lax.stop_gradient(jax.lax.map(one, inner_batches)))  # [T, B]


def make_losses(model_config, aggregation: str, meta_loss: str = "chain_mse", weighting: str = "domain",
                max_weight: float = bilevel.DEFAULT_MAX_WEIGHT, normalize: str = "none") -> tuple[Callable, Callable]:
    """The lower- and upper-level losses of DreamPRM over typed batches.

    inner_loss(params, r, batch: TrainBatch) = sum_i m_i w_i (p_i - y_i)^2 / sum_i m_i,
        w_i = w[d_i] (``weighting="domain"``) or the record's instance weight, normalised within
        the batch as ``normalize`` says (:func:`row_weights`)
    outer_loss(params, batch: MetaBatch)     = mean_chains (sigmoid(A) - label)^2  (``chain_mse``),
        A = mean (or sum) over the chain's steps of the step logit z_s = log(p_s / (1 - p_s));
        or a ranking of A within each question (``listwise`` / ``pairwise``,
        :func:`dreamprm_jax.bilevel.meta_loss`).
    """
    if meta_loss not in bilevel.META_LOSSES:
        raise ValueError(f"make_losses: meta_loss must be one of {bilevel.META_LOSSES}, got {meta_loss!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"make_losses: weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def inner_loss(params, raw_weights, batch: TrainBatch):
        probs, _ = prm.score(model_config, params, batch.inputs)  # [B]
        if weighting == "domain":
            return bilevel.weighted_mse(probs, batch.labels, batch.domain_ids, raw_weights, batch.sample_mask)
        w = row_weights(weighting, raw_weights, batch, max_weight, normalize)  # [B]
        return bilevel.sample_weighted_mse(probs, batch.labels, w, batch.sample_mask)

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


class SharedMomentState(NamedTuple):
    count: jax.Array  # [] int32: updates seen
    mu: Any           # first moment, shaped like the updates
    nu: jax.Array     # [] float32: running mean of the squared non-zero entries


def scale_by_shared_moment(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's scaling with one second moment for every entry instead of one per entry.

    ``nu`` tracks the mean of ``g**2`` over the *non-zero* entries of each update (so its size
    does not depend on how many entries a sparse update touches); the step is
    ``mu_hat / (sqrt(nu_hat) + eps)``. An entry's step then keeps its size relative to the
    others', where per-entry Adam gives every entry of a sparse update a step of about the
    same size: a record seen once with a tiny hypergradient moves as far as one with a large
    hypergradient.
    """

    def init(params):
        return SharedMomentState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                                 jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        square_sum = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
        nonzero = sum(jnp.sum((x != 0).astype(jnp.float32)) for x in leaves)
        mean_square = square_sum / jnp.maximum(nonzero, 1.0)
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = b2 * state.nu + (1 - b2) * mean_square
        t = count.astype(jnp.float32)
        scale = 1.0 / (jnp.sqrt(nu / (1 - b2 ** t)) + eps)  # []
        steps = jax.tree.map(lambda m: (m / (1 - b1 ** t) * scale).astype(m.dtype), mu)
        return steps, SharedMomentState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def meta_optimizer(lr: float, weight_decay: float, warmup: int = 0, clip: float = 0.0,
                   second_moment: str = "per_weight"):
    """AdamW on the upper-level variable (raw domain weights, instance table or net).

    ``second_moment="shared"``: :func:`scale_by_shared_moment` in place of Adam's per-entry
    scaling (then decoupled weight decay and the learning rate, as in AdamW).
    ``warmup > 0``: the learning rate ramps linearly from 0 to ``lr`` over the first ``warmup``
    meta steps. ``clip > 0``: each hypergradient is first clipped to ``clip`` times the median
    norm of the last :data:`CLIP_WINDOW` (:func:`clip_by_recent_median`). Both keep their
    counts in the optimizer state, so a resumed run continues where it was.
    """
    if warmup < 0 or clip < 0:
        raise ValueError(f"meta_optimizer: warmup and clip must be >= 0, got {warmup}, {clip}")
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    if second_moment == "per_weight":
        adamw = optax.adamw(schedule, weight_decay=weight_decay)
    elif second_moment == "shared":
        adamw = optax.chain(scale_by_shared_moment(), optax.add_decayed_weights(weight_decay),
                            optax.scale_by_learning_rate(schedule))
    else:
        raise ValueError(f"meta_optimizer: second_moment must be 'per_weight' or 'shared', got {second_moment!r}")
    return optax.chain(clip_by_recent_median(clip), adamw) if clip > 0 else adamw


def init_upper(weighting: str, *, num_domains: int, num_records: int = 0,
               max_weight: float = bilevel.DEFAULT_MAX_WEIGHT, hidden: int = DEFAULT_HIDDEN, seed: int = 0):
    """The upper-level variable at its cold start (every weight 1) for ``weighting``."""
    if weighting == "domain":
        return jnp.zeros((num_domains,), jnp.float32)  # r = 0: all domains weigh 1
    if weighting == "instance_table":
        return bilevel.init_raw_instance_weights(num_records, max_weight)
    if weighting == "instance_net":
        return bilevel.init_instance_net(jax.random.fold_in(jax.random.key(seed), 1), num_domains, hidden, max_weight)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def init_state(params, num_domains: int, optimizer, meta_opt, *, raw_weights=None) -> State:
    """The training state; ``raw_weights``: the upper-level variable (default ``[K]`` zeros,
    uniform domain weights; :func:`init_upper` for the other weightings)."""
    if raw_weights is None:
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
                      unroll_inner: bool = False, meta_loss: str = "chain_mse", weighting: str = "domain",
                      max_weight: float = bilevel.DEFAULT_MAX_WEIGHT, record_domains=None,
                      num_domains: int | None = None, instance_normalize: str = "none") -> Callable:
    """Returns ``step(state, inner_batches, meta_batch) -> (state, metrics)`` (not jitted).

    ``inner_batches`` carries a leading axis of length T. With ``reweighting=False`` the
    domain weights stay at 1 (the vanilla PRM) and only the meta loss is evaluated.
    ``unroll_inner``: ``True`` unrolls the T-step inner scan into straight-line code where that
    saves memory (:func:`inner_scan_unrolled`: ``exact``; the other methods keep the loop),
    ``False`` keeps the loop (same maths either way). It sets the method option ``scan_unroll``
    (``bilevel.hypergradient``), which ``method_options`` must then leave unset. ``meta_loss``:
    the upper-level loss (:data:`dreamprm_jax.bilevel.META_LOSSES`; ranking losses need meta
    batches with ``question_index``).

    ``weighting`` (:data:`WEIGHTINGS`) chooses the upper-level variable ``state["raw_weights"]``
    (module docstring; ``max_weight``: the instance weights' bound; ``instance_normalize``: how
    a batch's instance weights are normalised, :func:`row_weights`). With instance weights the
    metrics' ``weights`` are ``[K]`` per-domain means: over the whole table
    (``instance_table``; ``record_domains`` [N] int, each record's domain, is then required)
    or over the iteration's real training rows (``instance_net``; NaN for a domain with none);
    ``instance_weights`` holds the table's ``[N]`` weights or the rows' ``[T, B]`` weights, and
    ``hypergradient`` is ``[K]`` per domain for the table (the sum over its records: the
    derivative for one shift of all of them) and absent for the net.
    """
    inner_loss, outer_loss = make_losses(model_config, aggregation, meta_loss, weighting, max_weight,
                                         instance_normalize)
    if weighting == "instance_table" and record_domains is None:
        raise ValueError("make_bilevel_step: weighting='instance_table' needs record_domains ([N] int, each "
                         "training record's domain)")
    if weighting != "domain" and num_domains is None:
        raise ValueError(f"make_bilevel_step: weighting={weighting!r} needs num_domains")
    if record_domains is not None:
        record_domains = jnp.asarray(record_domains, jnp.int32)  # [N]
        domain_sizes = jax.ops.segment_sum(jnp.ones_like(record_domains, jnp.float32), record_domains,
                                           num_domains)  # [K]
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
        if weighting == "instance_net":  # the net's feature: each row's loss at phi_0, fixed through the unroll
            inner_batches = with_record_loss(model_config, state["params"], inner_batches)
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
            g_raw, meta_opt_state = jax.tree.map(jnp.zeros_like, raw), state["meta_opt_state"]
        new_state = {"params": params, "opt_state": opt_state, "raw_weights": raw,
                     "meta_opt_state": meta_opt_state, "step": state["step"] + 1}
        metrics = {
            "inner_loss": jnp.mean(inner_losses),
            "inner_loss_last": inner_losses[-1],
            "meta_loss": meta_loss,
        }
        if weighting == "domain":
            metrics["hypergrad_norm"] = jnp.linalg.norm(g_raw)
            metrics["hypergradient"] = g_raw  # [K] d meta_loss / d raw weights (zeros without reweighting)
            metrics["weights"] = bilevel.domain_weights(raw)
            raw_finite = jnp.all(jnp.isfinite(raw))
        else:
            metrics["hypergrad_norm"] = _common.tree_norm(g_raw)
            metrics.update(_instance_metrics(weighting, raw, g_raw, inner_batches))
            raw_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(raw)]))
        metrics["finite"] = jnp.isfinite(metrics["inner_loss"]) & jnp.isfinite(meta_loss) & raw_finite
        return new_state, metrics

    def _instance_metrics(weighting, raw, g_raw, inner_batches):
        if weighting == "instance_table":
            w = bilevel.instance_weights(raw, max_weight)  # [N]
            by_domain = jax.ops.segment_sum(w, record_domains, num_domains) / domain_sizes  # [K]
            g_domain = jax.ops.segment_sum(g_raw, record_domains, num_domains)  # [K]
            return {"weights": by_domain, "hypergradient": g_domain, "instance_weights": w}
        w = row_weights(weighting, raw, inner_batches, max_weight, instance_normalize)  # [T, B]
        m = inner_batches.sample_mask.astype(w.dtype)  # [T, B]
        d = inner_batches.domain_ids.reshape(-1)  # [T * B]
        total = jax.ops.segment_sum((m * w).reshape(-1), d, num_domains)  # [K]
        count = jax.ops.segment_sum(m.reshape(-1), d, num_domains)  # [K]
        by_domain = jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), jnp.nan)  # [K]
        return {"weights": by_domain, "instance_weights": jnp.where(m > 0, w, jnp.nan)}

    return step


def jit_bilevel_step(step: Callable) -> Callable:
    """Jit at the boundary with the state donated (its buffers are reused for the new state)."""
    return jax.jit(step, donate_argnums=(0,))
