"""Exact hypergradients through the tiny Qwen2-VL PRM (tests/prm_problem.py).

The problem: ``qwen2_vl.tiny()`` + the reward head, DreamPRM's two losses
(``train.step.make_losses``), inner AdamW (``train.step.inner_optimizer``), batches from the
generated benchmark with an image in every row. Float64 (``jax.enable_x64``) in a
module-scoped fixture; every tolerance is stated in its assertion.

Float64 through the model's dtype policy: ``dtype="float64"`` (compute) and
``param_dtype=jnp.float64`` (storage) of ``ProcessRewardModel`` (tests/prm_problem.py). The
model's float32 accumulations (norm statistics, rotary tables, attention scores, logits,
reward head) then run in float64 too, and a test checks that the traced losses hold no
float32 value at all: finite differences at h = 1e-5 need float64 end to end.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax import bilevel
from tests import prm_problem as prm_problem_lib

ALPHA = (0.3, -0.2, 0.1)  # raw domain weights: unequal weights, so every domain matters
#: XLA CPU options that halve the compile time of these second-order programs (~45 s -> ~22 s
#: for ``exact``); code generation only, the numbers are the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def data_kw(tmp_path_factory):
    """The smallest generated benchmark: K=3 domains x 2 chains, 2 meta chains; B=2, M=1."""
    return dict(num_domains=len(ALPHA), batch_size=2, meta_chains=1, chains_per_domain=2, meta=2,
                compute_dtype="float64", data_dir=str(tmp_path_factory.mktemp("prm_problem")))


@pytest.fixture(scope="module")
def prob(data_kw):
    """(problem, (inner [T=2, ...], outer)); 64-bit JAX and the float64 model for the whole module."""
    with jax.enable_x64(True):
        p = prm_problem_lib.prm_problem(seed=0, param_dtype=jnp.float64, inner_steps=2, inner_lr=1e-2, **data_kw)
        p = dataclasses.replace(p, alpha=jnp.asarray(ALPHA, jnp.float64))
        yield p, p.sample_batches(jax.random.PRNGKey(1))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hypergradient(method, p, batches, **options):
    inner, outer = batches
    fn = jax.jit(functools.partial(bilevel.hypergradient, method, p.inner_loss, p.outer_loss, p.optimizer, **options),
                 compiler_options=FAST_COMPILE)
    return fn(p.params, p.opt_state, p.alpha, inner, outer)


@pytest.fixture(scope="module")
def exact(prob):
    p, batches = prob
    return hypergradient("exact", p, batches)


def test_batches_are_multimodal_and_float64(prob, data_kw):
    p, (inner, outer) = prob
    config = prm_problem_lib.prepare_data(**data_kw).model_config  # memoised: the problem's own
    assert p.name == "prm" and p.inner_steps == 2 and config.text.hidden_size == 64  # qwen2_vl.tiny()
    assert inner.inputs.input_ids.shape[:2] == (2, 2) and inner.labels.dtype == jnp.float64
    assert inner.inputs.pixel_values.dtype == jnp.float64 and outer.step_mask.shape == (1, 5)
    # every row holds an image: <|image_pad|> tokens in every sequence, real patch rows in every batch
    assert np.all((np.asarray(inner.inputs.input_ids) == config.image_token_id).sum(-1) > 0)  # [T, B]
    assert np.all((np.asarray(outer.inputs.input_ids) == config.image_token_id).sum(-1) > 0)  # [M*S]
    assert np.all((np.asarray(inner.inputs.vision_segment_ids) >= 0).sum(-1) > 0)  # [T]


def test_losses_trace_without_float32(prob):
    """No float32 value anywhere in the traced inner/outer losses (exact: dtype check)."""
    p, (inner, outer) = prob
    batch0 = jax.tree.map(lambda x: x[0], inner)
    jaxprs = [jax.make_jaxpr(jax.grad(p.inner_loss, argnums=(0, 1)))(p.params, p.alpha, batch0),
              jax.make_jaxpr(jax.grad(p.outer_loss))(p.params, outer)]

    def dtypes(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield str(v.aval.dtype)
            for sub in _subjaxprs(eqn):
                yield from dtypes(sub)

    for closed in jaxprs:
        found = set(dtypes(closed.jaxpr))
        assert "float32" not in found and "float64" in found, found


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


def test_exact_matches_central_finite_differences(prob, exact):
    """``exact`` = central differences of ``alpha -> L_out(unroll(alpha))``, rel err <= 1e-5 (float64)."""
    p, (inner, outer) = prob
    g, aux = exact
    h = 1e-5

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    @jax.vmap
    def upper(a):
        params, _, _ = bilevel.unroll(p.inner_loss, p.optimizer, p.params, p.opt_state, a, inner)
        return p.outer_loss(params, outer)

    a0 = np.asarray(p.alpha, np.float64)
    eye = h * np.eye(a0.size)
    values = np.asarray(upper(jnp.asarray(np.concatenate([a0 + eye, a0 - eye]))))  # [2K]
    fd = (values[: a0.size] - values[a0.size:]) / (2 * h)
    assert g.dtype == jnp.float64 and np.all(np.isfinite(np.asarray(g)))
    assert np.linalg.norm(np.asarray(g)) > 0, g
    assert rel_err(g, fd) <= 1e-5, (g, fd)
    assert np.isfinite(float(aux["outer_loss"]))


def test_exact_forward_matches_exact(prob, exact):
    """Forward mode (jvp over alpha through the scan) = reverse mode, rel err <= 1e-8 (float64)."""
    p, batches = prob
    g_ref, aux_ref = exact
    g, aux = hypergradient("exact_forward", p, batches)
    assert rel_err(g, g_ref) <= 1e-8, (g, g_ref)
    np.testing.assert_allclose(float(aux["outer_loss"]), float(aux_ref["outer_loss"]), rtol=1e-12)


def test_exact_reverse_second_order_matches_mixed(prob, exact):
    """Reverse-over-reverse through the real model = the default forward-over-reverse
    Hessian-vector products, rel err <= 1e-8 (float64)."""
    p, batches = prob
    g_ref, aux_ref = exact
    g, aux = hypergradient("exact", p, batches, second_order="reverse")
    assert rel_err(g, g_ref) <= 1e-8, (g, g_ref)
    np.testing.assert_allclose(float(aux["outer_loss"]), float(aux_ref["outer_loss"]), rtol=1e-12)


@pytest.mark.parametrize("in_place", [False, True])
def test_exact_reversible_matches_exact(prob, in_place):
    """Reverse mode over the inverted AdamW steps (z_{t-1} reconstructed from z_t) = reverse mode
    through the stored unroll, through the real model, from a warm optimizer state (one unroll on
    the same batches first, as in training: a cold v_0 = 0 loses small early gradients to the
    reconstruction's rounding, tests/test_bilevel_reversible.py), rel err <= 1e-8 (float64), with
    and without ``in_place``."""
    p, batches = prob
    params, opt_state, _ = bilevel.unroll(p.inner_loss, p.optimizer, p.params, p.opt_state, p.alpha, batches[0])
    p = dataclasses.replace(p, params=params, opt_state=opt_state)
    g_ref, aux_ref = hypergradient("exact", p, batches)
    g, aux = hypergradient("exact_reversible", p, batches, in_place=in_place)
    assert rel_err(g, g_ref) <= 1e-8, (g, g_ref)
    np.testing.assert_allclose(float(aux["outer_loss"]), float(aux_ref["outer_loss"]), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(aux["params"]), jax.tree.leaves(aux_ref["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
