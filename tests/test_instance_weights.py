"""Instance weights (a weight per training record: the table and the Instance Net) on the
unchanged bi-level engine, and the trainer's ``--weighting`` runs.

The hypergradient tests run in float64 (``jax.enable_x64`` inside module-scoped fixtures) on
a small MLP regression whose rows name their records; every tolerance is stated in its
assertion.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dreamprm_jax import bilevel
from dreamprm_jax.bilevel.instance_weights import uniform_logit
from tests import problems
from tests.tiny_run import final_state, tiny_config, train

NUM_RECORDS = 12  # records of the MLP problem; its T * B = 16 rows repeat some and miss others


# ----------------------------------------------------------------------------- the bound


def test_weights_stay_in_the_bound_for_extreme_raw_values():
    raw = jnp.array([-jnp.inf, -1e30, -100.0, -5.0, 0.0, 5.0, 100.0, 1e30, jnp.inf], jnp.float32)
    for w_max in (1.5, 2.0, 10.0):
        w = np.asarray(bilevel.instance_weights(raw, w_max))
        assert np.all(np.isfinite(w)) and np.all(w >= 0.0) and np.all(w <= w_max), (w_max, w)
        assert np.all((w[3:6] > 0.0) & (w[3:6] < w_max))  # strictly inside away from saturation
        g = np.asarray(jax.grad(lambda r: jnp.sum(bilevel.instance_weights(r, w_max)))(raw))
        assert np.all(np.isfinite(g)) and np.all(g >= 0.0)
        # the cold start: every weight 1
        np.testing.assert_allclose(bilevel.instance_weights(bilevel.init_raw_instance_weights(5, w_max), w_max),
                                   np.ones(5), rtol=1e-6, atol=0)
    assert uniform_logit(2.0) == 0.0
    with pytest.raises(ValueError, match="max_weight must be a finite number > 1"):
        bilevel.init_raw_instance_weights(3, 1.0)


def test_instance_net_is_bounded_and_starts_uniform():
    params = bilevel.init_instance_net(jax.random.key(0), num_domains=3, hidden=4, max_weight=2.0)
    losses = jnp.array([0.0, 0.3, 1.0, 1e30])
    domains = jnp.array([0, 1, 2, 1])
    np.testing.assert_allclose(bilevel.instance_net_weights(params, losses, domains), np.ones(4), rtol=1e-6, atol=0)
    wild = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), params)
    w = np.asarray(bilevel.instance_net_weights(wild, losses, domains, 3.0))
    assert np.all(np.isfinite(w)) and np.all((w >= 0.0) & (w <= 3.0)), w


def test_normalized_weights_average_one_per_group():
    w = jnp.array([[0.5, 1.5, 1.0, 2.0, 0.7], [0.4, 0.4, 1.0, 1.0, 1.9]], jnp.float32)  # [T=2, B=5]
    labels = jnp.array([[0.9, 0.1, 0.6, 0.0, 1.0], [0.2, 0.3, 0.4, 0.1, 0.5]], jnp.float32)
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], jnp.float32)  # row 0's last entry is padding
    assert bilevel.normalize_row_weights(w, labels, mask, "none") is w
    real = np.asarray(mask) > 0
    high = np.asarray(labels) >= 0.5
    for how in ("batch", "label"):
        out = np.asarray(bilevel.normalize_row_weights(w, labels, mask, how))
        assert out[0, 4] == np.float32(0.7)  # padding keeps its weight
        groups = [real] if how == "batch" else [real & high, real & ~high]
        for group in groups:
            for t in range(2):
                if group[t].any():
                    np.testing.assert_allclose(out[t][group[t]].mean(), 1.0, rtol=1e-6)
        # only the ratios inside a group survive: scaling a group changes nothing
        scaled = jnp.where(jnp.asarray(high), 3.0 * w, 0.5 * w) if how == "label" else 3.0 * w
        again = np.asarray(bilevel.normalize_row_weights(scaled, labels, mask, how))
        np.testing.assert_allclose(again[real], out[real], rtol=1e-6)
    out = np.asarray(bilevel.normalize_row_weights(w, labels, mask, "label"))
    assert out[1, 4] == 1.0  # the only high label of row 1
    np.testing.assert_allclose(out[0, :4], [0.5 / 0.75, 1.5 / 1.75, 1.0 / 0.75, 2.0 / 1.75], rtol=1e-6)
    with pytest.raises(ValueError, match="how must be one of"):
        bilevel.normalize_row_weights(w, labels, mask, "domain")


def test_domain_and_instance_weighting_share_one_loss():
    rng = np.random.default_rng(0)
    probs, labels = jnp.asarray(rng.random(6), jnp.float32), jnp.asarray(rng.random(6), jnp.float32)
    domains = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    raw = jnp.array([0.3, -0.2, 0.1], jnp.float32)
    by_domain = bilevel.weighted_mse(probs, labels, domains, raw, mask)
    shared = bilevel.sample_weighted_mse(probs, labels, bilevel.sample_weights(raw, domains), mask)
    assert float(by_domain) == float(shared)  # bit for bit
    table = jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)
    ids = jnp.array([3, 0, 2, 2, 1, 0])
    w = np.asarray(bilevel.record_weights(table, ids))
    np.testing.assert_allclose(w, 2.0 / (1.0 + np.exp(-np.asarray(table)[np.asarray(ids)])), rtol=1e-6, atol=0)
    expected = np.sum(np.asarray(mask) * w * (np.asarray(probs) - np.asarray(labels)) ** 2) / 5.0
    np.testing.assert_allclose(bilevel.sample_weighted_mse(probs, labels, jnp.asarray(w), mask), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- hypergradients


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def instance_problem(weighting: str, normalize: str = "none"):
    """The MLP regression of tests/problems.py with a weight per record instead of per domain.

    Rows carry ``record_ids`` (records ``0..N-1``, domain ``id % K``) and, for the net, each
    row's squared error under the initial parameters (the feature the trainer computes at the
    start of an iteration). ``normalize``: how each batch's weights are normalised."""
    opt = bilevel.inner_adamw(bilevel.step_lr(3e-2, step_size=2, gamma=0.5), weight_decay=1e-2)
    base = problems.mlp_regression(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=4, batch_size=4,
                                   outer_batch_size=8, in_dim=4, hidden=8, optimizer=opt)
    inner, outer = base.sample_batches(jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), inner["labels"].shape, 0, NUM_RECORDS)  # [T, B]
    inner = dict(inner, record_ids=ids, domain_ids=(ids % 3).astype(jnp.int32),
                 sample_mask=inner["sample_mask"].at[-1, -1].set(0.0))  # one padding row
    probs0 = jax.nn.sigmoid(problems.mlp_logits(base.params, inner["x"]))  # [T, B]
    inner["record_loss"] = jnp.square(probs0 - inner["labels"])

    def weights(alpha, batch):
        if weighting == "instance_table":
            w = bilevel.record_weights(alpha, batch["record_ids"])
        else:
            w = bilevel.instance_net_weights(alpha, batch["record_loss"], batch["domain_ids"])
        return bilevel.normalize_row_weights(w, batch["labels"], batch["sample_mask"], normalize)

    def inner_loss(p, alpha, batch):
        probs = jax.nn.sigmoid(problems.mlp_logits(p, batch["x"]))  # [B]
        return bilevel.sample_weighted_mse(probs, batch["labels"], weights(alpha, batch), batch["sample_mask"])

    if weighting == "instance_table":  # unequal weights, so every record matters
        alpha = jax.random.normal(jax.random.PRNGKey(3), (NUM_RECORDS,), jnp.float64) * 0.5
    else:
        alpha = bilevel.init_instance_net(jax.random.key(4), 3, hidden=3, dtype=jnp.float64)
        alpha["out"] = jax.random.normal(jax.random.PRNGKey(5), (3,), jnp.float64)  # off the cold start
    prob = dataclasses.replace(base, name=weighting, inner_loss=inner_loss, alpha=alpha)
    return prob, (inner, outer)


