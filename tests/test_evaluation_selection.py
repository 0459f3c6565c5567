"""Selection methods, majority-vote tie-breaking and N-sweep statistics (hand-made cases)."""

import numpy as np
import pytest

from dreamprm_jax.data import synthetic
from dreamprm_jax.evaluation import candidates as cand
from dreamprm_jax.evaluation import selection as sel
from dreamprm_jax.evaluation.scoring import StepScores


def _inputs(correct, answer_ids=None, benchmarks=None, mask=None):
    correct = np.asarray(correct, dtype=bool)
    Q, N = correct.shape
    return sel.SelectionInputs(
        question_ids=tuple(f"q{i}" for i in range(Q)),
        benchmarks=tuple(benchmarks or ["b"] * Q),
        correct=correct,
        candidate_mask=np.ones((Q, N), bool) if mask is None else np.asarray(mask, bool),
        answer_ids=np.full((Q, N), -1, np.int32) if answer_ids is None else np.asarray(answer_ids, np.int32))


RNG = np.random.default_rng(0)


def _full(inp):
    return inp.candidate_mask.copy()


# --- selectors --------------------------------------------------------------------------


def test_majority_vote_tie_breaking():
    # answers per candidate (-1: no answer)
    ids = [[0, 1, 1, 0],      # 2-2 tie -> answer 0 (first seen) -> candidate 0
           [-1, 1, 0, 0],     # answer 0 wins 2-1 -> its first candidate, 2
           [-1, -1, -1, -1],  # nobody answered -> candidate 0
           [1, 0, 2, 3],      # all tie -> candidate 0
           [-1, 3, 2, 2]]     # answer 2 -> candidate 2
    inp = _inputs(np.zeros((5, 4)), answer_ids=ids)
    np.testing.assert_array_equal(sel.MajorityVote()(inp, _full(inp), RNG), [0, 2, 0, 0, 2])
    # restricted to a subset: candidates {1, 3} of row 0 tie 1-1 -> the first, 1
    subset = np.zeros((5, 4), bool)
    subset[:, [1, 3]] = True
    np.testing.assert_array_equal(sel.MajorityVote()(inp, subset, RNG), [1, 1, 1, 1, 1])


def test_score_argmax_ties_and_infinities():
    scores = np.array([[1.0, 3.0, 3.0, 0.0],
                       [-np.inf, -np.inf, -np.inf, -np.inf],
                       [-np.inf, -5.0, np.inf, 2.0]])
    inp = _inputs(np.zeros((3, 4)))
    np.testing.assert_array_equal(sel.ScoreArgmax(scores)(inp, _full(inp), RNG), [1, 0, 2])
    subset = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(sel.ScoreArgmax(scores)(inp, subset, RNG), [0, 2, 1])
    with pytest.raises(ValueError, match="NaN"):
        sel.ScoreArgmax(np.full((3, 4), np.nan))(inp, _full(inp), RNG)


def test_oracle_zero_shot_random():
    correct = [[0, 0, 1, 0], [0, 0, 0, 0]]
    inp = _inputs(correct)
    np.testing.assert_array_equal(sel.Oracle()(inp, _full(inp), RNG), [2, 0])
    np.testing.assert_array_equal(sel.ZeroShot()(inp, _full(inp), RNG), [0, 0])
    subset = np.array([[0, 1, 0, 1], [0, 0, 1, 1]], bool)
    picks = sel.Random()(inp, subset, np.random.default_rng(1))
    assert subset[np.arange(2), picks].all()


