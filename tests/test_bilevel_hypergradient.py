"""Hypergradient methods of dreamprm_jax/bilevel (exactness, approximations' limits, failure modes).

Float64 throughout (``jax.enable_x64`` inside module-scoped fixtures); every tolerance is
stated in the assertion.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel import inner as inner_lib
from tests import problems


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def jitted(method, prob, **options):
    return jax.jit(functools.partial(bilevel.hypergradient, method, prob.inner_loss, prob.outer_loss,
                                     prob.optimizer, **options))


def call(fn, prob, batches):
    inner, outer = batches
    return fn(prob.params, prob.opt_state, prob.alpha, inner, outer)


@pytest.fixture(scope="module")
def mlp(x64):
    # AdamW (eps_root = eps^2) with a StepLR schedule whose step boundary falls inside the unroll
    opt = bilevel.inner_adamw(bilevel.step_lr(3e-2, step_size=2, gamma=0.5), weight_decay=1e-2)
    prob = problems.mlp_regression(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=4, batch_size=8,
                                   outer_batch_size=8, in_dim=4, hidden=8, optimizer=opt)
    prob = _with_alpha(prob, jnp.array([0.3, -0.2, 0.1]))
    return prob, prob.sample_batches(jax.random.PRNGKey(1))


def _with_alpha(prob, alpha):
    import dataclasses
    return dataclasses.replace(prob, alpha=alpha.astype(prob.alpha.dtype))


@pytest.fixture(scope="module")
def mlp_exact(mlp):
    prob, batches = mlp
    return call(jitted("exact", prob), prob, batches)


def test_exact_matches_finite_differences_mlp(mlp, mlp_exact):
    prob, batches = mlp
    g, aux = mlp_exact
    fd = problems.central_fd(prob, batches)
    assert rel_err(g, fd) <= 1e-5, (g, fd)
    assert aux["inner_losses"].shape == (4,) and aux["params"]["fc1"]["kernel"].dtype == jnp.float64


def test_exact_matches_finite_differences_tiny_transformer(x64):
    opt = bilevel.inner_adamw(1e-2)
    prob = problems.tiny_transformer(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=2, batch_size=4,
                                     seq_len=5, vocab=8, embed=8, num_heads=2, num_chains=2, num_steps_per_chain=2,
                                     optimizer=opt)
    prob = _with_alpha(prob, jnp.array([0.2, -0.1, 0.0]))
    batches = prob.sample_batches(jax.random.PRNGKey(3))
    g, _ = call(jitted("exact", prob), prob, batches)
    fd = problems.central_fd(prob, batches)
    assert rel_err(g, fd) <= 1e-5, (g, fd)


@pytest.mark.parametrize("method,options", [
    ("exact_forward", {}),
    ("exact_forward", {"chunk_size": 2}),
    ("exact_lowmem", {}),
    ("exact", {"remat": True}),
    ("truncated", {"k": 4}),
    ("exact", {"second_order": "reverse"}),
    ("exact", {"second_order": "reverse", "remat": True}),
    ("exact_lowmem", {"second_order": "reverse"}),
    ("exact", {"peel_first": False}),  # the reference peels step 1 out of the scan (the default)
    ("exact", {"peel_first": False, "second_order": "reverse", "remat": True}),
])
def test_exact_variants_agree(mlp, mlp_exact, method, options):
    prob, batches = mlp
    g_ref, aux_ref = mlp_exact
    g, aux = call(jitted(method, prob, **options), prob, batches)
    assert rel_err(g, g_ref) <= 1e-8, (method, options, g, g_ref)
    np.testing.assert_allclose(aux["outer_loss"], aux_ref["outer_loss"], rtol=1e-12)
    np.testing.assert_allclose(aux["inner_losses"], aux_ref["inner_losses"], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(aux["params"]), jax.tree.leaves(aux_ref["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("uses", ["loss and gradient", "gradient only", "loss only"])
def test_mixed_value_and_grad_vjp_equals_reverse_over_reverse(mlp, uses):
    """Both outputs' cotangents (the loss's and the gradient's) give reverse mode's VJP, float64;
    also when one of them is a symbolic zero (the unrolled steps' case: the loss is a metric)."""
    prob, (inner, _) = mlp
    batch = inner_lib.batch_at(inner, 0)
    v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), prob.params)
    c_loss = 0.0 if uses == "gradient only" else 0.7
    c_grad = 0.0 if uses == "loss only" else 1.0

    def objective(value_and_grad, p, a):  # uses the loss and/or the gradient, like an unrolled step
        loss, g = value_and_grad(p, a, batch)
        out = 0.0
        if c_loss:
            out = out + c_loss * loss
        if c_grad:
            out = out + sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
        return out

    mixed = inner_lib.mixed_value_and_grad(prob.inner_loss)
    ref = jax.grad(functools.partial(objective, jax.value_and_grad(prob.inner_loss)), argnums=(0, 1))
    got = jax.grad(functools.partial(objective, mixed), argnums=(0, 1))
    (gp, ga), (rp, ra) = got(prob.params, prob.alpha), ref(prob.params, prob.alpha)
    assert rel_err(ga, ra) <= 1e-12 and np.abs(np.asarray(ra)).max() > 0
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(mixed(prob.params, prob.alpha, batch)[0], prob.inner_loss(prob.params, prob.alpha, batch))