def hypergradient(method, prob, batches, **options):
    inner, outer = batches
    fn = jax.jit(functools.partial(bilevel.hypergradient, method, prob.inner_loss, prob.outer_loss, prob.optimizer,
                                   **options))
    return fn(prob.params, prob.opt_state, prob.alpha, inner, outer)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["instance_table", "instance_net"])
def problem(x64, request):
    prob, batches = instance_problem(request.param)
    g, aux = hypergradient("exact", prob, batches)
    return prob, batches, g


def test_exact_matches_finite_differences(problem):
    prob, batches, g = problem
    assert jax.tree.structure(g) == jax.tree.structure(prob.alpha)
    flat_g = ravel_pytree(g)[0]
    fd = problems.central_fd(prob, batches)
    assert rel_err(flat_g, fd) <= 1e-5, (flat_g, fd)
    if prob.name == "instance_table":
        inner, _ = batches
        ids, mask = np.asarray(inner["record_ids"]), np.asarray(inner["sample_mask"])
        unseen = np.setdiff1d(np.arange(NUM_RECORDS), ids[mask > 0])
        assert unseen.size > 0  # the batches miss some records: their hypergradient is exactly 0
        np.testing.assert_array_equal(np.asarray(g)[unseen], 0.0)


def test_exact_matches_finite_differences_with_label_groups(x64):
    """Weights normalised within each label group: the division by the group's batch mean is
    part of the differentiated function (float64 central differences), and it matters."""
    prob, batches = instance_problem("instance_table", normalize="label")
    inner, _ = batches
    labels, mask = np.asarray(inner["labels"]), np.asarray(inner["sample_mask"])
    assert 0 < np.mean(labels[mask > 0] >= 0.5) < 1  # both groups present
    g, _ = hypergradient("exact", prob, batches)
    fd = problems.central_fd(prob, batches)
    assert rel_err(g, fd) <= 1e-5, (g, fd)
    g_plain, _ = hypergradient("exact", *instance_problem("instance_table"))
    assert rel_err(g, g_plain) > 1e-2  # the normalisation changes the hypergradient


