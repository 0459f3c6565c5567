"""The PyTorch reference iteration (benchmarks/reference_torch.py) computes what JAX's ``darts`` does.

Same tiny Qwen2-VL PRM weights (JAX init -> save_checkpoint -> transformers from_pretrained),
same left-padded image+text batches, float32, T = 5, R = 0.01. Tolerances and why:

* first lower loss (forward only, identical inputs): rtol 1e-5;
* lower losses 2..5 and the meta loss: rtol 1e-4. Adam's first steps are sign-like
  (``m_hat / sqrt(v_hat) = g / |g|`` at step 1), so float32 rounding differences of the two
  frameworks' gradients in near-zero entries become O(lr) parameter differences; measured
  ~1e-5 relative;
* DARTS hypergradient: cosine > 0.999 and ||g_torch - g_jax|| / ||g_jax|| < 1e-2. It is a
  central difference with eps = R / ||v|| ~ 1e-2 of float32 losses, so rounding in the two
  gradients ``dL_in/dr`` (~1e-7 relative) is amplified by ~1/eps; measured ~1e-4;
* the meta AdamW step on r: atol 1e-5 (both are ``-lr * g / |g|`` entrywise at step 1).

Plus an exact check of the benchmarks' jaxpr FLOP counter (loops multiplied out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import _common
from benchmarks.reference_torch import TorchReference
from dreamprm_jax import bilevel
from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train import step as step_lib

R = 0.01
SPEC = _common.ProblemSpec(batch=2, seq_len=24, unroll=5, meta_chains=2, meta_steps=2, step_len=3, question_len=4,
                           image_side=56, num_domains=3, seed=0)
INNER = dict(lr=2e-3, step_size=5000, gamma=0.5, weight_decay=1e-2)
META = dict(lr=1e-2, weight_decay=1e-3)


@pytest.fixture(scope="module")
def runs():
    config = qwen2_vl.tiny(patch_size=14)  # the real patch geometry: 56 px -> 4x4 patches, 4 image tokens
    params = jax.device_get(prm.init(config, jax.random.key(0)))
    problem = _common.make_problem(config, SPEC)
    assert problem["inner_hf"][0]["attention_mask"].min() == 0, "the batches should exercise padding"

    opt = step_lib.inner_optimizer(INNER["lr"], INNER["step_size"], INNER["gamma"], INNER["weight_decay"])
    meta_opt = step_lib.meta_optimizer(META["lr"], META["weight_decay"])
    inner_loss, outer_loss = step_lib.make_losses(config, "mean")
    raw = jnp.zeros((SPEC.num_domains,), jnp.float32)

    @jax.jit
    def hypergradient(p, s, r, meta):
        return bilevel.hypergradient("darts", inner_loss, outer_loss, opt, p, s, r, problem["inner_jax"], meta, R=R)

    g, aux = hypergradient(params, opt.init(params), raw, problem["meta_jax"])
    g_packed, aux_packed = hypergradient(params, opt.init(params), raw, problem["meta_jax_packed"])
    updates, _ = meta_opt.update(g, meta_opt.init(raw), raw)
    jax_out = {"g": np.asarray(g), "inner_losses": np.asarray(aux["inner_losses"]),
               "meta_loss": float(aux["outer_loss"]), "epsilon": float(aux["epsilon"]),
               "raw": np.asarray(raw + updates), "g_packed": np.asarray(g_packed),
               "meta_loss_packed": float(aux_packed["outer_loss"])}

    ref = TorchReference(config, params, SPEC.num_domains, inner_lr=INNER["lr"],
                         inner_weight_decay=INNER["weight_decay"], inner_lr_step_size=INNER["step_size"],
                         inner_lr_gamma=INNER["gamma"], meta_lr=META["lr"], meta_weight_decay=META["weight_decay"], R=R)
    torch_out = ref.iteration([ref.inputs(b) for b in problem["inner_hf"]], ref.inputs(problem["meta_hf"]))
    return jax_out, torch_out


def test_packed_meta_batch_gives_the_same_meta_loss_and_hypergradient(runs):
    """The trainer's packed meta rows (one per chain) vs one row per step prefix (the reference's
    layout): float32, the summation order differs; rtol 1e-4 (the DARTS finite difference
    divides by its radius, amplifying rounding)."""
    j, _ = runs
    np.testing.assert_allclose(j["meta_loss_packed"], j["meta_loss"], rtol=1e-5)
    np.testing.assert_allclose(j["g_packed"], j["g"], rtol=1e-4, atol=1e-6)


def test_lower_losses_agree(runs):
    j, t = runs
    losses_t = np.asarray(t["inner_losses"])
    assert losses_t.shape == (SPEC.unroll,)
    np.testing.assert_allclose(losses_t[0], j["inner_losses"][0], rtol=1e-5)
    np.testing.assert_allclose(losses_t, j["inner_losses"], rtol=1e-4)
    np.testing.assert_allclose(t["meta_loss"], j["meta_loss"], rtol=1e-4)
    np.testing.assert_allclose(t["epsilon"], j["epsilon"], rtol=1e-4)


def test_darts_hypergradient_agrees(runs):
    j, t = runs
    gj, gt = j["g"], np.asarray(t["hypergradient"])
    assert np.all(np.isfinite(gt)) and np.linalg.norm(gj) > 0
    cos = float(gj @ gt / (np.linalg.norm(gj) * np.linalg.norm(gt)))
    rel = float(np.linalg.norm(gt - gj) / np.linalg.norm(gj))
    assert cos > 0.999, (cos, gj, gt)
    assert rel < 1e-2, (rel, gj, gt)


def test_meta_step_agrees(runs):
    j, t = runs
    np.testing.assert_allclose(t["raw_weights"], j["raw"], atol=1e-5)


def test_jaxpr_flops_multiplies_loops():
    """The benchmarks' FLOP counter (exact integers): scan bodies x length, grad adds the backward."""
    from jax import lax

    def f(x, w):  # x [64, 64], w [10, 64, 64]: ten 64^3 matmuls
        return lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    x, w = jnp.ones((64, 64)), jnp.ones((10, 64, 64))
    one = 2 * 64**3
    assert _common.jaxpr_flops(jax.make_jaxpr(f)(x, w)) == {"flops": 10 * one, "dynamic_while_loops": 0}
    # d/dx only: forward + one backward matmul per step
    assert _common.jaxpr_flops(jax.make_jaxpr(jax.grad(f))(x, w))["flops"] == 20 * one
    # d/dw too: forward + two backward matmuls per step
    assert _common.jaxpr_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w))["flops"] == 30 * one