def test_unknown_second_order_is_an_error(mlp):
    prob, (inner, _) = mlp
    with pytest.raises(ValueError, match="second_order must be one of"):
        bilevel.unroll(prob.inner_loss, prob.optimizer, prob.params, prob.opt_state, prob.alpha, inner,
                       second_order="forward")


def test_truncated_mixed_equals_truncated_reverse(mlp):
    prob, batches = mlp
    g_rev, _ = call(jitted("truncated", prob, k=2, second_order="reverse"), prob, batches)
    g_mix, _ = call(jitted("truncated", prob, k=2), prob, batches)  # the default: mixed
    assert rel_err(g_mix, g_rev) <= 1e-10, (g_mix, g_rev)


def test_truncated_drops_early_steps(mlp, mlp_exact):
    prob, batches = mlp
    g1, aux = call(jitted("truncated", prob, k=1), prob, batches)
    assert np.all(np.isfinite(g1)) and aux["inner_losses"].shape == (4,)
    assert rel_err(g1, mlp_exact[0]) > 1e-6  # genuinely an approximation on this problem


def test_jit_and_eager_agree(mlp, mlp_exact):
    prob, (inner, outer) = mlp
    g, aux = bilevel.hypergradient("exact", prob.inner_loss, prob.outer_loss, prob.optimizer, prob.params,
                                   prob.opt_state, prob.alpha, inner, outer)
    np.testing.assert_allclose(g, mlp_exact[0], rtol=1e-12, atol=1e-18)
    for key in ("outer_loss", "inner_losses"):
        np.testing.assert_allclose(aux[key], mlp_exact[1][key], rtol=1e-12)


def test_darts_converges_to_darts_exact(mlp):
    prob, batches = mlp
    g_ex, _ = call(jitted("darts_exact", prob), prob, batches)
    errs = []
    for R in (1e-1, 1e-2, 1e-3):
        g, aux = call(jitted("darts", prob, R=R), prob, batches)
        errs.append(rel_err(g, g_ex))
        np.testing.assert_allclose(aux["epsilon"] * aux["v_norm"], R, rtol=1e-12)
    assert errs[2] <= 1e-5 and errs[0] > errs[1] > errs[2], errs  # O(R^2) until rounding


def test_sama_exact_product_matches_finite_difference(mlp):
    prob, batches = mlp
    g_fd, _ = call(jitted("sama", prob, R=1e-4), prob, batches)
    g_ex, _ = call(jitted("sama", prob, finite_difference=False), prob, batches)
    assert rel_err(g_fd, g_ex) <= 1e-6


def test_one_sgd_step_closed_form(x64):
    lr = 0.1
    prob = problems.mlp_regression(seed=2, dtype=jnp.float64, num_domains=3, inner_steps=1, batch_size=8,
                                   outer_batch_size=8, in_dim=4, hidden=8, optimizer=optax.sgd(lr))
    prob = _with_alpha(prob, jnp.array([0.5, 0.0, -0.5]))
    inner, outer = prob.sample_batches(jax.random.PRNGKey(0))
    b0 = jax.tree.map(lambda x: x[0], inner)
    # phi_1 = phi_0 - lr grad_phi L_in(phi_0, a);  g = -lr (d^2 L_in / d phi d a)^T grad L_out(phi_1)
    flat0, unravel = ravel_pytree(prob.params)
    grad_flat = lambda a: ravel_pytree(jax.grad(prob.inner_loss)(prob.params, a, b0))[0]
    J = jax.jacfwd(grad_flat)(prob.alpha)  # [P, K]
    phi1 = unravel(flat0 - lr * grad_flat(prob.alpha))
    v = ravel_pytree(jax.grad(prob.outer_loss)(phi1, outer))[0]  # [P]
    closed = -lr * J.T @ v
    g, _ = call(jitted("exact", prob), prob, (inner, outer))
    assert rel_err(g, closed) <= 1e-10
    # at T = 1 the first-order methods evaluated where the step's gradient was taken are exact
    g_d, _ = call(jitted("darts_exact", prob, lr_eff=lr, point="previous"), prob, (inner, outer))
    g_s, _ = call(jitted("sama", prob, point="previous", finite_difference=False), prob, (inner, outer))
    assert rel_err(g_d, closed) <= 1e-10 and rel_err(g_s, closed) <= 1e-10