def test_prm_selector_aggregations():
    logits = np.array([[[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]])       # [1, 2, 3]
    mask = np.array([[[1, 1, 1], [1, 0, 0]]], bool)
    scores = StepScores(logits, mask, np.ones((1, 2), bool))
    inp = _inputs([[0, 1]])
    assert sel.prm_selector(scores, "sum")(inp, _full(inp), RNG)[0] == 0     # 3 > 2
    assert sel.prm_selector(scores, "mean")(inp, _full(inp), RNG)[0] == 1    # 1 < 2
    assert sel.prm_selector((logits, mask), "min")(inp, _full(inp), RNG)[0] == 1     # 1 < 2


# --- inputs from candidates --------------------------------------------------------------


def _questions():
    records = [{"id": "q0", "benchmark": "A", "image_path": None, "question": "?", "answer": "B",
                "choices": ["x", "y", "z"],
                "candidates": [{"text": "Step 1: a. Final answer: (B)"},
                               {"text": "Step 1: a. Final answer: y", "correct": False},
                               {"text": "Step 1: a. Final answer: C", "correct": True},
                               {"text": "Step 1: a. no answer"}]},
               {"id": "q1", "benchmark": "B", "image_path": None, "question": "?", "answer": "0.5",
                "candidates": [{"text": "Step 1: a. Final answer: 1/2"},
                               {"text": "Step 1: a. Final answer: 0.7"}]}]
    return cand.parse_records(records)[0]


def test_build_inputs_correct_sources():
    qs = _questions()
    auto = sel.build_inputs(qs)
    np.testing.assert_array_equal(auto.correct, [[1, 0, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(auto.candidate_mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert auto.label_disagreements == 2      # both labels contradict the matcher
    # "(B)" and "y" are the same option; no answer -> -1; "1/2" and "0.5" share nothing else
    np.testing.assert_array_equal(auto.answer_ids, [[0, 0, 1, -1], [0, 1, -1, -1]])
    assert auto.answers[0] == ("(B)", "y", "C", None)
    match = sel.build_inputs(qs, correct_source="match")
    np.testing.assert_array_equal(match.correct, [[1, 1, 0, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"question 'q0' \(record 0\) field 'candidates\[0\].correct'"):
        sel.build_inputs(qs, correct_source="label")


# --- N sweep ------------------------------------------------------------------------------


def test_sample_subsets_sizes_and_uniformity():
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    counts = np.zeros((3, 4))
    draws = 4000
    for t in range(draws):
        s = sel.sample_subsets(mask, 2, np.random.default_rng([0, t]))
        np.testing.assert_array_equal(s.sum(1), [2, 2, 1])
        assert not (s & ~mask).any()
        counts += s
    # each of 4 candidates is in a 2-subset with probability 1/2; std of the estimate is
    # sqrt(0.25 / 4000) ~ 0.008, so 0.04 is a 5-sigma bound
    np.testing.assert_allclose(counts[0] / draws, 0.5, atol=0.04)


def test_sweep_micro_versus_macro_on_a_hand_case():
    # A: q0 always right. B: q1 always right, q2 always wrong. Every method, every subset:
    # per-benchmark A = 1, B = 1/2; micro = 2/3 (questions); macro = 3/4 (benchmarks).
    correct = [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    inp = _inputs(correct, benchmarks=["A", "B", "B"], answer_ids=[[0, 1, 2, 3]] * 3)
    methods = sel.standard_methods(outcome_logits={"orm": np.zeros((3, 4))})
    res = sel.evaluate(inp, methods, ns=(2, 4, 8), num_trials=3, seed=5)
    assert res.ns == (2, 4) and res.skipped_ns == (8,) and res.max_candidates == 4
    assert res.methods == ("zero_shot", "random", "self_consistency", "outcome:orm", "oracle")
    for m in res.methods:
        for n in res.ns:
            a = res.accuracy[m][n]
            assert a["A"].mean == 1.0 and a["B"].mean == 0.5
            np.testing.assert_allclose(a["overall_micro"].mean, 2 / 3, rtol=0, atol=1e-12)
            np.testing.assert_allclose(a["overall_macro"].mean, 3 / 4, rtol=0, atol=1e-12)
            assert a["overall_micro"].std == 0.0
    assert res.num_questions == {"A": 1, "B": 2}


def test_sweep_statistics_match_the_subsets():
    # one question, 4 candidates, only candidate 0 correct: oracle@n is right exactly when
    # the subset holds candidate 0, so its per-trial accuracies are known from the subsets
    inp = _inputs([[1, 0, 0, 0]])
    trials, seed = 25, 3
    res = sel.evaluate(inp, {"oracle": sel.Oracle(), "zero": sel.ZeroShot()}, ns=(1, 2, 3),
                       num_trials=trials, seed=seed)
    for n in (1, 2, 3):
        hits = np.array([sel.sample_subsets(inp.candidate_mask, n, np.random.default_rng([seed, n, t]))[0, 0]
                         for t in range(trials)], dtype=float)
        stat = res.accuracy["oracle"][n]["overall_micro"]
        np.testing.assert_allclose([stat.mean, stat.std], [hits.mean(), hits.std()], rtol=0, atol=1e-12)
        assert res.accuracy["zero"][n]["overall_micro"].mean == 1.0     # N-independent
    full = res.accuracy["oracle"][4]["overall_micro"]
    assert (full.mean, full.std) == (1.0, 0.0)


def test_questions_with_fewer_candidates_use_all_they_have():
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    inp = _inputs([[0, 0, 0, 1], [0, 1, 0, 0]], mask=mask)
    res = sel.evaluate(inp, {"oracle": sel.Oracle()}, ns=(2,), num_trials=8, seed=0)
    assert res.ns == (2, 4)
    # q1 has only 2 candidates: at n=2 its subset is both, so the oracle is always right on it
    per_trial = []
    for t in range(8):
        subset = sel.sample_subsets(mask, 2, np.random.default_rng([0, 2, t]))
        assert subset[1].tolist() == [True, True, False, False]
        per_trial.append((float(subset[0, 3]) + 1.0) / 2)
    stat = res.accuracy["oracle"][2]["overall_micro"]
    np.testing.assert_allclose([stat.mean, stat.std], [np.mean(per_trial), np.std(per_trial)], atol=1e-12)
    assert res.accuracy["oracle"][4]["overall_micro"].mean == 1.0


def test_evaluate_is_deterministic_and_method_independent():
    rng = np.random.default_rng(0)
    correct = rng.random((30, 8)) < 0.4
    ids = rng.integers(0, 3, (30, 8))
    inp = _inputs(correct, answer_ids=ids, benchmarks=["A", "B", "C"] * 10)
    scores = rng.normal(size=(30, 8))
    methods = sel.standard_methods(outcome_logits={"orm": scores})
    a = sel.evaluate(inp, methods, ns=(2, 4, 8), num_trials=6, seed=11)
    b = sel.evaluate(inp, methods, ns=(2, 4, 8), num_trials=6, seed=11)
    assert a.to_dict() == b.to_dict()
    # the random method's stream depends on its name, not on the other methods present
    only = sel.evaluate(inp, {"random": sel.Random()}, ns=(2, 4, 8), num_trials=6, seed=11)
    assert only.accuracy["random"] == a.accuracy["random"]
    other = sel.evaluate(inp, methods, ns=(2, 4, 8), num_trials=6, seed=12)
    assert other.accuracy["random"] != a.accuracy["random"]
    # the oracle bounds every method at every n, trial-averaged
    for m in a.methods:
        for n in a.ns:
            assert a.accuracy[m][n]["overall_micro"].mean <= a.accuracy["oracle"][n]["overall_micro"].mean + 1e-12


def test_evaluate_argument_errors():
    inp = _inputs([[1, 0]])
    with pytest.raises(ValueError, match="num_trials"):
        sel.evaluate(inp, {"o": sel.Oracle()}, num_trials=0)
    with pytest.raises(ValueError, match="at least one method"):
        sel.evaluate(inp, {})
    with pytest.raises(ValueError, match="ns must be >= 1"):
        sel.evaluate(inp, {"o": sel.Oracle()}, ns=(0,))


def test_synthetic_candidates_end_to_end():
    # the synthetic generator (helper DATA) writes this format; its labels must agree with
    # our answer matching, and our oracle with its baseline
    records, _ = synthetic.test_questions(synthetic.SyntheticConfig(test=40))
    questions, report = cand.parse_records(records, check_images=False)
    assert report.num_loaded == 40
    inputs = sel.build_inputs(questions, correct_source="match")
    assert inputs.label_disagreements == 0
    res = sel.evaluate(inputs, sel.standard_methods(), ns=(2, 8), num_trials=5)
    base = synthetic.best_of_n_baselines(records)
    np.testing.assert_allclose(res.accuracy["oracle"][8]["overall_micro"].mean, base["oracle"], atol=1e-12)
    assert res.accuracy["self_consistency"][8]["overall_micro"].std == 0.0
