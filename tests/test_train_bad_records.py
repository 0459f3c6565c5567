"""Bad-record accounting of a training run: error mode reports every bad record's reason
count and the first few, then stops; skip mode always prints the counts and writes
``data_report.json`` into the run directory."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from dreamprm_jax.cli import train as train_cli
from tests.test_data_steps import released_chain
from tests.tiny_run import tiny_benchmark


@pytest.fixture(scope="module")
def data_with_bad_meta(tmp_path_factory):
    """The tiny benchmark, with a meta file that adds 3 question-only records (as most of
    DreamPRM's released meta records are) and one chain whose image is 1 x 300 pixels."""
    data_dir = tiny_benchmark(tmp_path_factory.mktemp("synthetic"))
    Image.new("RGB", (1, 300)).save(os.path.join(data_dir, "tall.png"))
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    good = len(meta)
    meta += [{"id": f"q{i}", "input": released_chain(0, None, question_only=True), "image_path": None,
              "true_false": True} for i in range(3)]
    meta.append({"id": "tall", "input": released_chain(2, "### Final Answer"), "image_path": "tall.png",
                 "true_false": False})
    path = os.path.join(data_dir, "meta_with_bad.json")
    with open(path, "w") as f:
        json.dump(meta, f)
    return data_dir, path, good


def args_for(data_dir: str, meta_json: str, out_dir: str, *extra: str) -> list[str]:
    return ["--train-json", os.path.join(data_dir, "train.json"), "--meta-json", meta_json, "--image-root", data_dir,
            "--cache-dir", os.path.join(data_dir, "cache"), "--out-dir", out_dir, "--model-hidden-size", "32",
            "--model-layers", "1", "--train-batch-size", "4", "--meta-batch-size", "2", "--unroll", "2",
            "--seq-buckets", "192", "--patch-buckets", "256", "--log-every", "1", "--export", "false",
            "--meta-warmup", "0", "--meta-lr-warmup", "0", "--iterations", "1", "--progress", "false", *extra]


def test_error_mode_reports_every_bad_record_by_reason(data_with_bad_meta, tmp_path, capsys):
    data_dir, meta_json, good = data_with_bad_meta
    assert train_cli.main(args_for(data_dir, meta_json, str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{meta_json}: 4 of {good + 4} records are bad (bad_steps: 3, image_aspect_ratio: 1)" in err
    assert f"{meta_json}, record {good}, field 'input'" in err  # the first few, by file, record, field
    assert f"record {good + 3}, field 'image_path'" in err and "tall.png" in err
    assert "--on-bad-record skip" in err


def test_skip_mode_prints_counts_without_progress_and_writes_the_report(data_with_bad_meta, tmp_path, capsys):
    data_dir, meta_json, good = data_with_bad_meta
    out = str(tmp_path / "run")
    assert train_cli.main(args_for(data_dir, meta_json, out, "--on-bad-record", "skip")) == 0
    err = capsys.readouterr().err
    assert (f"[data] meta ({os.path.abspath(meta_json)}): skipped 4 of {good + 4} records "
            f"(bad_steps: 3, image_aspect_ratio: 1); kept {good}") in err
    assert "[data] train" not in err  # nothing skipped there: no line
    with open(os.path.join(out, "data_report.json")) as f:
        report = json.load(f)
    assert report["on_bad_record"] == "skip"
    assert report["skipped"] == {"bad_steps": 3, "image_aspect_ratio": 1}
    train, meta = report["files"]
    assert (train["kind"], train["skipped"], train["kept"]) == ("train", {}, train["read"])
    assert (meta["kind"], meta["read"], meta["kept"]) == ("meta", good + 4, good)
    assert [(e["record"], e["field"], e["reason"]) for e in meta["first_errors"]] == [
        (good, "input", "bad_steps"), (good + 1, "input", "bad_steps"), (good + 2, "input", "bad_steps"),
        (good + 3, "image_path", "image_aspect_ratio")]