def test_sama_is_exact_for_one_adamw_step(x64):
    opt = bilevel.inner_adamw(1e-2)
    prob = problems.mlp_regression(seed=3, dtype=jnp.float64, num_domains=3, inner_steps=1, batch_size=8,
                                   outer_batch_size=8, in_dim=4, hidden=8, optimizer=opt)
    prob = _with_alpha(prob, jnp.array([0.5, 0.0, -0.5]))
    batches = prob.sample_batches(jax.random.PRNGKey(0))
    # second step of AdamW (first-step Adam is sign-like); start from a state after one step
    p1, s1, _ = bilevel.inner_step(prob.inner_loss, opt, prob.params, prob.opt_state, prob.alpha,
                                   dict(jax.tree.map(lambda x: x[0], batches[0]), x=batches[0]["x"][0] * 0.5))
    import dataclasses
    prob = dataclasses.replace(prob, params=p1, opt_state=s1)
    g, _ = call(jitted("exact", prob), prob, batches)
    g_s, _ = call(jitted("sama", prob, point="previous", finite_difference=False), prob, batches)
    assert rel_err(g_s, g) <= 1e-10, (g_s, g)


def test_zero_gradient_parameters_stay_finite(x64):
    """A parameter whose gradient is identically zero but still wired to the loss (a dead
    unit, an embedding row absent from the batch) has Adam v = 0; eps_root > 0 keeps the
    hypergradient finite, optax's default eps_root = 0 gives 0 * inf = NaN."""
    base = problems.mlp_regression(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=2, batch_size=4,
                                   outer_batch_size=4, in_dim=3, hidden=4)
    params = dict(base.params, dead=jnp.zeros((3,), jnp.float64))

    def inner_loss(p, a, b):
        fc1 = dict(p["fc1"], bias=p["fc1"]["bias"] + jnp.sum(0.0 * p["dead"]))  # d L / d dead == 0
        return base.inner_loss({"fc1": fc1, "fc2": p["fc2"]}, a, b)

    def outer_loss(p, b):
        return base.outer_loss({"fc1": p["fc1"], "fc2": p["fc2"]}, b)

    inner, outer = base.sample_batches(jax.random.PRNGKey(0))
    results = {}
    for name, opt in (("ours", bilevel.inner_adamw(1e-2)), ("eps_root0", optax.adamw(1e-2))):
        fn = jax.jit(functools.partial(bilevel.hypergradient, "exact", inner_loss, outer_loss, opt))
        g, _ = fn(params, opt.init(params), base.alpha, inner, outer)
        results[name] = np.asarray(g)
    assert np.all(np.isfinite(results["ours"])), results
    assert not np.all(np.isfinite(results["eps_root0"])), results  # documents why eps_root exists


@pytest.fixture(scope="module")
def quad(x64):
    prob = problems.quadratic(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=5, dim=6)
    batches = prob.sample_batches(jax.random.PRNGKey(0))
    _, aux = call(jitted("exact", prob), prob, batches)
    return prob, batches, np.asarray(problems.quadratic_closed_form(prob, aux["params"]))


def test_neumann_converges_to_closed_form(quad):
    prob, batches, closed = quad
    errs = []
    for k in (2, 10, 200):
        g, aux = call(jitted("neumann", prob, k=k, step_size=0.3), prob, batches)
        errs.append(rel_err(g, closed))
        assert bool(aux["solver_ok"])
    assert errs[-1] <= 1e-10 and errs[0] > errs[1] > errs[2], errs


def test_cg_converges_to_closed_form(quad):
    prob, batches, closed = quad
    g2, _ = call(jitted("cg", prob, k=2), prob, batches)
    g, aux = call(jitted("cg", prob, k=12), prob, batches)  # exact in <= dim = 6 steps in exact arithmetic
    assert rel_err(g, closed) <= 1e-10 and float(aux["residual"]) <= 1e-10
    assert rel_err(g2, closed) > rel_err(g, closed)
    assert float(aux["min_curvature"]) >= 1.0 - 1e-9  # eigenvalues of A in [1, 4]


def test_implicit_failure_is_loud(quad):
    prob, (inner, outer), _ = quad
    args = (prob.inner_loss, prob.outer_loss, prob.optimizer, prob.params, prob.opt_state, prob.alpha, inner, outer)
    with pytest.raises(FloatingPointError, match="neumann"):  # step 1 > 2 / lambda_max = 0.5: diverges
        bilevel.hypergradient("neumann", *args, k=20, step_size=1.0)
    g, aux = call(jitted("neumann", prob, k=20, step_size=1.0), prob, (inner, outer))
    assert not bool(aux["solver_ok"]) and np.all(np.isnan(g))  # under jit: NaN, never zeros


def test_unknown_method_and_option(mlp):
    prob, (inner, outer) = mlp
    args = (prob.inner_loss, prob.outer_loss, prob.optimizer, prob.params, prob.opt_state, prob.alpha, inner, outer)
    with pytest.raises(ValueError, match="unknown method"):
        bilevel.hypergradient("nope", *args)
    with pytest.raises(TypeError):
        bilevel.hypergradient("exact", *args, epsilon=1.0)
    with pytest.raises(ValueError, match="leading axis"):
        bilevel.hypergradient("exact", *args[:6], dict(inner, x=inner["x"][:2]), outer)