@pytest.mark.parametrize("method,options", [
    ("exact_forward", {"chunk_size": 4}),
    ("exact_lowmem", {}),
    ("exact_reversible", {}),
    ("truncated", {"k": 4}),
])
def test_exact_methods_agree_on_instance_weights(problem, method, options):
    prob, batches, g_ref = problem
    g, _ = hypergradient(method, prob, batches, **options)
    tol = 1e-6 if method == "exact_reversible" else 1e-8  # the reversible unroll rounds per reversed step
    assert rel_err(ravel_pytree(g)[0], ravel_pytree(g_ref)[0]) <= tol, (method, g, g_ref)


@pytest.mark.parametrize("method", ["darts", "darts_exact", "sama", "neumann", "cg", "truncated"])
def test_approximate_methods_take_the_instance_pytree(problem, method):
    prob, batches, g_ref = problem
    # The implicit methods answer NaN when their solve does not converge (here: an MLP far from a
    # minimum after 4 steps); the residual guard is lifted, the pytree is what is tested.
    options = {"max_relative_residual": float("inf")} if method in ("neumann", "cg") else {}
    g, aux = hypergradient(method, prob, batches, **options)
    assert jax.tree.structure(g) == jax.tree.structure(prob.alpha)
    flat = np.asarray(ravel_pytree(g)[0])
    assert np.all(np.isfinite(flat)) and np.linalg.norm(flat) > 0, (method, flat)


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("second_moment", ["per_weight", "shared"])
def test_resume_continues_bit_for_bit(tiny_data, tmp_path, second_moment):
    """The table (and its meta AdamW state, either kind) restores bit for bit; the net's
    parameters are the same kind of pytree in the same state entry."""
    ramp = dict(meta_lr_warmup=2, weighting="instance_table", iterations=2,  # the ramp spans the resume point
                meta_second_moment=second_moment)
    straight = train(tiny_config(tiny_data, str(tmp_path / "straight"), **ramp))
    half = str(tmp_path / "halves")
    train(tiny_config(tiny_data, half, **dict(ramp, iterations=1)))
    resumed = train(tiny_config(tiny_data, half, resume=True, **ramp))
    assert straight.step == resumed.step == 2
    _, state_a, _ = final_state(str(tmp_path / "straight"))
    _, state_b, _ = final_state(half)
    leaves_a, tree_a = jax.tree.flatten(state_a)
    leaves_b, tree_b = jax.tree.flatten(state_b)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)  # bit for bit (atol=0, rtol=0)
    assert state_a["raw_weights"].shape == (len(straight.record_weights.keys),)
    assert np.any(state_a["raw_weights"] != 0.0)  # learned: the table left its cold start
    np.testing.assert_array_equal(straight.record_weights.weights, resumed.record_weights.weights)
    with pytest.raises(ValueError, match="trained with --weighting instance_table"):
        train(tiny_config(tiny_data, half, iterations=3, resume=True))  # domain weighting


