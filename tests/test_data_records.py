"""Records: formats, TRL conversion and every bad-input path (file / record / field named)."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dreamprm_jax.data.records import (
    RecordError,
    format_skipped,
    load_meta_records,
    load_train_records,
)

CHAIN = "Q: 2+3?\nStep 1: read. Step 2: add. Final answer: 5"


@pytest.fixture
def root(tmp_path):
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return tmp_path


def train(**over):
    rec = {"input": "Q: 2+3?", "add": "Step 1: read.", "image_path": "a.png", "dataset": "math", "accuracy": 0.5}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not _DROP}


def meta(**over):
    rec = {"input": CHAIN, "image_path": "a.png", "true_false": True}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()


def write_array(root, records, name="train.json"):
    path = root / name
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(root, lines, name="train.jsonl"):
    path = root / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def check_error(err: RecordError, path, record, field, reason, line=None):
    assert err.file == str(path)
    assert err.record == record
    assert err.field == field
    assert err.reason == reason
    assert err.line == line
    msg = str(err)
    assert str(path) in msg and "expected" in msg
    if record is not None:
        assert f"record {record}" in msg
    if field is not None:
        assert f"'{field}'" in msg


# ----------------------------------------------------------------------------- good paths


def test_array_and_jsonl_give_same_records(root):
    recs = [train(id="q1", sid=1), train(id="q1", sid=2, dataset="sci", accuracy=1, image_path=None)]
    a = load_train_records(write_array(root, recs))
    b = load_train_records(write_jsonl(root, recs))
    assert [r.__dict__ | {"source": None} for r in a.records] == [r.__dict__ | {"source": None} for r in b.records]
    assert a.domains == ("math", "sci")
    assert a.records[0].image_path == str(root / "a.png")
    assert a.records[0].text == "Q: 2+3?\n\nStep 1: read."
    assert a.records[1].accuracy == 1.0 and a.records[1].image_path is None
    assert a.skipped == Counter()


def test_meta_records_split(root):
    loaded = load_meta_records(write_jsonl(root, [meta(id="m0"), meta(true_false=0, image_path=None)]))
    r0, r1 = loaded.records
    assert r0.num_steps == 2 and r0.true_false is True and r1.true_false is False
    assert r0.steps[0] == "Q: 2+3?\nStep 1: read. "


def test_meta_question_id_groups_chains(root):
    loaded = load_meta_records(write_jsonl(root, [
        meta(question_id="q1"), meta(question_id=7, input=CHAIN.replace("read", "look")),
        meta(input="Q: 2+3?\nStep 1: look. Final answer: 5"), meta(image_path=None)]))
    keys = [r.question_key for r in loaded.records]
    assert [r.question_id for r in loaded.records] == ["q1", "7", None, None]
    assert keys[0] == ("question_id", "q1") and keys[1] == ("question_id", "7")
    # without question_id: the text before the first step and the image
    assert keys[2] == ("text", "Q: 2+3?", str(root / "a.png")) and keys[3] == ("text", "Q: 2+3?", None)
    with pytest.raises(RecordError, match="question_id"):
        load_meta_records(write_jsonl(root, [meta(question_id=1.5)]))


def test_trl_conversion(root):
    row = {"prompt": "Q: 2+3?", "completions": ["Step 1: read.", "Step 2: add."], "labels": [True, False],
           "images": ["a.png"], "id": "t0"}
    loaded = load_train_records(write_jsonl(root, [row, dict(row, id="t1", dataset="sci")]), domain=None,
                                format="auto", on_bad_record="skip")
    # row 0 has no domain -> skipped and counted; row 1 converted into 2 step records
    assert loaded.skipped == Counter({"missing_field": 1})
    assert [(r.sid, r.add, r.accuracy, r.dataset) for r in loaded.records] == [
        ("1", "Step 1: read.", 1.0, "sci"), ("2", "Step 1: read.\nStep 2: add.", 0.0, "sci")]
    forced = load_train_records(write_jsonl(root, [row]), domain="math")
    assert [r.dataset for r in forced.records] == ["math", "math"]
    assert forced.records[0].image_path == str(root / "a.png")


def test_trl_bad_label_names_field(root):
    row = {"prompt": "Q", "completions": ["a", "b"], "labels": [True, "yes"], "dataset": "d"}
    path = write_jsonl(root, [row])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 0, "accuracy", "wrong_type", line=1)
    row = {"prompt": "Q", "completions": ["a", "b"], "labels": [True], "dataset": "d"}
    with pytest.raises(RecordError) as e:
        load_train_records(write_jsonl(root, [row]))
    assert e.value.field == "labels"


# ----------------------------------------------------------------------------- bad inputs (>= 15)


def test_malformed_json_array(root):
    path = root / "t.json"
    path.write_text('[\n{"input": "a",\n "add": }\n]')
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, None, None, "malformed_json", line=3)


def test_jsonl_broken_line(root):
    path = write_jsonl(root, [train(), '{"input": "x", ', train()])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 1, None, "broken_line", line=2)
    loaded = load_train_records(path, on_bad_record="skip")
    assert len(loaded.records) == 2 and loaded.skipped == Counter({"broken_line": 1})


@pytest.mark.parametrize("field", ["input", "add", "dataset", "accuracy", "image_path"])
def test_missing_field(root, field):
    path = write_array(root, [train(), train(**{field: _DROP})])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 1, field, "missing_field")


def test_wrong_type(root):
    path = write_array(root, [train(input=3)])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 0, "input", "wrong_type")
    path = write_jsonl(root, [train(), train(accuracy="0.5")])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 1, "accuracy", "wrong_type", line=2)
    with pytest.raises(RecordError) as e:
        load_train_records(write_array(root, [train(accuracy=True)]))
    assert e.value.reason == "wrong_type"


def test_record_not_an_object(root):
    path = write_array(root, [train(), ["not", "an", "object"]])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 1, None, "not_an_object")


def test_label_out_of_range(root):
    path = write_array(root, [train(accuracy=1.5)])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 0, "accuracy", "out_of_range")


def test_nan_label(root):
    path = root / "t.jsonl"
    path.write_text(json.dumps(train()) + "\n" + json.dumps(train()).replace("0.5", "NaN") + "\n")
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 1, "accuracy", "not_finite", line=2)


@pytest.mark.parametrize("value", ["yes", "true", 0.0, 2, None])
def test_meta_label_not_boolean(root, value):
    path = write_array(root, [meta(true_false=value)], "meta.json")
    with pytest.raises(RecordError) as e:
        load_meta_records(path)
    check_error(e.value, path, 0, "true_false", "not_boolean")


def test_missing_image(root):
    path = write_array(root, [train(image_path="nope.png")])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 0, "image_path", "missing_image")


def test_corrupt_image(root):
    path = write_array(root, [train(), train(image_path="bad.png")])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 1, "image_path", "corrupt_image")
    # with image checks off, a corrupt image passes validation (the processor would fail later)
    assert len(load_train_records(path, check_images=False).records) == 2


def test_chain_without_steps(root):
    path = write_jsonl(root, [meta(), meta(input="Q: just an answer. Final answer: 5")], "meta.jsonl")
    with pytest.raises(RecordError) as e:
        load_meta_records(path)
    check_error(e.value, path, 1, "input", "bad_steps", line=2)


def test_chain_with_step_gap(root):
    path = write_array(root, [meta(input="Q Step 1: a Step 3: b Final answer: c")], "meta.json")
    with pytest.raises(RecordError) as e:
        load_meta_records(path)
    check_error(e.value, path, 0, "input", "bad_steps")


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"[]"])
def test_empty_file(root, content):
    path = root / "empty.json"
    path.write_bytes(content)
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, None, None, "empty_file")


def test_duplicate_id_sid(root):
    path = write_array(root, [train(id="q", sid=1), train(id="q", sid=2), train(id="q", sid=1)])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 2, "id", "duplicate_id")
    assert "record 0" in str(e.value)  # names the first occurrence too
    mpath = write_array(root, [meta(id="m"), meta(id="m")], "meta.json")
    with pytest.raises(RecordError) as e:
        load_meta_records(mpath)
    check_error(e.value, mpath, 1, "id", "duplicate_id")


def test_non_utf8(root):
    path = root / "t.jsonl"
    path.write_bytes(json.dumps(train()).encode() + b"\n" + json.dumps(train(input="caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, None, None, "not_utf8", line=2)


@pytest.mark.parametrize("image", ["../a.png", "sub/../../a.png", "/etc/hostname"])
def test_path_escaping_image_root(root, image):
    (root / "data").mkdir()
    path = write_array(root / "data", [train(image_path=image)])
    with pytest.raises(RecordError) as e:
        load_train_records(path)  # image root defaults to the file's folder root/data
    check_error(e.value, path, 0, "image_path", "path_escapes_image_root")
    # the same file is fine with the parent as image root when the path stays inside it
    if image == "../a.png":
        with pytest.raises(RecordError):
            load_train_records(path, image_root=root)  # '../a.png' from root escapes root too
        ok = write_array(root / "data", [train(image_path="a.png")], "ok.json")
        assert load_train_records(ok, image_root=root).records[0].image_path == str(root / "a.png")


def test_unknown_domain(root):
    path = write_array(root, [train(), train(dataset="art")])
    with pytest.raises(RecordError) as e:
        load_train_records(path, domains=["math"])
    check_error(e.value, path, 1, "dataset", "unknown_domain")


def test_domain_with_zero_records(root):
    path = write_array(root, [train(), train(dataset="sci", accuracy=2.0)])
    with pytest.raises(RecordError) as e:
        load_train_records(path, domains=["math", "sci", "art"])
    check_error(e.value, path, 1, "accuracy", "out_of_range")
    with pytest.raises(RecordError) as e:  # skipping the only 'sci' record leaves 'sci' (and 'art') empty
        load_train_records(path, domains=["math", "sci", "art"], on_bad_record="skip")
    check_error(e.value, path, None, "dataset", "empty_domain")
    assert "sci" in str(e.value) and "art" in str(e.value)


def test_blank_text(root):
    path = write_array(root, [train(add="   ")])
    with pytest.raises(RecordError) as e:
        load_train_records(path)
    check_error(e.value, path, 0, "add", "empty_text")


# ----------------------------------------------------------------------------- skip mode


def test_skip_mode_counts_every_reason(root):
    lines = [
        train(id="a", sid=1),
        train(accuracy=float("inf")),
        '{"broken',
        train(image_path="nope.png"),
        train(image_path="bad.png"),
        train(image_path="../x.png"),
        train(id="a", sid=1),
        train(dataset="art"),
        train(accuracy=-0.1),
        train(id="b", sid=1, dataset="sci"),
    ]
    path = write_jsonl(root, [l if isinstance(l, str) else json.dumps(l) for l in lines])
    loaded = load_train_records(path, domains=["math", "sci"], on_bad_record="skip")
    assert [r.id for r in loaded.records] == ["a", "b"]
    assert loaded.skipped == Counter({
        "not_finite": 1, "broken_line": 1, "missing_image": 1, "corrupt_image": 1,
        "path_escapes_image_root": 1, "duplicate_id": 1, "unknown_domain": 1, "out_of_range": 1})
    assert sum(loaded.skipped.values()) + len(loaded.records) == len(lines)  # nothing dropped silently
    report = format_skipped(loaded)
    assert "skipped 8" in report and "line 3" in report


def test_bad_on_bad_record_value(root):
    with pytest.raises(ValueError, match="on_bad_record"):
        load_train_records(write_array(root, [train()]), on_bad_record="ignore")
