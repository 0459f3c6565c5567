"""Step-level metrics on hand-made cases (exact fractions, atol 1e-12)."""

import numpy as np
import pytest

from dreamprm_jax.evaluation import metrics

# Q=2 questions, N=2 candidates, S=4 steps; labels 1 correct / 0 incorrect / -1 neutral or pad.
# Threshold 0.5 <=> logit >= 0 is "predicted correct" (sigmoid(0) = 0.5 counts as correct).
LOGITS = np.array([
    [[2.0, -1.0, -3.0, 1.0],     # chain A: labels 1 1 0 0 -> preds C I I C
     [0.0, 5.0, -0.1, 9.0]],     # chain B: labels 1 - 1 pad -> preds C (neutral) I
    [[1.0, 1.0, 0.0, 0.0],       # chain C: labels 1 1 -> preds C C
     [-1.0, 2.0, 0.0, 0.0]],     # chain D: labels 0 1 -> preds I C
])
LABELS = np.array([
    [[1, 1, 0, 0], [1, -1, 1, -1]],
    [[1, 1, -1, -1], [0, 1, -1, -1]],
])


def test_visualprocessbench_macro_f1_by_hand():
    out = metrics.step_f1(LOGITS, LABELS)
    # correct steps: A0 TP, A1 FN, B0 TP (p = 0.5), B2 FN, C0 TP, C1 TP, D1 TP -> TP 5, FN 2
    # incorrect steps: A2 TN, A3 FP, D0 TN -> TN 2, FP 1
    assert (out["tp"], out["fn"], out["tn"], out["fp"], out["num_steps"]) == (5, 2, 2, 1, 10)
    f1_c = 2 * 5 / (2 * 5 + 1 + 2)          # 10/13
    f1_i = 2 * 2 / (2 * 2 + 2 + 1)          # 4/7
    np.testing.assert_allclose([out["f1_correct"], out["f1_incorrect"], out["macro_f1"]],
                               [f1_c, f1_i, (f1_c + f1_i) / 2], rtol=0, atol=1e-12)


def test_threshold_moves_predictions():
    # threshold 0.2 <=> logit >= log(0.25) ~ -1.386: A1 (-1) and B2 (-0.1) and D0 (-1) become "correct"
    out = metrics.step_f1(LOGITS, LABELS, threshold=0.2)
    assert (out["tp"], out["fn"], out["tn"], out["fp"]) == (7, 0, 1, 2)


def test_zero_division_gives_zero():
    out = metrics.step_f1(np.array([[3.0, 2.0]]), np.array([[1, 1]]))
    assert (out["f1_correct"], out["f1_incorrect"], out["macro_f1"]) == (1.0, 0.0, 0.5)
    empty = metrics.step_f1(np.zeros((1, 2)), -np.ones((1, 2), int))
    assert empty["num_steps"] == 0 and empty["macro_f1"] == 0.0


def test_first_error_by_hand():
    out = metrics.first_error_metrics(LOGITS, LABELS)
    # A: gold first error step 3 (index 2), predicted index 1 -> miss
    # B: gold none, predicted index 2 (neutral step 2 ignored) -> miss
    # C: gold none, predicted none -> hit;  D: gold index 0, predicted index 0 -> hit
    assert out["num_chains"] == 4 and out["num_erroneous"] == 2
    assert (out["accuracy"], out["accuracy_erroneous"], out["accuracy_correct"]) == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(out["harmonic_mean"], 0.5, atol=1e-12)
    only_ok = metrics.first_error_metrics(LOGITS[1:, :1], LABELS[1:, :1])     # chain C only
    assert only_ok["accuracy_erroneous"] is None and only_ok["harmonic_mean"] is None
    assert only_ok["accuracy_correct"] == 1.0


def test_step_metrics_per_benchmark_and_overall():
    out = metrics.step_metrics(LOGITS, LABELS, benchmarks=["X", "Y"])
    assert set(out["per_benchmark"]) == {"X", "Y"}
    x = out["per_benchmark"]["X"]["step_f1"]
    assert (x["tp"], x["fn"], x["tn"], x["fp"]) == (2, 2, 1, 1)
    assert out["overall"]["step_f1"] == metrics.step_f1(LOGITS, LABELS)
    assert out["threshold"] == 0.5
    with pytest.raises(ValueError, match=r"\[Q, N, S\]"):
        metrics.step_metrics(LOGITS[0], LABELS[0])
