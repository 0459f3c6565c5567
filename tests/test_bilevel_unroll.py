"""The inner T-step scan unrolled into straight-line code vs kept as a loop: the same maths.

The engine unrolls scans of T <= ``bilevel.inner.FULL_UNROLL_MAX_STEPS`` steps (0 by default:
the loop; ``benchmarks.step_throughput --unroll-inner`` sets 8), and the rest of the suite runs with
the loop (``tests/conftest.py``), so this file checks the unrolled form against it: trajectories and the ``exact`` / ``darts``
hypergradients of the MLP problem, in float64 (rtol 1e-10: only the summation order may differ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel import inner as inner_lib
from dreamprm_jax.bilevel import problems


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        prob = problems.get_problem("mlp", dtype=jnp.float64, inner_steps=5)
        return prob, prob.sample_batches(jax.random.PRNGKey(2))


def _run(prob, batches, method, unroll_max, monkeypatch):
    monkeypatch.setattr(inner_lib, "FULL_UNROLL_MAX_STEPS", unroll_max)  # read when traced
    inner, outer = batches

    @jax.jit
    def f(params, opt_state, alpha):
        return bilevel.hypergradient(method, prob.inner_loss, prob.outer_loss, prob.optimizer, params, opt_state,
                                     alpha, inner, outer, **({"R": 1e-3} if method == "darts" else {}))

    g, aux = f(prob.params, prob.opt_state, prob.alpha)
    return np.asarray(g), jax.tree.map(np.asarray, aux["params"])


@pytest.mark.parametrize("method", ["exact", "darts"])
def test_unrolled_scan_equals_the_loop(setup, method, monkeypatch):
    prob, batches = setup
    with jax.enable_x64(True):
        g_loop, p_loop = _run(prob, batches, method, 0, monkeypatch)
        g_unrolled, p_unrolled = _run(prob, batches, method, 8, monkeypatch)
    assert np.abs(g_loop).max() > 0
    np.testing.assert_allclose(g_unrolled, g_loop, rtol=1e-10, atol=1e-14)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), p_unrolled, p_loop)


def test_unroll_argument_and_default():
    assert inner_lib.FULL_UNROLL_MAX_STEPS == 0  # the suite's setting (tests/conftest.py)
    loss = lambda p, a, b: jnp.sum((p - b) ** 2) * a  # noqa: E731
    opt = inner_lib.inner_adamw(0.1)
    p0 = jnp.ones((3,))
    batches = jnp.arange(12.0).reshape(4, 3)  # T = 4
    outs = [inner_lib.unroll(loss, opt, p0, opt.init(p0), 1.0, batches, scan_unroll=u)[0] for u in (1, 2, True)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-6)


def test_peeled_first_step_gives_the_same_trajectory_and_metrics():
    loss = lambda p, a, b: jnp.sum((p - b) ** 2) * a  # noqa: E731
    opt = inner_lib.inner_adamw(0.1)
    p0 = jnp.ones((3,))
    for T in (1, 4):
        batches = jnp.arange(3.0 * T).reshape(T, 3)
        ref = inner_lib.unroll(loss, opt, p0, opt.init(p0), 1.0, batches)
        peeled = inner_lib.unroll(loss, opt, p0, opt.init(p0), 1.0, batches, peel_first=True, remat=True)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), peeled, ref)
        assert peeled[2]["loss"].shape == (T,)
