"""Step-prefix enumeration and logit assembly (the PRM is a plain callable here)."""

import numpy as np
import pytest

from dreamprm_jax.evaluation import candidates as cand
from dreamprm_jax.evaluation import scoring


def _questions():
    records = [
        {"id": "a", "benchmark": "B1", "image_path": None, "question": "What?", "answer": "1",
         "candidates": [{"text": "Step 1: x. Step 2: y. Step 3: z. Final answer: 1"},
                        {"text": "Step 1: x. Final answer: 2", "step_labels": [0]}]},
        {"id": "b", "benchmark": "B2", "image_path": None, "question": "", "answer": "2",
         "candidates": [{"text": "Step 1: p. Step 2: q. Final answer: 2", "step_labels": [1, None]}]},
    ]
    questions, _ = cand.parse_records(records)
    return questions


def _encode(r):
    """A fake PRM whose logit encodes where the request came from."""
    return 100.0 * r.question_index + 10.0 * r.candidate_index + r.step_index


def test_requests_enumerate_every_prefix():
    qs = _questions()
    reqs = scoring.step_requests(qs)
    assert [(r.candidate_id, r.step_index) for r in reqs] == [
        ("a#0", 0), ("a#0", 1), ("a#0", 2), ("a#1", 0), ("b#0", 0), ("b#0", 1)]
    assert reqs[1].text == "What?\n\nStep 1: x. Step 2: y. "
    assert reqs[4].text == "Step 1: p. "         # empty question: just the prefix
    assert all(r.image_path is None for r in reqs)
    custom = scoring.step_requests(qs, prompt_fn=lambda q, p: f"[{q.id}] {p}")
    assert custom[0].text == "[a] Step 1: x. "


def test_assemble_round_trip_in_any_order():
    qs = _questions()
    reqs = scoring.step_requests(qs)
    order = np.random.default_rng(0).permutation(len(reqs))
    shuffled = [reqs[i] for i in order]
    out = scoring.assemble_step_logits(qs, shuffled, [_encode(r) for r in shuffled])
    assert out.step_logits.shape == (2, 2, 3)
    expected_mask = np.array([[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [0, 0, 0]]], dtype=bool)
    np.testing.assert_array_equal(out.step_mask, expected_mask)
    np.testing.assert_array_equal(out.candidate_mask, [[True, True], [True, False]])
    for q, n, s in np.argwhere(expected_mask):
        assert out.step_logits[q, n, s] == 100.0 * q + 10.0 * n + s
    assert (out.step_logits[~expected_mask] == 0).all()


def test_score_steps_chunked_equals_unchunked():
    qs = _questions()
    calls = []

    def fn(reqs):
        calls.append(len(reqs))
        return np.array([_encode(r) for r in reqs], dtype=np.float32)

    whole = scoring.score_steps(qs, fn)
    chunked = scoring.score_steps(qs, fn, chunk_size=4)
    assert calls == [6, 4, 2]
    np.testing.assert_array_equal(whole.step_logits, chunked.step_logits)


def test_assemble_errors_name_the_candidate():
    qs = _questions()
    reqs = scoring.step_requests(qs)
    with pytest.raises(ValueError, match="expected one logit per request"):
        scoring.assemble_step_logits(qs, reqs, [0.0] * 5)
    with pytest.raises(ValueError, match=r"no logit for step 3 of candidate a#0"):
        scoring.assemble_step_logits(qs, reqs[:2] + reqs[3:], [0.0] * 5)
    with pytest.raises(ValueError, match="scored twice"):
        scoring.assemble_step_logits(qs, reqs + reqs[:1], [0.0] * 7)
    with pytest.raises(ValueError, match=r"non-finite logit .*\(candidate b#0, step 2\)"):
        scoring.assemble_step_logits(qs, reqs, [0.0] * 5 + [float("nan")])


def test_chain_scoring_and_labels():
    qs = _questions()
    chain = scoring.score_chains(qs, lambda reqs: [_encode(r) for r in reqs])
    np.testing.assert_array_equal(chain, [[0.0, 10.0], [100.0, -np.inf]])
    assert scoring.chain_requests(qs)[0].text.endswith("Final answer: 1")
    labels = scoring.step_label_array(qs)
    np.testing.assert_array_equal(labels, [[[-1, -1, -1], [0, -1, -1]], [[1, -1, -1], [-1, -1, -1]]])
