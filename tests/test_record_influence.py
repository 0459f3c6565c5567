"""Each record's first-order influence on a meta loss (dreamprm_jax/train/record_influence.py)
and the ``experiments.influence`` command, on a tiny trained run."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train import demo, loop
from dreamprm_jax.train import step as step_lib
from dreamprm_jax.train.record_influence import meta_gradient, record_influence
from tests.tiny_run import tiny_config, train


@pytest.fixture(scope="module")
def vanilla_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vanilla"))
    # meta batches of 8 chains hold whole questions (the ranking losses draw them so)
    cfg = tiny_config(tiny_data, out, reweighting=False, iterations=2, export=True, meta_batch_size=8)
    train(cfg)
    return cfg


def test_influence_is_the_dot_product_of_the_record_and_meta_gradients(vanilla_run):
    cfg = dataclasses.replace(vanilla_run, meta_loss="listwise")
    data = demo.resolve_data(cfg).data
    model = loop.load_model(os.path.join(cfg.out_dir, "export"), cfg)
    sources = loop.build_batch_sources(cfg, model.config, model.processor, data)
    _, outer_loss = step_lib.make_losses(model.config, cfg.aggregation, cfg.meta_loss)
    direction = meta_gradient(model.config, model.params, outer_loss, sources.meta_builder, sources.meta_sampler, 2)
    influence = record_influence(model.config, model.params, direction, sources.train_table, sources.train_builder,
                                 cfg.train_batch_size)
    assert influence.shape == (len(sources.train_table.samples),) and np.all(np.isfinite(influence))

    # the same by reverse mode, one record at a time
    flat_direction, _ = ravel_pytree(direction)
    batch, _ = sources.train_builder.train_batch(np.arange(cfg.train_batch_size))
    inputs = qwen2_vl.with_rope_tables(model.config, batch.inputs)

    def loss_of(params, i):
        probs, _ = prm.score(model.config, params, inputs)  # [B]
        return jnp.square(probs[i] - jnp.asarray(batch.labels)[i])

    @jax.jit
    def dot_and_norm(params, i):  # one compiled program for every row
        grad_i, _ = ravel_pytree(jax.grad(loss_of)(params, i))
        return jnp.dot(grad_i, flat_direction), jnp.linalg.norm(grad_i)

    for i in range(cfg.train_batch_size):
        expected, norm = dot_and_norm(model.params, jnp.int32(i))
        np.testing.assert_allclose(influence[i], float(expected), rtol=1e-3, atol=1e-9 * float(norm))
    assert np.std(influence) > 0
    with pytest.raises(ValueError, match="num_batches >= 1"):
        meta_gradient(model.config, model.params, outer_loss, sources.meta_builder, sources.meta_sampler, 0)


def test_influence_command_writes_one_value_per_record(vanilla_run, tmp_path, capsys):
    from dreamprm_jax.cli.influence import main

    out = str(tmp_path / "influence")
    assert main(["--run-dir", vanilla_run.out_dir, "--meta-losses", "chain_mse,listwise", "--meta-batches", "2",
                 "--out", out, "--no-progress"]) == 0
    records = json.load(open(vanilla_run.train_json))
    for name in ("chain_mse", "listwise"):
        values = json.load(open(os.path.join(out, f"{name}.json")))
        assert list(values) == [f"{r['id']}/{r['sid']}" for r in records]
    printed = capsys.readouterr().out
    assert "chain_mse (mean): AUROC of the influence for 'label correct'" in printed and "misled_B" in printed
    assert main(["--run-dir", vanilla_run.out_dir, "--meta-losses", "hinge", "--out", out]) == 2
    assert "unknown meta loss" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "nothing"), "--out", out]) == 2
    assert "no export" in capsys.readouterr().err