def test_cli_run_writes_one_weight_per_record(tiny_data, tmp_path, capsys):
    from dreamprm_jax.cli.train import main

    out = str(tmp_path / "instance")
    cfg = tiny_config(tiny_data, out)
    code = main(["--weighting", "instance_table", "--iterations", "20", "--train-json", cfg.train_json,
                 "--meta-json", cfg.meta_json, "--image-root", cfg.image_root, "--cache-dir", cfg.cache_dir,
                 "--out-dir", out, "--model-hidden-size", "32", "--model-layers", "1", "--train-batch-size", "4",
                 "--meta-batch-size", "2", "--unroll", "2", "--seq-buckets", "192", "--patch-buckets", "256",
                 "--meta-lr-warmup", "0", "--meta-warmup", "0", "--checkpoint-every", "100", "--progress", "false"])
    assert code == 0
    records = json.load(open(cfg.train_json))
    with open(os.path.join(out, "instance_weights.json")) as f:
        weights = json.load(f)
    assert list(weights) == [f"{r['id']}/{r['sid']}" for r in records]  # one per record, in file order
    values = np.array(list(weights.values()))
    assert np.all((values > 0.0) & (values < 2.0)) and np.std(values) > 0
    printed = capsys.readouterr().out
    assert "mean instance weight" in printed and "highest and lowest per domain" in printed
    # a fresh PRM under those weights, held fixed
    held = str(tmp_path / "held")
    code = main(["--weighting", "instance_table", "--record-weights-file", os.path.join(out, "instance_weights.json"),
                 "--iterations", "2", "--train-json", cfg.train_json, "--meta-json", cfg.meta_json, "--image-root",
                 cfg.image_root, "--cache-dir", cfg.cache_dir, "--out-dir", held, "--model-hidden-size", "32",
                 "--model-layers", "1", "--train-batch-size", "4", "--meta-batch-size", "2", "--unroll", "2",
                 "--seq-buckets", "192", "--patch-buckets", "256", "--checkpoint-every", "100", "--progress", "false"])
    assert code == 0
    with open(os.path.join(held, "instance_weights.json")) as f:
        again = json.load(f)
    assert list(again) == list(weights)
    np.testing.assert_allclose(list(again.values()), values, rtol=1e-5)


def test_normalization_needs_instance_weights():
    from dreamprm_jax.configs import TrainConfig
    from dreamprm_jax.configs.train_config import AGGREGATIONS, INSTANCE_NORMALIZATIONS

    assert INSTANCE_NORMALIZATIONS == bilevel.INSTANCE_NORMALIZATIONS  # the config's copy imports no JAX
    assert AGGREGATIONS == bilevel.CHAIN_REDUCTIONS
    with pytest.raises(ValueError, match="aggregation: expected one of"):
        TrainConfig(aggregation="max")
    with pytest.raises(ValueError, match="record_weights_file holds a weight per record"):
        TrainConfig(record_weights_file="w.json")  # domain weighting
    assert TrainConfig(weighting="instance_net", instance_normalize="batch").instance_normalize == "batch"
    with pytest.raises(ValueError, match="needs instance weights"):
        TrainConfig(instance_normalize="label")  # domain weighting
    with pytest.raises(ValueError, match="instance_normalize: expected one of"):
        TrainConfig(weighting="instance_table", instance_normalize="group")
