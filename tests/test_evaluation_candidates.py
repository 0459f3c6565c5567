"""Candidate files: step splitting, validation errors and counted skips."""

import json
import os

import pytest

from dreamprm_jax.data.steps import find_max_step, split_step_reference, split_steps
from dreamprm_jax.evaluation import candidates as cand
from dreamprm_jax.evaluation.scoring import default_prompt


# --- step splitting ---------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "Step 1: look at the image. Step 2: count 3 apples. Final answer: 3",
    "Let me think.\nStep 1: a\nStep 2: b\nStep 3: c\nFinal answer: (B)",
    "Step 1: only one step. Final answer: 7",
    "Step 1: x\nStep 2: y\nStep 3: z\nStep 4: w\nStep 5: v\nStep 6: u\nStep 7: t\nStep 8: s\n"
    "Step 9: r\nStep 10: q\nFinal answer: 10",
])
def test_step_prefixes_match_reference_on_well_formed_chains(text):
    ref = [split_step_reference(k, text) for k in range(1, find_max_step(text) + 1)]
    assert cand.step_prefixes(text) == ref


def test_step_prefixes_are_the_training_meta_prefixes():
    # the meta text is question + "\n\n" + chain; best-of-N prompts must be its prefixes
    question, chain = "How many apples?", "Step 1: count.\nStep 2: add.\nFinal answer: 3"
    q = cand.Question(id="q", benchmark="b", image_path=None, question=question, answer="3",
                      choices=None, candidates=())
    prompts = [default_prompt(q, p) for p in cand.step_prefixes(chain)]
    assert prompts == split_steps(question + "\n\n" + chain)


def test_step_prefixes_malformed_chains():
    # case-insensitive step markers; the last step ends at "Final answer" as written (the
    # reference's marker), so a lower-case "final answer" stays in the last prefix
    assert cand.step_prefixes("STEP 1: a. step2: b. Final answer: c") == ["STEP 1: a. ", "STEP 1: a. step2: b. "]
    assert cand.step_prefixes("STEP 1: a. step2: b. final answer: c") == ["STEP 1: a. ",
                                                                         "STEP 1: a. step2: b. final answer: c"]
    # no "Final answer": the last prefix is the whole text
    assert cand.step_prefixes("Step 1: a. Step 2: b.") == ["Step 1: a. ", "Step 1: a. Step 2: b."]
    with pytest.raises(ValueError, match="missing"):
        cand.step_prefixes("Step 1: a. Step 3: c. Final answer: d")      # a gap in the numbering
    with pytest.raises(ValueError):
        cand.step_prefixes("no steps. Final answer: 3")


# --- files ------------------------------------------------------------------------------

GOOD_TEXT = "Step 1: a. Step 2: b. Final answer: B"


def _record(i, **over):
    rec = {"id": f"q{i}", "benchmark": "MathVista", "image_path": None, "question": "Q?",
           "answer": "B", "choices": ["1", "2"],
           "candidates": [{"text": GOOD_TEXT, "correct": True, "step_labels": [1, None]},
                          {"text": "Step 1: a. Final answer: A", "correct": False}]}
    rec.update(over)
    return rec


def _write(tmp_path, records, jsonl=True, name=None):
    path = tmp_path / (name or ("c.jsonl" if jsonl else "c.json"))
    if jsonl:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG fake")
    return tmp_path


@pytest.mark.parametrize("jsonl", [True, False])
def test_load_good_file(tmp_path, image_dir, jsonl):
    path = _write(tmp_path, [_record(0, image_path="img/a.png"), _record(1)], jsonl=jsonl)
    questions, report = cand.load_candidates(path)
    assert [q.id for q in questions] == ["q0", "q1"]
    assert questions[0].image_path == os.path.realpath(tmp_path / "img" / "a.png")
    assert questions[1].image_path is None
    c = questions[0].candidates[0]
    assert c.prefixes == ("Step 1: a. ", "Step 1: a. Step 2: b. ")
    assert c.step_labels == (1, None) and c.correct is True
    assert questions[0].choices == ("1", "2")
    assert report.num_loaded == 2 and report.num_skipped == 0


