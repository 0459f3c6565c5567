"""Report files: tables, strict JSON with every number, and the PNG."""

import json

import numpy as np
import pytest

from dreamprm_jax.evaluation import metrics, report, selection as sel


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    Q, N = 12, 8
    inputs = sel.SelectionInputs(
        question_ids=tuple(map(str, range(Q))), benchmarks=tuple(["MathVista", "MMMU", "WeMath"] * 4),
        correct=rng.random((Q, N)) < 0.4, candidate_mask=np.ones((Q, N), bool),
        answer_ids=rng.integers(0, 3, (Q, N)).astype(np.int32))
    steps = rng.normal(size=(Q, N, 3))
    step_mask = np.ones((Q, N, 3), bool)
    methods = sel.standard_methods(prm_scores={"vanilla_prm": (steps, step_mask),
                                               "dreamprm": (steps + 0.5 * inputs.correct[..., None], step_mask)},
                                   aggregations=("mean", "sum"), outcome_logits={"orm": rng.normal(size=(Q, N))})
    return sel.evaluate(inputs, methods, ns=(2, 4, 8), num_trials=4, seed=0)


def test_tables(result):
    table = report.format_table(result)
    assert "Best-of-8" in table and "Overall" in table and "Macro" in table
    for m in result.methods:
        assert m in table
    sweep = report.format_sweep_table(result, "MMMU")
    assert "N=2" in sweep and "N=8" in sweep
    with pytest.raises(ValueError, match="not in the sweep"):
        report.format_table(result, n=3)
    with pytest.raises(ValueError, match="unknown scope"):
        report.format_sweep_table(result, "nope")


def test_write_report(tmp_path, result):
    labels = np.where(np.random.default_rng(1).random((12, 8, 3)) < 0.7, 1, 0)
    step = metrics.step_metrics(np.zeros((12, 8, 3)), labels, benchmarks=list(result.benchmarks) * 4)
    files = report.write_report(tmp_path / "out", result, step_metrics=step, step_metrics_label="dreamprm",
                                more_step_metrics={"vanilla_prm": step}, extra={"checkpoint": "x"})
    text = open(files.text_path).read()
    assert text == files.text
    assert "dreamprm/mean" in text
    # the labelled table first, the further ones after everything else
    assert text.index("[dreamprm] Step-level error detection") < text.index("[vanilla_prm] Step-level error detection")
    assert text.count("Step-level error detection") == 2 and text.endswith("\n")
    data = json.loads(open(files.json_path).read())
    acc = data["selection"]["accuracy"]
    assert set(acc) == set(result.methods)
    for m in result.methods:
        assert set(acc[m]) == {"2", "4", "8"}
        for n in ("2", "4", "8"):
            assert set(acc[m][n]) == {"MMMU", "MathVista", "WeMath", "overall_micro", "overall_macro"}
            stat = result.accuracy[m][int(n)]["overall_macro"]
            assert acc[m][n]["overall_macro"] == {"mean": stat.mean, "std": stat.std}
    assert "overall_micro" in data["selection"]["overall_definitions"]
    assert data["step_metrics"]["overall"]["step_f1"]["num_steps"] == 12 * 8 * 3
    assert data["extra"] == {"checkpoint": "x"}
    with open(files.png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        report.write_json(tmp_path / "x.json", {"a": float("nan")})


def test_report_is_byte_identical_across_runs(tmp_path, result):
    a = report.write_report(tmp_path / "a", result)
    b = report.write_report(tmp_path / "b", result)
    for path_a, path_b in ((a.text_path, b.text_path), (a.json_path, b.json_path)):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()
