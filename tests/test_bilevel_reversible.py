"""The reversed AdamW unroll (dreamprm_jax/bilevel/reversible.py) and its hypergradient ``exact_reversible``.

Exactness against ``exact`` in float64 (MLP, tiny transformer); the inverse of one AdamW step
(schedules, weight-decay masks, a constant rate); float32 rounding and how the reconstruction's
drift grows with ``T`` and ``1 / b1``. Every tolerance is stated in its assertion.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel import inner as inner_lib
from dreamprm_jax.bilevel import reversible
from tests import problems


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tree_rel_err(a, b):
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hypergradient(method, prob, batches, **options):
    inner, outer = batches
    fn = jax.jit(functools.partial(bilevel.hypergradient, method, prob.inner_loss, prob.outer_loss, prob.optimizer,
                                   **options))
    return fn(prob.params, prob.opt_state, prob.alpha, inner, outer)


def mlp_problem(*, inner_steps=4, b1=0.9, lr=None, seed=0):
    """Float64 MLP regression; AdamW with a StepLR boundary inside the unroll unless ``lr`` is given."""
    learning_rate = bilevel.step_lr(3e-2, step_size=2, gamma=0.5) if lr is None else lr
    opt = bilevel.inner_adamw(learning_rate, b1=b1, weight_decay=1e-2)
    prob = problems.mlp_regression(seed=seed, dtype=jnp.float64, num_domains=3, inner_steps=inner_steps,
                                   batch_size=8, outer_batch_size=16, in_dim=4, hidden=16, optimizer=opt)
    prob = dataclasses.replace(prob, alpha=jnp.array([0.3, -0.2, 0.1], jnp.float64))
    return prob, prob.sample_batches(jax.random.PRNGKey(1))


def as_float32(prob, batches):
    """The same problem and data in float32 (cast, not resampled)."""
    def cast(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    return dataclasses.replace(prob, params=cast(prob.params), opt_state=cast(prob.opt_state),
                               alpha=cast(prob.alpha)), cast(batches)


@pytest.fixture(scope="module")
def mlp(x64):
    return mlp_problem()


@pytest.fixture(scope="module")
def mlp_exact(mlp):
    prob, batches = mlp
    return hypergradient("exact", prob, batches)


@pytest.mark.parametrize("options", [{}, {"second_order": "reverse"}, {"reforward": False}, {"in_place": True},
                                     {"in_place": True, "second_order": "reverse", "reforward": False}])
def test_exact_reversible_matches_exact_float64(mlp, mlp_exact, options):
    """Same hypergradient as ``exact`` (rel err <= 1e-10, float64; 2e-12 measured), with and without
    ``in_place``; the state after the unroll is ``exact``'s bitwise without ``reforward``, to 1e-10
    relative with it."""
    prob, batches = mlp
    g_ref, aux_ref = mlp_exact
    g, aux = hypergradient("exact_reversible", prob, batches, **options)
    assert rel_err(g, g_ref) <= 1e-10, (options, g, g_ref)
    np.testing.assert_allclose(aux["outer_loss"], aux_ref["outer_loss"], rtol=1e-12)
    np.testing.assert_allclose(aux["inner_losses"], aux_ref["inner_losses"], rtol=1e-12)
    for a, b in zip(jax.tree.leaves((aux["params"], aux["opt_state"])),
                    jax.tree.leaves((aux_ref["params"], aux_ref["opt_state"]))):
        if options.get("reforward", True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("options", [{}, {"in_place": True}])
def test_exact_reversible_matches_finite_differences(mlp, options):
    """Central differences (h = 1e-5, float64) of the unrolled objective ``alpha -> L_out(unroll(alpha))``."""
    prob, batches = mlp
    fd = problems.central_fd(prob, batches)
    g, _ = hypergradient("exact_reversible", prob, batches, **options)
    assert rel_err(g, fd) <= 1e-5, (options, g, fd)


@pytest.mark.parametrize("warm_steps,tolerance", [(3, 1e-8), (0, 1e-5)])
def test_exact_reversible_matches_exact_tiny_transformer(x64, warm_steps, tolerance):
    """The one-block transformer (a PRM in miniature), T = 3, float64. From a warm optimizer state (3
    AdamW steps on other batches first, as in training, where the state carries over): rel err <= 1e-8.
    From a cold one (m_0 = v_0 = 0) the second moment of an element whose gradient grows ~1e4-fold
    between steps loses the earlier, smaller term to rounding (v_{t-1} = (v_t - (1 - b2) g_t^2) / b2
    cancels), and the error rises to ~1e-7: <= 1e-5."""
    opt = bilevel.inner_adamw(bilevel.step_lr(1e-2, 5000, 0.5), weight_decay=1e-2)
    prob = problems.tiny_transformer(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=3, batch_size=4,
                                     seq_len=5, vocab=8, embed=8, num_heads=2, num_chains=2, num_steps_per_chain=2,
                                     optimizer=opt)
    prob = dataclasses.replace(prob, alpha=jnp.array([0.2, -0.1, 0.0], jnp.float64))
    if warm_steps:
        warm, _ = prob.sample_batches(jax.random.PRNGKey(7))
        params, opt_state, _ = bilevel.unroll(prob.inner_loss, opt, prob.params, prob.opt_state, prob.alpha,
                                              jax.tree.map(lambda x: x[:warm_steps], warm))
        prob = dataclasses.replace(prob, params=params, opt_state=opt_state)
    batches = prob.sample_batches(jax.random.PRNGKey(3))
    g_ref, _ = hypergradient("exact", prob, batches)
    for in_place in (False, True):
        g, _ = hypergradient("exact_reversible", prob, batches, in_place=in_place)
        assert rel_err(g, g_ref) <= tolerance, (in_place, g, g_ref)


def test_adamw_vjp_scaled_is_adamw_vjp(x64):
    """The scaled recursion gives adamw_vjp's gbar and its moment cotangents times (1 / b1, 1 / b2)
    (float64, a weight-decay mask, a StepLR boundary; rel err <= 1e-13)."""
    opt = bilevel.inner_adamw(bilevel.step_lr(3e-2, step_size=1, gamma=0.5), weight_decay=0.1,
                              mask=lambda params: jax.tree.map(lambda x: x.ndim > 1, params))
    prob = problems.mlp_regression(seed=2, dtype=jnp.float64, num_domains=3, inner_steps=2, batch_size=8,
                                   in_dim=4, hidden=8, optimizer=opt)
    inner, _ = prob.sample_batches(jax.random.PRNGKey(0))
    alpha = jnp.array([0.3, -0.2, 0.1])
    p, s, _ = bilevel.unroll(prob.inner_loss, opt, prob.params, prob.opt_state, alpha, inner)
    g = jax.grad(prob.inner_loss)(p, alpha, inner_lib.batch_at(inner, 1))
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 3 * len(jax.tree.leaves(p))))
    p_bar, m_bar, v_bar = (jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), p)
                           for _ in range(3))
    constants = reversible.adamw_constants(opt, s)
    b1, b2 = constants.b1, constants.b2
    g_bar, (m_prev, v_prev), _ = reversible.adamw_vjp(constants, s, g, p_bar, (m_bar, v_bar))
    scaled = (jax.tree.map(lambda x: x / b1, m_bar), jax.tree.map(lambda x: x / b2, v_bar))
    g_bar2, (m_c, v_c) = reversible.adamw_vjp_scaled(constants, s, g, p_bar, scaled)
    assert tree_rel_err(g_bar2, g_bar) <= 1e-13
    assert tree_rel_err(jax.tree.map(lambda x: b1 * x, m_c), m_prev) <= 1e-13
    assert tree_rel_err(jax.tree.map(lambda x: b2 * x, v_c), v_prev) <= 1e-13


@pytest.mark.parametrize("learning_rate,mask", [
    ("schedule", None),
    (1e-2, None),  # a constant rate: no schedule count in the state
    ("schedule", {"fc1": {"kernel": True, "bias": False}, "fc2": {"kernel": True, "bias": False}}),
    ("schedule", lambda params: jax.tree.map(lambda x: x.ndim > 1, params)),
])
def test_undo_inverts_one_step(x64, learning_rate, mask):
    """undo_update + undo_moments give back (p, s) before a step, to 1e-12 relative (float64)."""
    lr = bilevel.step_lr(3e-2, step_size=1, gamma=0.5) if learning_rate == "schedule" else learning_rate
    opt = bilevel.inner_adamw(lr, weight_decay=0.1, mask=mask)
    prob = problems.mlp_regression(seed=1, dtype=jnp.float64, num_domains=3, inner_steps=3, batch_size=8,
                                   in_dim=4, hidden=8, optimizer=opt)
    inner, _ = prob.sample_batches(jax.random.PRNGKey(0))
    alpha = jnp.array([0.3, -0.2, 0.1])
    p, s, _ = bilevel.unroll(prob.inner_loss, opt, prob.params, prob.opt_state, alpha,
                             jax.tree.map(lambda x: x[:2], inner))
    p1, s1, _ = inner_lib.inner_step(prob.inner_loss, opt, p, s, alpha, inner_lib.batch_at(inner, 2))
    constants = reversible.adamw_constants(opt, s1)
    p0 = reversible.undo_update(constants, p1, s1)
    assert tree_rel_err(p0, p) <= 1e-12
    g = jax.grad(prob.inner_loss)(p0, alpha, inner_lib.batch_at(inner, 2))
    s0 = reversible.undo_moments(constants, s1, g)
    assert jax.tree.structure(s0) == jax.tree.structure(s)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s)):
        if jnp.issubdtype(b.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-18)


@pytest.mark.parametrize("optimizer", [optax.adamw(1e-3), optax.chain(optax.clip_by_global_norm(1.0),
                                                                       bilevel.inner_adamw(1e-3))])
def test_other_optimizers_are_refused(mlp, optimizer):
    prob, batches = mlp
    prob = dataclasses.replace(prob, optimizer=optimizer, opt_state=optimizer.init(prob.params))
    with pytest.raises(ValueError, match="must be bilevel.inner_adamw"):
        hypergradient("exact_reversible", prob, batches)


def warmed(prob, steps=5):
    """The problem after ``steps`` AdamW steps on other batches: a warm optimizer state, as in training."""
    warm, _ = prob.sample_batches(jax.random.PRNGKey(9))
    params, opt_state, _ = bilevel.unroll(prob.inner_loss, prob.optimizer, prob.params, prob.opt_state, prob.alpha,
                                          jax.tree.map(lambda x: x[:steps], warm))
    return dataclasses.replace(prob, params=params, opt_state=opt_state)


@pytest.mark.parametrize("warm_steps,tolerance", [(5, 1e-5), (0, 5e-2)])
def test_float32_error(x64, warm_steps, tolerance):
    """Float32, T = 20, against float64 ``exact`` on the same data. Warm optimizer state: within 10x of
    float32 ``exact``'s own error (~3e-7) and <= 1e-5. Cold state (m_0 = v_0 = 0, a run's first
    iteration): the reconstructed second moments lose the first steps' small gradients, ~1e-2 (<= 5e-2)."""
    prob64, batches64 = mlp_problem(inner_steps=20)
    if warm_steps:
        prob64 = warmed(prob64, warm_steps)
    g_ref, _ = hypergradient("exact", prob64, batches64)
    prob32, batches32 = as_float32(prob64, batches64)
    err_exact = rel_err(hypergradient("exact", prob32, batches32)[0], g_ref)
    err_rev = rel_err(hypergradient("exact_reversible", prob32, batches32)[0], g_ref)
    assert err_rev <= tolerance, (err_rev, err_exact)
    if warm_steps:
        assert err_rev <= 10 * max(err_exact, 1e-7), (err_rev, err_exact)


