"""The PRM scorer (evaluation.prm_scorer) and the evaluate CLI, end to end on a tiny PRM export."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dreamprm_jax import evaluation as inf
from dreamprm_jax.data.processor import Processor
from dreamprm_jax.data.tokenizer import build_offline_tokenizer
from dreamprm_jax.evaluation import prm_scorer
from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.cli import evaluate

QUESTIONS = [
    ("q0", "bars", "How many red bars are in the image?", "3", ["3", "3", "4", "2"]),
    ("q1", "bars", "How many blue bars are taller than 2?", "2", ["2", "5", "2", "1"]),
    ("q2", "shapes", "How many sides does the shape have?", "5", ["6", "5", "4", "5"]),
]
SEQ_BUCKETS = (64, 96, 128, 192, 256)
PATCH_BUCKETS = (16, 32, 64, 128, 256)


def _chain(question: str, answer: str, steps: int, wrong_at: int | None) -> dict:
    parts = [f"Step {k}: I look at the image and count item {k} for the question. " for k in range(1, steps + 1)]
    labels = [0 if wrong_at is not None and k >= wrong_at else 1 for k in range(1, steps + 1)]
    return {"text": "".join(parts) + f"Final answer: {answer}", "step_labels": labels}


def _records() -> list[dict]:
    records = []
    for qid, bench, question, gold, answers in QUESTIONS:
        cands = []
        for j, a in enumerate(answers):
            steps = 2 + (j % 3)                      # 2..4 steps: several sequence lengths
            cands.append(_chain(question, a, steps, None if a == gold else min(2, steps)))
        records.append({"id": qid, "benchmark": bench, "image_path": f"images/{qid}.png", "question": question,
                        "answer": gold, "candidates": cands})
    return records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    records = _records()
    texts = [r["question"] for r in records] + [c["text"] for r in records for c in r["candidates"]]
    tok_dir = root / "tokenizer"
    tokenizer = build_offline_tokenizer(texts * 4, 400, tok_dir)
    # small images: smart_resize to 16x16 -> a 4x4 grid of 4-px patches (16 patches, 4 image tokens)
    vision = {"patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2}
    Processor(tokenizer, vision, min_pixels=16 * 16, max_pixels=16 * 16).save_preprocessor_config(tok_dir)
    ids = Processor.from_directory(tok_dir).special_token_ids
    config = qwen2_vl.tiny(vocab_size=ids.vocab_size, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                           vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    exports = {}
    for name, seed in (("dreamprm", 0), ("vanilla", 1)):
        path = root / name / "export"
        prm.save(path, config, prm.init(config, jax.random.PRNGKey(seed)))
        for f in os.listdir(tok_dir):
            (path / f).write_bytes((tok_dir / f).read_bytes())
        exports[name] = str(path)

    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for r in records:
        Image.fromarray(rng.integers(0, 256, (12 + len(r["id"]), 16, 3), dtype=np.uint8)).save(data / r["image_path"])
    bad = {"id": "q-bad", "benchmark": "bars", "image_path": "images/none.png", "question": "?", "answer": "1",
           "candidates": [{"text": "Step 1: x. Final answer: 1"}]}
    cand_file = data / "bon.jsonl"
    cand_file.write_text("\n".join(json.dumps(r) for r in records + [bad]) + "\n")
    good_file = data / "bon_good.json"
    good_file.write_text(json.dumps(records))
    return dict(root=root, config=config, exports=exports, cand_file=str(cand_file), good_file=str(good_file))


def test_scorer_matches_direct_score_and_compiles_once_per_bucket(setup):
    scorer = prm_scorer.load_scorer(setup["exports"]["dreamprm"], batch_size=4, seq_buckets=SEQ_BUCKETS,
                                    patch_buckets=PATCH_BUCKETS)
    assert scorer.processor.min_pixels == 16 * 16          # read from preprocessor_config.json
    questions, _ = inf.load_candidates(setup["good_file"])
    requests = inf.step_requests(questions) + inf.chain_requests(questions)
    before = scorer.compile_count
    logits = scorer(requests)                                # [R]
    assert logits.shape == (len(requests),) and np.isfinite(logits).all()
    used = len(scorer.stats.buckets)
    assert scorer.stats.compiles == scorer.compile_count - before == used >= 1
    assert len({len(s.input_ids) for s in scorer.encode(requests)}) > used   # buckets are shared by lengths

    # the same requests, shuffled and in a second call: no new program, same logits (tol 1e-5)
    perm = np.random.default_rng(0).permutation(len(requests))
    again = scorer([requests[i] for i in perm])
    assert scorer.compile_count - before == used
    np.testing.assert_allclose(again, logits[perm], rtol=0, atol=1e-5)

    # each logit equals a direct prm.score of the single, unpadded sequence (tol 1e-5)
    config, params = prm.load(setup["exports"]["dreamprm"])
    direct = jax.jit(prm.score, static_argnums=0)
    for i in (0, 5, len(requests) - 1):
        r = requests[i]
        enc = scorer.processor.encode(r.text, r.image_path)
        batch = qwen2_vl.prepare_batch(config, enc.input_ids[None], np.ones((1, len(enc.input_ids)), np.int32),
                                       enc.pixel_values, enc.image_grid_thw)
        _, z = direct(config, params, batch)
        np.testing.assert_allclose(logits[i], float(z[0]), rtol=0, atol=1e-5)
    stats = scorer.stats.to_dict()
    assert stats["num_requests"] == 2 * len(requests) and stats["chains_per_s"] > 0


def _strip_timing(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    report["extra"].pop("throughput")
    return report


def test_evaluate_cli_end_to_end_and_deterministic(setup, tmp_path, capsys):
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        argv = ["--candidates", setup["cand_file"], "--prm", f"vanilla_prm={setup['exports']['vanilla']}",
                "--prm", f"dreamprm={setup['exports']['dreamprm']}", "--aggregations", "mean", "sum",
                "--ns", "2", "4", "--trials", "3", "--seed", "1", "--on-bad-record", "skip",
                "--batch-size", "8", "--no-progress", "--out", str(out)]
        assert evaluate.main(argv) == 0
        for f in ("best_of_n.json", "best_of_n.png", "best_of_n.txt"):
            assert (out / f).stat().st_size > 0
        outs.append(json.loads((out / "best_of_n.json").read_text()))
    printed = capsys.readouterr().out
    assert "chains/s" in printed and "Best-of-4 accuracy" in printed and "[dreamprm] Step-level" in printed
    text = (tmp_path / "run1" / "best_of_n.txt").read_text()
    assert text.rstrip() in printed  # the report as written, printed once per run
    assert text.index("[dreamprm] Step-level") < text.index("[vanilla_prm] Step-level")
    assert _strip_timing(outs[0]) == _strip_timing(outs[1])

    report = outs[0]
    methods = report["selection"]["methods"]
    assert methods == ["zero_shot", "random", "self_consistency", "outcome:dreamprm", "vanilla_prm/mean",
                       "vanilla_prm/sum", "dreamprm/mean", "dreamprm/sum", "oracle"]
    assert report["data"]["skipped"] == {"missing_image": 1} and report["data"]["num_loaded"] == 3
    assert report["selection"]["accuracy"]["oracle"]["4"]["overall_micro"] == {"mean": 1.0, "std": 0.0}
    assert set(report["extra"]["step_metrics_by_prm"]) == {"vanilla_prm", "dreamprm"}
    assert report["step_metrics"]["overall"]["step_f1"]["num_steps"] == 3 * (2 + 3 + 4 + 2)
    steps = report["extra"]["throughput"]["dreamprm/steps"]
    assert steps["num_chains"] == 12 and steps["num_requests"] == 3 * (2 + 3 + 4 + 2) and steps["chains_per_s"] > 0
    assert report["extra"]["throughput"]["dreamprm/outcome"]["num_requests"] == 12


def test_missing_exports_say_which_command_trains_them(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                       # no runs/ here: every default is missing
    assert evaluate.main(["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "runs/default/export" in err and "python -m experiments.train\n" in err
    assert "python -m experiments.train --no-reweighting --out-dir runs/vanilla" in err
    assert "--train-missing" in err and "runs/synthetic/test_bon.json" in err

    missing = tmp_path / "mine" / "export"
    argv = ["--candidates", setup["good_file"], "--prm", f"mine={missing}", "--out", str(tmp_path / "o")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert f"mine: {missing} does not exist" in err and f"--out-dir {tmp_path / 'mine'}" in err
    with pytest.raises(prm_scorer.ExportNotFoundError, match="does not exist"):
        prm_scorer.load_scorer(missing)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--candidates", "--image-root", "--prm", "--aggregation", "--aggregations", "--ns", "--trials",
                 "--seed", "--on-bad-record", "--out", "--train-missing", "--outcome-prm"):
        assert flag in text


def test_train_missing_trains_the_default_runs_with_their_configs(setup, tmp_path, monkeypatch, capsys):
    import shutil

    from dreamprm_jax.cli import train as train_cli
    from dreamprm_jax.configs import TrainConfig
    from dreamprm_jax.train import loop

    seen = []

    def fake_run(cfg):  # stands in for minutes of training: copies a tiny export into place
        seen.append(cfg)
        export_dir = os.path.join(cfg.out_dir, "export")
        shutil.copytree(setup["exports"]["dreamprm"], export_dir)
        result = loop.TrainResult(out_dir=cfg.out_dir, step=1, domains=("a",), weights=np.ones(1), interrupted=False,
                                  seconds=0.0, compile_count=1, final_metrics={}, metrics_path=None,
                                  checkpoint_dir=os.path.join(cfg.out_dir, "checkpoints"), export_dir=export_dir,
                                  weights_path=None)
        return train_cli.TrainRun(result, planted_quality=None, spearman=None)

    monkeypatch.setattr(train_cli, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    argv = ["--candidates", setup["good_file"], "--train-missing", "--ns", "2", "--trials", "1", "--no-progress",
            "--batch-size", "8"]  # the CLI test's batch shape: compiled programs are reused
    assert evaluate.main(argv) == 0
    assert [(c.out_dir, c.reweighting) for c in seen] == [("runs/vanilla", False), ("runs/default", True)]
    assert all(c.iterations == TrainConfig().iterations for c in seen)
    report = json.loads((tmp_path / "runs" / "eval" / "best_of_n.json").read_text())
    assert "vanilla_prm/mean" in report["selection"]["methods"] and "dreamprm/mean" in report["selection"]["methods"]
    assert "training it now (python -m experiments.train --no-reweighting" in capsys.readouterr().err
