"""The inner T-step scan unrolled into straight-line code vs kept as a loop: the same maths.

The layout is an argument: ``bilevel.unroll(..., scan_unroll=)``, the hypergradient methods'
option ``scan_unroll`` and ``make_bilevel_step(unroll_inner=)``; the default is the loop, which
the rest of the suite runs. This file checks that the argument gives the unrolled or the looped
program (the ``unroll`` parameter of the jaxpr's scans) and the same numbers: trajectories and the
``exact`` / ``darts`` hypergradients of the MLP problem, in float64 (rtol 1e-10: only the
summation order may differ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel import inner as inner_lib
from tests import problems


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        prob = problems.mlp_regression(dtype=jnp.float64, inner_steps=5)
        return prob, prob.sample_batches(jax.random.PRNGKey(2))


def _run(prob, batches, method, scan_unroll):
    """The hypergradient with the given layout, and the ``unroll`` of every scan in its program."""
    inner, outer = batches

    def f(params, opt_state, alpha):
        return bilevel.hypergradient(method, prob.inner_loss, prob.outer_loss, prob.optimizer, params, opt_state,
                                     alpha, inner, outer, scan_unroll=scan_unroll,
                                     **({"R": 1e-3} if method == "darts" else {}))

    args = (prob.params, prob.opt_state, prob.alpha)
    unrolls = _scan_unrolls(jax.make_jaxpr(f)(*args).jaxpr)
    g, aux = jax.jit(f)(*args)
    return np.asarray(g), jax.tree.map(np.asarray, aux["params"]), unrolls


@pytest.mark.parametrize("method", ["exact", "darts"])
def test_unrolled_scan_equals_the_loop(setup, method):
    prob, batches = setup
    T = inner_lib.num_steps(batches[0])
    with jax.enable_x64(True):
        g_loop, p_loop, unrolls_loop = _run(prob, batches, method, 1)
        g_unrolled, p_unrolled, unrolls_unrolled = _run(prob, batches, method, True)
    # exact peels step 1 off the scan, darts takes step T outside it: T - 1 steps scanned either way.
    assert unrolls_loop and max(unrolls_loop) == 1
    assert max(unrolls_unrolled) == T - 1
    assert np.abs(g_loop).max() > 0
    np.testing.assert_allclose(g_unrolled, g_loop, rtol=1e-10, atol=1e-14)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), p_unrolled, p_loop)


def test_unroll_argument_and_default():
    loss = lambda p, a, b: jnp.sum((p - b) ** 2) * a  # noqa: E731
    opt = inner_lib.inner_adamw(0.1)
    p0 = jnp.ones((3,))
    batches = jnp.arange(12.0).reshape(4, 3)  # T = 4
    outs = [inner_lib.unroll(loss, opt, p0, opt.init(p0), 1.0, batches, scan_unroll=u)[0] for u in (1, 2, True)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-6)
    args = (loss, opt, p0, opt.init(p0), 1.0, batches)
    assert _scan_unrolls(jax.make_jaxpr(lambda: inner_lib.unroll(*args))().jaxpr) == [1]  # default: the loop
    assert _scan_unrolls(jax.make_jaxpr(lambda: inner_lib.unroll(*args, scan_unroll=True))().jaxpr) == [4]


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


def _scan_unrolls(jaxpr) -> list[int]:
    """The ``unroll`` parameter of every ``scan`` in a jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(int(eqn.params["unroll"]))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    out += _scan_unrolls(sub)
    return out


def test_trainer_step_unrolls_the_inner_scan_when_asked():
    """``make_bilevel_step(unroll_inner=...)`` (the trainer's ``--unroll-inner-scan``; on in the
    ``qwen2_vl_2b`` preset) decides the inner scan's layout: unrolled for ``exact`` when asked,
    the loop otherwise."""
    from benchmarks import _common
    from dreamprm_jax import configs
    from dreamprm_jax.models import prm, qwen2_vl
    from dreamprm_jax.train import step as step_lib

    config = qwen2_vl.demo(hidden_size=16, num_hidden_layers=1)
    spec = _common.ProblemSpec(batch=2, seq_len=40, unroll=3, meta_chains=2, meta_steps=2, image_side=56)
    problem = _common.make_problem(config, spec)
    opt, meta_opt = step_lib.inner_optimizer(1e-3, 5000, 0.5, 0.01), step_lib.meta_optimizer(0.01, 1e-3)
    state = jax.eval_shape(lambda: step_lib.init_state(prm.init(config, jax.random.key(0)), spec.num_domains,
                                                         opt, meta_opt))
    unrolls = {}
    for method, flag in (("exact", True), ("exact", False), ("darts", True)):
        step = step_lib.make_bilevel_step(config, opt, meta_opt, method=method, unroll_inner=flag)
        jaxpr = jax.make_jaxpr(step)(state, problem["inner_jax"], problem["meta_jax_packed"]).jaxpr
        unrolls[method, flag] = _scan_unrolls(jaxpr)
    assert max(unrolls["exact", True]) >= spec.unroll - 1  # the scan after the peeled first step, fully unrolled
    assert max(unrolls["exact", False]) == 1
    assert max(unrolls["darts", True]) == 1  # forward-only unrolls keep the loop (their smaller program)
    assert step_lib.inner_scan_unrolled("exact", True) and not step_lib.inner_scan_unrolled("exact", True, False)
    assert [step_lib.inner_scan_unrolled(m, True) for m in ("darts", "exact_lowmem", "truncated")] == [False] * 3
    with pytest.raises(ValueError, match="scan_unroll"):
        step_lib.make_bilevel_step(config, opt, meta_opt, method="exact", unroll_inner=True,
                                   method_options={"scan_unroll": 2})
    assert configs.PRESETS["qwen2_vl_2b"]().unroll_inner_scan and not configs.TrainConfig().unroll_inner_scan