def _drift(prob, batches):
    """Relative distance of the reconstructed phi_0 from the true one after T forward and T reversed steps."""
    inner, _ = batches
    p_T, s_T, _ = bilevel.unroll(prob.inner_loss, prob.optimizer, prob.params, prob.opt_state, prob.alpha, inner)
    p0, _ = reversible.reverse_unroll(prob.inner_loss, prob.optimizer, p_T, s_T, prob.alpha, inner)
    return tree_rel_err(p0, prob.params)


def test_float32_drift_grows_as_inverse_b1_powers(x64):
    """The reconstructed phi_0 drifts by rounding amplified about 1/b1 per reversed step: float32, warm
    state, T = 40, lr 1e-3: b1 = 0.9 stays within 1e-6 (relative), b1 = 0.5 (0.5^-40 ~ 1e12) is far
    off (> 1e-3)."""
    drifts = {}
    for b1 in (0.9, 0.5):
        prob, batches = mlp_problem(inner_steps=40, b1=b1, lr=1e-3)
        drifts[b1] = _drift(*as_float32(warmed(prob), batches))
    assert drifts[0.9] <= 1e-6 and not drifts[0.5] <= 1e-3, drifts


def test_trainer_runs_exact_reversible(tmp_path, capsys):
    """``--hypergradient exact_reversible`` in the training loop (tiny model, float32, 2 iterations):
    trains, and its last hypergradient norm is ``exact``'s to 5e-2 relative (the first iteration
    starts from a cold optimizer state, see test_float32_error, and the trainer says so)."""
    from tests.tiny_run import tiny_benchmark, tiny_config, train

    data = tiny_benchmark(tmp_path / "synthetic")
    runs = {m: train(tiny_config(data, str(tmp_path / m), iterations=2, hypergradient=m))
            for m in ("exact", "exact_reversible")}
    norms = {m: r.final_metrics["hypergrad_norm"] for m, r in runs.items()}
    assert runs["exact_reversible"].step == 2 and np.isfinite(norms["exact_reversible"]), norms
    np.testing.assert_allclose(norms["exact_reversible"], norms["exact"], rtol=5e-2)
    assert capsys.readouterr().err.count("[note] --hypergradient exact_reversible with --meta-warmup 0") == 1
