"""End-to-end tests of the training loop on a tiny generated benchmark and a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamprm_jax import bilevel
from dreamprm_jax import data as data_lib
from dreamprm_jax.cli import train as train_cli
from dreamprm_jax.train import demo, loop
from dreamprm_jax.train import step as step_lib
from tests.tiny_run import final_state, tiny_config, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # bit for bit (atol=0, rtol=0)


def test_resume_continues_bit_for_bit(tiny_data, tmp_path):
    ramp = dict(meta_lr_warmup=3)  # the meta learning-rate ramp spans the resume point
    straight = train(tiny_config(tiny_data, str(tmp_path / "straight"), **ramp))
    assert straight.step == 4 and not straight.interrupted
    assert np.all(np.isfinite(straight.weights))

    half = str(tmp_path / "halves")
    first = train(tiny_config(tiny_data, half, iterations=2, **ramp))
    assert first.step == 2
    second = train(tiny_config(tiny_data, half, iterations=4, resume=True, **ramp))
    assert second.step == 4

    step_a, state_a, extra_a = final_state(str(tmp_path / "straight"))
    step_b, state_b, extra_b = final_state(half)
    assert step_a == step_b == 4
    assert_trees_equal(state_a, state_b)
    assert extra_a["train_sampler"] == extra_b["train_sampler"]
    assert extra_a["meta_sampler"] == extra_b["meta_sampler"]
    # The metrics log of the resumed run has one record per iteration, none duplicated.
    with open(os.path.join(half, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4]


def test_sigterm_saves_and_resume_matches(tiny_data, tmp_path):
    """SIGTERM mid-run: a checkpoint is written, the process exits 0, and resuming gives
    the same state as an uninterrupted run of the same length."""
    out = str(tmp_path / "interrupted")
    cfg = tiny_config(tiny_data, out, iterations=10_000, checkpoint_every=10_000, meta_lr_warmup=3)
    args = [sys.executable, "-m", "experiments.train", "--train-json", cfg.train_json, "--meta-json", cfg.meta_json,
            "--image-root", cfg.image_root, "--cache-dir", cfg.cache_dir, "--out-dir", out,
            "--model-hidden-size", "32", "--model-layers", "1", "--train-batch-size", "4", "--meta-batch-size", "2",
            "--unroll", "2", "--seq-buckets", "192", "--patch-buckets", "256", "--log-every", "1", "--progress", "false", "--export", "false",
            "--iterations", "10000", "--checkpoint-every", "10000", "--meta-warmup", "0", "--meta-lr-warmup", "3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(log) and os.path.getsize(log) > 0:
            with open(log) as f:
                if sum(1 for _ in f) >= 2:
                    break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert "[interrupted]" in stdout

    step, state, _ = final_state(out)
    assert step >= 2
    resumed = train(dataclasses.replace(cfg, iterations=step + 1, resume=True))
    assert resumed.step == step + 1
    straight_dir = str(tmp_path / "straight")
    train(dataclasses.replace(cfg, out_dir=straight_dir, iterations=step + 1, checkpoint_every=1000))
    _, state_resumed, _ = final_state(out)
    _, state_straight, _ = final_state(straight_dir)
    assert_trees_equal(state_resumed, state_straight)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    out = str(tmp_path / "diverged")
    cfg = tiny_config(tiny_data, out, iterations=2)
    train(cfg)  # a good checkpoint at step 2
    with pytest.raises(loop.TrainingDiverged, match="non-finite.*last good checkpoint is step 2"):
        train(dataclasses.replace(cfg, iterations=4, resume=True, inner_lr=float("inf")))
    step, state, _ = final_state(out)
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))


def test_meta_lr_ramps_linearly_from_zero():
    opt = step_lib.meta_optimizer(0.03, 0.0, warmup=4)
    raw = jnp.zeros((2,), jnp.float32)
    opt_state = opt.init(raw)
    sizes = []
    for _ in range(6):  # a constant gradient: Adam's step is lr_t * sign(g)
        updates, opt_state = opt.update(jnp.array([1.0, -2.0]), opt_state, raw)
        sizes.append(np.asarray(updates))
    expected = [0.0, 0.0075, 0.015, 0.0225, 0.03, 0.03]
    np.testing.assert_allclose([-u[0] for u in sizes], expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose([u[1] for u in sizes], expected, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="warmup"):
        step_lib.meta_optimizer(0.03, 0.0, warmup=-1)


def test_shared_second_moment_keeps_relative_step_sizes():
    """One second moment for all entries: a one-entry variable gets Adam's steps; a sparse
    update moves each entry in proportion to its gradient (per-entry Adam moves all alike)."""
    one = jnp.zeros((1,), jnp.float32)
    shared, adam = step_lib.meta_optimizer(0.1, 0.0, second_moment="shared"), optax.adam(0.1)
    s_shared, s_adam = shared.init(one), adam.init(one)
    for g in (0.5, -2.0, 0.1, 3.0):
        u_shared, s_shared = shared.update(jnp.array([g]), s_shared, one)
        u_adam, s_adam = adam.update(jnp.array([g]), s_adam, one)
        np.testing.assert_allclose(u_shared, u_adam, rtol=1e-6, atol=0)
    raw = jnp.zeros((6,), jnp.float32)
    g = jnp.array([0.0, 4.0, 0.0, -1.0, 0.5, 0.0])  # a batch touched three of six records
    steps, state = step_lib.meta_optimizer(0.1, 0.0, second_moment="shared").update(
        g, step_lib.meta_optimizer(0.1, 0.0, second_moment="shared").init(raw), raw)
    rms_nonzero = np.sqrt((16.0 + 1.0 + 0.25) / 3)
    np.testing.assert_allclose(steps, -0.1 * np.asarray(g) / rms_nonzero, rtol=1e-5, atol=1e-12)
    per_entry, _ = step_lib.meta_optimizer(0.1, 0.0).update(g, step_lib.meta_optimizer(0.1, 0.0).init(raw), raw)
    np.testing.assert_allclose(np.abs(per_entry)[[1, 3, 4]], 0.1, rtol=1e-5)  # sign-like: size lost
    assert int(state[0].count) == 1
    with pytest.raises(ValueError, match="second_moment"):
        step_lib.meta_optimizer(0.1, 0.0, second_moment="global")


def test_hypergradient_clip_is_relative_to_the_recent_median():
    clip = step_lib.clip_by_recent_median(2.0, window=4)
    state = clip.init(None)
    out = []
    for norm in [1.0, 1.0, 2.0, 10.0, 1.0, 3.0, 7.0]:
        g = {"r": jnp.array([0.6, 0.8]) * norm}  # global norm = norm
        clipped, state = clip.update(g, state)
        out.append(float(jnp.linalg.norm(clipped["r"])))
        np.testing.assert_allclose(clipped["r"] / out[-1], [0.6, 0.8], rtol=1e-6)  # direction kept
    # limits: none (no history), 2 * median of the remembered (unclipped) norms
    # [1], [1, 1], [1, 1, 2], [1, 1, 2, 10], then the window of 4 drops the oldest: [2, 10, 1, 3] -> 5
    np.testing.assert_allclose(out, [1.0, 1.0, 2.0, 2.0, 1.0, 3.0, 5.0], rtol=1e-6)
    with pytest.raises(ValueError, match="factor"):
        step_lib.clip_by_recent_median(0.0)


def test_vanilla_prm_keeps_uniform_weights_and_exports(tiny_data, tmp_path):
    out = str(tmp_path / "vanilla")
    finished = train_cli.run(tiny_config(tiny_data, out, iterations=2, reweighting=False, export=True))
    result = finished.result
    np.testing.assert_allclose(result.weights, np.ones(len(result.domains)), rtol=1e-6, atol=0)
    assert finished.planted_quality is None and finished.spearman is None  # record files, nothing planted
    assert result.export_dir == os.path.join(out, "export")
    assert result.weights_path == os.path.join(out, "domain_weights.json")
    assert result.metrics_path == os.path.join(out, "metrics.jsonl")
    assert os.path.isfile(os.path.join(out, "export", "prm_head.safetensors"))
    assert os.path.isfile(os.path.join(out, "export", "tokenizer.json"))
    with open(os.path.join(out, "domain_weights.json")) as f:
        assert set(json.load(f)) == set(result.domains)
    assert os.path.isfile(os.path.join(out, "domain_weights.png"))


def test_ranking_meta_loss_learns_weights_from_whole_questions(tiny_data, tmp_path):
    """--meta-loss pairwise: each meta batch holds whole meta questions (4 candidates here) and
    the exact hypergradient through the ranking loss moves the weights."""
    cfg = tiny_config(tiny_data, str(tmp_path / "pairwise"), iterations=2, meta_batch_size=4, meta_loss="pairwise")
    source = demo.resolve_data(cfg)
    model = demo.resolve_model(cfg, source.data)
    sources = loop.build_batch_sources(cfg, model.config, model.processor, source.data)
    assert isinstance(sources.meta_sampler, data_lib.QuestionSampler)
    batch, _ = sources.meta_builder.meta_batch(sources.meta_sampler.next())
    assert np.all(batch.question_index == batch.question_index[0]) and 0 < batch.labels.sum() < 4
    result = loop.train(cfg, source.data, model)
    assert np.isfinite(result.final_metrics["meta_loss"]) and result.final_metrics["hypergrad_norm"] > 0
    assert np.max(np.abs(result.weights - 1.0)) > 1e-6, result.weights
    with pytest.raises(ValueError, match="meta_loss must be one of"):
        step_lib.make_losses(model.config, "mean", "hinge")


def test_raw_weights_for_gives_the_normalised_weights():
    domains = ("a", "b", "c")
    raw = loop.raw_weights_for({"c": 3.0, "a": 1.0, "b": 0.002}, domains)
    expected = np.array([1.0, 0.002, 3.0]) / np.mean([1.0, 0.002, 3.0])
    np.testing.assert_allclose(np.asarray(bilevel.domain_weights(jnp.asarray(raw))), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="one weight for each of the data's domains"):
        loop.raw_weights_for({"a": 1.0, "b": 1.0}, domains)
    with pytest.raises(ValueError, match="finite weights > 0"):
        loop.raw_weights_for({"a": 1.0, "b": 0.0, "c": 1.0}, domains)


def test_raw_record_weights_for_gives_the_bounded_weights():
    keys = ("r/1", "r/0", "q/3")
    raw = loop.raw_record_weights_for({"q/3": 1.9, "r/0": 0.001, "r/1": 1.0, "extra/0": 5.0}, keys, 2.0)
    np.testing.assert_allclose(np.asarray(bilevel.instance_weights(jnp.asarray(raw), 2.0)), [1.0, 0.001, 1.9],
                               rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="no weight for 1 of the 3 training records"):
        loop.raw_record_weights_for({"r/1": 1.0, "r/0": 1.0}, keys, 2.0)
    with pytest.raises(ValueError, match="record 'r/0' has weight 2.0; expected finite weights in"):
        loop.raw_record_weights_for({"r/1": 1.0, "r/0": 2.0, "q/3": 1.0}, keys, 2.0)


def test_small_loss_weights_rank_the_losses():
    from dreamprm_jax.train.record_losses import small_loss_weights

    w = small_loss_weights({"a": 0.3, "b": 0.1, "c": 0.3, "d": 0.9})
    assert w == {"a": 1.0, "b": 1.75, "c": 1.0, "d": 0.25}  # ranks 1.5, 0, 1.5, 3 of 4: 2 (1 - (rank + 1/2) / 4)
    rng = np.random.default_rng(0)
    many = small_loss_weights({str(i): float(x) for i, x in enumerate(rng.uniform(size=101))}, max_weight=3.0)
    values = np.array(list(many.values()))
    assert abs(values.mean() - 1.5) < 1e-12 and 0.0 < values.min() and values.max() < 3.0
    with pytest.raises(ValueError, match="finite losses"):
        small_loss_weights({"a": float("nan")})


def test_fixed_domain_weights_are_held_and_runs_repeat_in_one_process(tiny_data, tmp_path):
    """Three arms in one process: learned weights, then fixed weights (held through training)
    with another config, then the fixed arm again, which repeats it bit for bit."""
    cfg = tiny_config(tiny_data, str(tmp_path / "learned"), iterations=2, hypergradient="darts")
    learned = train(cfg)
    assert learned.step == 2 and learned.final_metrics["hypergrad_norm"] > 0

    given = {d: float(i + 1) for i, d in enumerate(learned.domains)}
    expected = np.arange(1, len(given) + 1) / np.mean(np.arange(1, len(given) + 1))  # [K], mean 1
    fixed_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "fixed"), hypergradient="exact")
    fixed = train(fixed_cfg, fixed_domain_weights=given)
    assert fixed.domains == learned.domains
    np.testing.assert_allclose(fixed.weights, expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose([fixed.final_metrics["domain_weights"][d] for d in fixed.domains], expected,
                               rtol=1e-6, atol=0)
    assert fixed.final_metrics["hypergrad_norm"] == 0.0  # reweighting off: no hypergradient
    _, state, extra = final_state(fixed.out_dir)
    assert extra["config"]["reweighting"] is False

    again = train(dataclasses.replace(fixed_cfg, out_dir=str(tmp_path / "again")), fixed_domain_weights=given)
    np.testing.assert_array_equal(again.weights, fixed.weights)  # bit for bit (atol=0, rtol=0)
    assert_trees_equal(state, final_state(again.out_dir)[1])


def test_trains_from_transformers_checkpoint_directory(tiny_data, tmp_path):
    """The CLI trains from a tiny Qwen2-VL saved by transformers plus DreamPRM JSON and images."""
    import shutil

    import transformers

    from dreamprm_jax.data.processor import Processor
    from dreamprm_jax.data.records import iter_texts, load_train_records
    from dreamprm_jax.data.tokenizer import build_offline_tokenizer
    from dreamprm_jax.models import qwen2_vl

    model_dir = str(tmp_path / "hf_model")
    texts = list(iter_texts(load_train_records(os.path.join(tiny_data, "train.json"), check_images=False).records))
    build_offline_tokenizer(texts, 300, model_dir)
    ids = Processor.from_directory(model_dir).special_token_ids
    config = qwen2_vl.tiny(vocab_size=ids.vocab_size, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                           vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    hf_config = transformers.Qwen2VLConfig.from_dict(config.to_hf_dict())
    transformers.Qwen2VLForConditionalGeneration(hf_config).save_pretrained(model_dir)
    assert not any(name.endswith((".bin", ".pt")) for name in os.listdir(model_dir))

    out = str(tmp_path / "from_hf")
    from dreamprm_jax.cli.train import main

    code = main(["--model-dir", model_dir, "--train-json", os.path.join(tiny_data, "train.json"),
                 "--meta-json", os.path.join(tiny_data, "meta.json"), "--image-root", tiny_data,
                 "--cache-dir", os.path.join(tiny_data, "cache"), "--out-dir", out, "--max-pixels", str(32 * 32),
                 "--train-batch-size", "4", "--meta-batch-size", "2", "--unroll", "2", "--iterations", "2",
                 "--seq-buckets", "320", "--patch-buckets", "1024",
                 "--checkpoint-every", "2", "--progress", "false"])
    assert code == 0
    exported = os.path.join(out, "export")
    assert os.path.isfile(os.path.join(exported, "prm_head.safetensors"))
    reloaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(exported)
    assert reloaded.get_input_embeddings().weight.shape[0] == ids.vocab_size
    shutil.rmtree(out)


def test_cli_reports_bad_record_with_file_and_field(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad_train.json"
    records = json.load(open(os.path.join(tiny_data, "train.json")))[:3]
    records[1]["accuracy"] = 1.5
    bad.write_text(json.dumps(records))
    from dreamprm_jax.cli.train import main

    code = main(["--train-json", str(bad), "--meta-json", os.path.join(tiny_data, "meta.json"),
                 "--image-root", tiny_data, "--out-dir", str(tmp_path / "run"), "--progress", "false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad_train.json" in err and "accuracy" in err and "record 1" in err
