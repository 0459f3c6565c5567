"""The reweighting study end to end on a tiny configuration, and its analysis on known cases."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from dreamprm_jax import configs
from dreamprm_jax.cli import study as study_cli
from dreamprm_jax.data import synthetic
from dreamprm_jax.evaluation.selection import Oracle, Random, SelectionInputs
from dreamprm_jax.study import analysis, arms, report, runner
from dreamprm_jax.train.record_losses import small_loss_weights


def _inputs(correct: np.ndarray) -> SelectionInputs:
    q, n = correct.shape
    return SelectionInputs(question_ids=tuple(f"q{i}" for i in range(q)), benchmarks=("b",) * q,
                           correct=correct, candidate_mask=np.ones((q, n), bool),
                           answer_ids=np.tile(np.arange(n, dtype=np.int32), (q, 1)))


def test_best_of_n_hits_known_cases():
    correct = np.array([[True, False, False, False], [False, False, False, False], [True, True, True, True]])
    inputs = _inputs(correct)
    oracle = analysis.best_of_n_hits(inputs, Oracle(), (1, 2, 4), trials=2000, seed=0)
    np.testing.assert_array_equal(oracle[4], [1.0, 0.0, 1.0])       # one subset at the full count
    np.testing.assert_allclose(oracle[2], [0.5, 0.0, 1.0], atol=0.04)  # P(candidate 0 among 2 of 4) = 1/2
    rand = analysis.best_of_n_hits(inputs, Random(), (4,), trials=5, seed=0)
    assert set(np.unique(rand[4])) <= {0.0, 1.0}
    # the scores' order decides: correct candidate scored highest -> always right at n = 4
    scores = np.where(correct, 1.0, 0.0)
    outcome = analysis.arm_outcome(inputs, scores, ns=(4,), trials=1, seed=0)
    np.testing.assert_array_equal(outcome.hits[4], [1.0, 0.0, 1.0])
    assert outcome.within_question_auroc == pytest.approx(1.0, abs=1e-12)  # only q0 has both kinds


def test_test_pairwise_losses_match_the_training_losses_and_separate_scale_from_order():
    import jax.numpy as jnp

    from dreamprm_jax import bilevel

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 4))                                     # [Q, N]
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]], bool)
    mask = np.ones((5, 4), bool)
    mask[4, 3] = False                                                   # a question with 3 candidates
    plain, scale_free = analysis.test_pairwise_losses(scores, correct, mask)
    with jax.enable_x64(True):
        flat = dict(scores=jnp.asarray(scores.reshape(-1)), labels=jnp.asarray(correct.reshape(-1), jnp.float64),
                    question_index=jnp.repeat(jnp.arange(5), 4), chain_mask=jnp.asarray(mask.reshape(-1), jnp.float64))
        assert plain == pytest.approx(float(bilevel.pairwise_loss(**flat)), rel=1e-6)
        assert scale_free == pytest.approx(float(bilevel.normalized_pairwise_loss(**flat)), rel=1e-6)
    spread_plain, spread_free = analysis.test_pairwise_losses(3.0 * scores, correct, mask)
    assert spread_free == pytest.approx(scale_free, rel=1e-3) and abs(spread_plain - plain) > 0.05
    assert np.isnan(analysis.test_pairwise_losses(scores, np.zeros((5, 4), bool), mask)[0])


def test_step_auroc_by_error_type():
    logits = np.array([[[2.0, 1.0, -1.0], [2.0, 0.5, 3.0]]])   # [Q=1, N=2, S=3]
    labels = np.array([[[1, 1, 0], [1, 1, 0]]])
    types = np.array([[["", "", "A"], ["", "", "B"]]], dtype=object)
    out = analysis.step_auroc_by_error_type(logits, labels, types)
    assert out["A"] == pytest.approx(1.0, abs=1e-12)              # -1 is below every correct step
    assert out["B"] == pytest.approx(0.0, abs=1e-12)              # 3 is above every correct step
    assert analysis.gap_closed(0.1, 0.2) == pytest.approx(0.5, abs=1e-12)
    assert np.isnan(analysis.gap_closed(0.1, 0.0))


def test_every_arm_sets_valid_training_fields():
    for arm in arms.ARMS.values():
        dataclasses.replace(configs.default(), **dict(arm.overrides))  # unknown fields or bad values raise


def test_arms_put_the_baseline_first():
    assert [a.name for a in arms.get_arms(["dreamprm", "vanilla"])] == ["vanilla", "dreamprm"]
    assert [a.name for a in arms.get_arms(["darts"])] == ["vanilla", "darts"]
    with pytest.raises(ValueError, match="unknown study arm"):
        arms.get_arms(["nope"])


def test_read_oracle_weights_errors(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{"a": 1, "b": -2}')
    with pytest.raises(ValueError, match="'b'.*expected a number >= 0"):
        runner.read_oracle_weights(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a non-empty JSON object"):
        runner.read_oracle_weights(str(path))


def _tiny_study(out_dir: str) -> runner.StudyConfig:
    train = dataclasses.replace(
        configs.default(), cache_dir=os.path.join(out_dir, "cache"), model_hidden_size=32, model_layers=1,
        train_batch_size=4, meta_batch_size=2, unroll=2, iterations=2, checkpoint_every=100, log_every=1,
        meta_warmup=0, meta_lr_warmup=0, seq_buckets=(192,), patch_buckets=(256,))
    return runner.StudyConfig(out_dir=out_dir, seeds=(0,),
                              arms=("vanilla", "vanilla_reseeded", "dreamprm", "oracle_weights", "instance_table",
                                    "instance_net", "small_loss"),
                              train=train, synthetic=synthetic.tiny_config(), ns=(2, 8), trials=3, resamples=200,
                              progress=False)


def test_study_end_to_end_and_resume(tmp_path):
    config = _tiny_study(str(tmp_path))
    results = runner.run_study(config)
    paths, text = report.write_study(config, results, wall_seconds=1.0)
    summary = json.load(open(paths["json"]))
    assert set(summary["paired"]) == {"vanilla_reseeded", "dreamprm", "oracle_weights", "instance_table",
                                      "instance_net", "small_loss"}
    for row in summary["paired"].values():
        lo, hi = row["ci95"]
        assert -1.0 <= lo <= row["diff"] <= hi <= 1.0
    seed0 = summary["per_seed"][0]
    assert seed0["num_questions"] == synthetic.tiny_config().test
    assert set(seed0["baselines"]) == {"self_consistency", "random", "oracle_answer"}
    oracle_w = seed0["arms"]["oracle_weights"]["weights"]
    assert oracle_w["misled_B"] < oracle_w["good_1"]                # trained under the manifest's oracle weights
    assert "spearman_vs_quality" in seed0["arms"]["dreamprm"]
    signal = seed0["arms"]["dreamprm"]["hypergradient_signal"]     # logged every iteration, read back
    assert set(signal) == set(oracle_w) and all(s["iterations"] >= 1 for s in signal.values())
    assert "hypergradient_signal" not in seed0["arms"]["vanilla"]
    # another initialisation and data order: the same uniform weights, other scores
    reseeded = np.load(os.path.join(str(tmp_path), "seed_0", "vanilla_reseeded", "test_scores.npz"))["step_logits"]
    plain = np.load(os.path.join(str(tmp_path), "seed_0", "vanilla", "test_scores.npz"))["step_logits"]
    assert seed0["arms"]["vanilla_reseeded"]["weights"] == seed0["arms"]["vanilla"]["weights"]
    assert not np.allclose(reseeded, plain)
    assert summary["paired"]["dreamprm"]["per_seed"] == [seed0["arms"]["dreamprm"]["paired"]["diff"]]
    assert "Hypergradient per domain" in text
    # the instance arms: per domain, the AUROC of the record weights for "label correct"
    for arm in ("instance_table", "instance_net"):
        label_auroc = seed0["arms"][arm]["instance_weight_auroc"]
        assert set(label_auroc) == set(oracle_w)
        assert all(v is None or 0.0 <= v <= 1.0 for v in label_auroc.values())
        assert any(v is not None for v in label_auroc.values())  # misled_B's defective labels
    assert "instance_weight_auroc" not in seed0["arms"]["dreamprm"]
    assert set(seed0["arms"]["instance_table"]["instance_weight_auroc_label_too_high"]) == set(oracle_w)
    assert "AUROC of the learned instance weights" in text
    # the bar they are set against: minus each record's loss under the vanilla PRM, cached
    loss_auroc = seed0["arms"]["vanilla"]["loss_auroc"]
    assert set(loss_auroc) == {"any", "too_high", "too_low"} and set(loss_auroc["any"]) == set(oracle_w)
    assert any(v is not None and 0.0 <= v <= 1.0 for v in loss_auroc["any"].values())
    losses = json.load(open(os.path.join(str(tmp_path), "seed_0", "vanilla", "record_losses.json")))
    assert list(losses) == list(json.load(open(os.path.join(str(tmp_path), "seed_0", "instance_table",
                                                            "instance_weights.json"))))  # every record, same keys
    assert all(0.0 <= v <= 1.0 for v in losses.values()) and len(set(losses.values())) > 1  # (p - y)^2 of each
    assert "vanilla: minus its loss, no weight learned" in text
    # small_loss trained under the vanilla PRM's losses, ranked, held fixed
    held = json.load(open(os.path.join(str(tmp_path), "seed_0", "small_loss", "instance_weights.json")))
    expected = small_loss_weights(losses)
    assert list(held) == list(expected)
    np.testing.assert_allclose(list(held.values()), list(expected.values()), rtol=1e-5)
    assert "loss_auroc" not in seed0["arms"]["dreamprm"]
    assert "Reweighting study" in text and os.path.isfile(paths["best_of_n_png"])
    assert os.path.isfile(paths["weights_png"])
    assert set(summary["versus_dreamprm"]) == {"instance_table", "instance_net"}  # learned arms, not fixed ones
    assert set(summary["selection_vs_step_auroc"]) <= {"A", "B", "C"}
    assert "selection_vs_step_auroc_png" not in paths or os.path.isfile(paths["selection_vs_step_auroc_png"])
    # a second run reuses every finished piece: nothing is trained or scored again
    again = runner.run_study(config)
    assert all(run.train_seconds == 0.0 and run.score_seconds == 0.0 for run in again[0].arms.values())
    assert again[0].arms["vanilla"].loss_auroc == results[0].arms["vanilla"].loss_auroc  # from record_losses.json
    np.testing.assert_array_equal(again[0].arms["dreamprm"].outcome.hits[8], results[0].arms["dreamprm"].outcome.hits[8])


def _fake_run(arm: str, hits: np.ndarray, step_auroc: dict) -> runner.ArmRun:
    outcome = analysis.ArmOutcome(hits={4: hits}, within_question_auroc=0.5, step_auroc=step_auroc, score_std=1.0)
    return runner.ArmRun(arm, {"d": 1.0}, outcome, 0.0, 0.0, "/nonexistent")


def test_summary_compares_learned_arms_with_dreamprm_and_correlates_selection_with_step_auroc():
    rng = np.random.default_rng(0)
    results, cells = [], []
    for seed in range(2):
        base = rng.integers(0, 2, 400).astype(float)                    # [Q] hits
        other = np.where(rng.random(400) < 0.2, 1.0, base)              # about +0.1 on the questions base missed
        runs = {}
        for i, (arm, hits) in enumerate((("vanilla", base), ("dreamprm", base), ("dreamprm_pairwise", other))):
            auroc = {"B": 0.6 + 0.1 * i + 0.05 * seed, "C": 0.8}
            runs[arm] = _fake_run(arm, hits, auroc)
            cells.append((auroc["B"], hits.mean()))
        results.append(runner.SeedResult(seed, 400, runs, {}, None, None))
    config = runner.StudyConfig(ns=(4,), resamples=500, progress=False)
    summary = report.summarize(config, results, 1.0)
    row = summary["versus_dreamprm"]["dreamprm_pairwise"]
    expected = np.mean([r.arms["dreamprm_pairwise"].outcome.hits[4].mean() - r.arms["dreamprm"].outcome.hits[4].mean()
                        for r in results])
    assert row["diff"] == pytest.approx(expected, abs=1e-12) and row["ci95"][0] > 0 and row["seeds"] == [0, 1]
    assert set(summary["versus_dreamprm"]) == {"dreamprm_pairwise"}
    spread = summary["paired"]["dreamprm_pairwise"]
    per_seed = [r.arms["dreamprm_pairwise"].outcome.hits[4].mean() - r.arms["vanilla"].outcome.hits[4].mean()
                for r in results]
    np.testing.assert_allclose(spread["per_seed"], per_seed, rtol=0, atol=1e-12)
    assert spread["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert spread["seed_t"] == pytest.approx(np.mean(per_seed) / (np.std(per_seed, ddof=1) / np.sqrt(2)), rel=1e-9)
    np.testing.assert_allclose(row["per_seed"], per_seed, rtol=0, atol=1e-12)  # dreamprm's hits are vanilla's here
    x, y = np.array(cells).T
    corr = summary["selection_vs_step_auroc"]
    assert corr["B"]["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12) and corr["B"]["cells"] == 6
    assert "C" not in corr                                               # constant AUROC: no correlation
    text = report.format_report(summary)
    assert "minus `dreamprm`" in text and "| B | " in text


def test_cli_rejects_partial_user_data(capsys):
    assert study_cli.main(["--train-json", "t.json"]) == 2
    assert "--train-json, --meta-json and --candidates together" in capsys.readouterr().err


def test_train_options_parse_by_field_type():
    assert configs.parse_override("meta-lr=0.1") == ("meta_lr", 0.1)
    assert configs.parse_override("meta_loss=listwise") == ("meta_loss", "listwise")
    assert configs.parse_override("pack_meta=off") == ("pack_meta", False)
    assert configs.parse_override("seq_buckets=64, 128") == ("seq_buckets", (64, 128))
    assert configs.parse_override("mesh=None") == ("mesh", None)
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
        configs.parse_override("meta_lrate=0.1")
    with pytest.raises(ValueError, match="meta_lr expects a float"):
        configs.parse_override("meta_lr=fast")


def test_cli_train_options_reach_every_arm():
    args = study_cli.build_parser().parse_args(["--quick", "--train-option", "meta_lr=0.1",
                                                "--train-option", "unroll=3", "--iterations", "7"])
    config = study_cli.config_from_args(args)
    assert (config.train.meta_lr, config.train.unroll, config.train.iterations) == (0.1, 3, 7)
    assert config.seeds == (0,)


def test_hypergradient_signal_reads_the_second_half(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for step in range(1, 101):
            # the first half is pushed the other way: only steps 51..100 count
            a = -5.0 if step <= 50 else 1.0 + 0.1 * rng.standard_normal()
            c = 1e4 if step == 60 else -0.01  # pushed up every iteration but one huge spike
            f.write(json.dumps({"step": step, "hypergradient": {"a": a, "b": 0.1 * rng.standard_normal(),
                                                                  "c": c}}) + "\n")
        f.write(json.dumps({"step": 101, "meta_loss": 0.2}) + "\n")    # no hypergradient: skipped
    signal = analysis.hypergradient_signal(str(path))
    assert signal["a"].iterations == 50 and signal["a"].mean == pytest.approx(1.0, abs=0.05)
    assert signal["a"].t > 50                                         # consistent push
    assert abs(signal["b"].t) < 4                                     # noise
    assert signal["a"].share_down == 1.0 and signal["a"].median == pytest.approx(1.0, abs=0.05)
    # a spike makes the mean positive and t about 1; the median and the share see the push up
    assert signal["c"].mean > 0 and abs(signal["c"].t) < 1.1
    assert signal["c"].median == -0.01 and signal["c"].share_down == pytest.approx(1 / 50)
    assert analysis.hypergradient_signal(str(tmp_path / "missing.jsonl")) == {}


def test_instance_weight_auroc_known_case(tmp_path):
    records = [{"input": "q", "add": f"Step {k}", "image_path": None, "dataset": d, "accuracy": acc,
                "id": f"{d}-0", "sid": k, "true_label": truth}
               for d, rows in (("a", [(0.9, 1), (0.8, 1), (0.2, 1), (0.1, 1)]), ("b", [(1.0, 1), (0.9, 1)]))
               for k, (acc, truth) in enumerate(rows, 1)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    # domain a: the two correct labels weigh 1.5 and 1.2, the wrong ones 0.5 and 1.3 -> AUROC 3/4
    weights = {"a-0/1": 1.5, "a-0/2": 1.2, "a-0/3": 0.5, "a-0/4": 1.3, "b-0/1": 1.0, "b-0/2": 0.9}
    out = analysis.instance_weight_auroc(str(path), weights)
    assert out["a"] == pytest.approx(0.75, abs=1e-12)
    assert out["b"] is None                                           # every label of b is correct
    # a's wrong labels are both too low (correct steps labelled 0.2 and 0.1)
    assert analysis.instance_weight_auroc(str(path), weights, "too_low")["a"] == pytest.approx(0.75, abs=1e-12)
    assert analysis.instance_weight_auroc(str(path), weights, "too_high")["a"] is None   # none too high
    with pytest.raises(ValueError, match="wrong must be one of"):
        analysis.instance_weight_auroc(str(path), weights, "both")
    for r in records:
        del r["true_label"]
    path.write_text(json.dumps(records))
    assert analysis.instance_weight_auroc(str(path), weights) == {}   # real data: no true labels
