"""The command line's closing table: columns sized to their contents, columns and lines
without data left out."""

from __future__ import annotations

import numpy as np

from dreamprm_jax.cli.train import TrainRun, format_run, format_table
from dreamprm_jax.train.loop import TrainResult


def result(domains, weights) -> TrainResult:
    return TrainResult(out_dir="runs/x", step=4, domains=tuple(domains), weights=np.asarray(weights, np.float32),
                       interrupted=False, seconds=1.0, compile_count=1, final_metrics={}, metrics_path=None,
                       checkpoint_dir="runs/x/checkpoints", export_dir=None, weights_path=None)


def test_long_domain_names_keep_columns_aligned():
    long = "a_domain_name_longer_than_twenty_four_characters"
    run = TrainRun(result([long, "b"], [1.2, 0.8]), {long: 0.9, "b": 0.1}, 1.0)
    lines = format_run(run).splitlines()
    header, first, second = lines[:3]
    assert header.split("  ")[0].strip() == "domain" and "planted quality" in header
    # every row's weight ends where the header's last column ends
    assert len(first) == len(second) == len(header)
    assert first.startswith(long + "  ") and second.startswith("b" + " " * (len(long) - 1) + "  ")
    assert lines[3] == "Spearman(learned weight, planted quality) = 1.000"


def test_real_data_has_no_planted_quality_column_and_no_spearman():
    text = format_run(TrainRun(result(["math", "science"], [1.1, 0.9]), None, None))
    assert "planted" not in text and "Spearman" not in text
    assert text.splitlines()[0] == "domain   learned weight"
    assert text.splitlines()[1] == "math             1.1000"


def test_no_reweighting_prints_no_spearman():
    run = TrainRun(result(["a", "b"], [1.0, 1.0]), {"a": 0.9, "b": 0.1}, None, reweighting=False)
    text = format_run(run)
    assert "Spearman" not in text and "nan" not in text
    assert "weight (fixed)" in text.splitlines()[0]


def test_format_table_widths():
    assert format_table(["x", "value"], [["long_name", "1"], ["y", "22"]]) == [
        "x          value", "long_name      1", "y             22"]