# (record overrides, reason, field named in the message, expectation text)
BAD_CASES = [
    (dict(image_path="img/missing.png"), "missing_image", "image_path", "existing image file"),
    (dict(image_path="../outside.png"), "path_escapes_image_root", "image_path", "inside the image root"),
    (dict(image_path="/etc/passwd"), "path_escapes_image_root", "image_path", "inside the image root"),
    (dict(candidates=[{"text": GOOD_TEXT}, {"text": "I just know. Final answer: B"}]),
     "candidate_without_steps", "candidates[1].text", "at least one 'Step k' marker"),
    (dict(candidates=[{"text": "Step 1: a. Step 3: b. Final answer: B"}]), "bad_steps",
     "candidates[0].text", "1..3"),
    (dict(candidates=[]), "empty_candidates", "candidates", "at least one candidate"),
    (dict(answer=""), "missing_answer", "answer", "non-empty gold answer"),
    (dict(answer=None), "missing_answer", "answer", "non-empty gold answer"),
    (dict(candidates=[{"text": GOOD_TEXT, "step_labels": [1]}]), "bad_step_labels",
     "candidates[0].step_labels", "one label per step"),
    (dict(candidates=[{"text": GOOD_TEXT, "step_labels": [1, 2]}]), "bad_step_labels",
     "candidates[0].step_labels", "0/1/null"),
    (dict(choices="AB"), "wrong_type", "choices", "list of strings"),
    (dict(candidates=[{"text": GOOD_TEXT, "correct": "yes"}]), "wrong_type", "candidates[0].correct",
     "true/false"),
]


@pytest.mark.parametrize("over, reason, field, expectation", BAD_CASES)
def test_bad_record_is_a_clear_error(tmp_path, image_dir, over, reason, field, expectation):
    path = _write(tmp_path, [_record(0), _record(1, **over), _record(2)])
    with pytest.raises(cand.CandidateError) as info:
        cand.load_candidates(path)
    err = info.value
    msg = str(err)
    assert path in msg and "record 1" in msg and "line 2" in msg and "id='q1'" in msg
    assert f"field '{field}'" in msg and expectation in msg
    assert (err.file, err.record, err.line, err.field, err.reason) == (path, 1, 2, field, reason)
    assert reason in cand.SKIP_REASONS


@pytest.mark.parametrize("over, reason, field, expectation", BAD_CASES)
def test_bad_record_is_a_counted_skip(tmp_path, image_dir, over, reason, field, expectation):
    path = _write(tmp_path, [_record(0), _record(1, **over), _record(2)])
    questions, report = cand.load_candidates(path, on_bad_record="skip")
    assert [q.id for q in questions] == ["q0", "q2"]
    assert report.skipped == {reason: 1} and report.num_records == 3 and report.num_loaded == 2
    assert len(report.messages) == 1 and "record 1" in report.messages[0]


def test_missing_field_and_gold_answer_absent(tmp_path):
    rec = _record(0)
    del rec["answer"]
    path = _write(tmp_path, [rec], jsonl=False)
    with pytest.raises(cand.CandidateError, match=r"record 0 \(id='q0'\), field 'answer'"):
        cand.load_candidates(path)
    rec = _record(0)
    del rec["benchmark"]
    with pytest.raises(cand.CandidateError, match="field 'benchmark'.*missing") as info:
        cand.load_candidates(_write(tmp_path, [rec]))
    assert info.value.reason == "missing_field"


def test_skip_counts_several_reasons(tmp_path, image_dir):
    records = [_record(0), _record(1, candidates=[]), _record(2, answer=""), "{not json",
               _record(4, candidates=[]), [1, 2], _record(0)]
    path = _write(tmp_path, records)
    questions, report = cand.load_candidates(path, on_bad_record="skip")
    assert [q.id for q in questions] == ["q0"]
    assert report.skipped == {"duplicate_id": 1, "empty_candidates": 2, "broken_line": 1,
                              "missing_answer": 1, "not_an_object": 1}
    assert report.num_skipped == 6
    assert json.loads(json.dumps(report.to_dict()))["num_skipped"] == 6


def test_image_root_and_check_images(tmp_path, image_dir):
    sub = tmp_path / "data"
    sub.mkdir()
    path = _write(sub, [_record(0, image_path="img/a.png")])
    with pytest.raises(cand.CandidateError, match="missing_image|existing image"):
        cand.load_candidates(path)                       # default root: the file's directory
    questions, _ = cand.load_candidates(path, image_root=tmp_path)
    assert questions[0].image_path == os.path.realpath(tmp_path / "img" / "a.png")
    questions, _ = cand.load_candidates(_write(sub, [_record(0, image_path="img/none.png")]),
                                        image_root=tmp_path, check_images=False)
    assert questions[0].image_path.endswith("none.png")


def test_whole_file_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(cand.CandidateError, match="empty") as info:
        cand.load_candidates(empty)
    assert (info.value.record, info.value.reason) == (None, "empty_file")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,')
    with pytest.raises(cand.CandidateError, match="valid JSON array") as info:
        cand.load_candidates(broken, on_bad_record="skip")
    assert (info.value.file, info.value.line, info.value.reason) == (str(broken), 1, "malformed_json")
    with pytest.raises(ValueError, match="on_bad_record"):
        cand.parse_records([], on_bad_record="ignore")


def test_numeric_id_and_answer_are_accepted(tmp_path):
    questions, _ = cand.load_candidates(_write(tmp_path, [_record(0, id=7, answer=12)]))
    assert questions[0].id == "7" and questions[0].answer == "12"
