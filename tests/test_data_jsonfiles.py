"""The one records-file reader and image-path confinement, as both loaders see them."""

import json
import os

import pytest

from dreamprm_jax.data.jsonfiles import ImagePathEscape, RecordError, read_json_records, resolve_image_path
from dreamprm_jax.data.records import load_train_records
from dreamprm_jax.evaluation.candidates import load_candidates

TRAIN = {"input": "Q", "add": "Step 1: a", "image_path": None, "dataset": "d", "accuracy": 0.5}


def test_array_and_json_lines_give_the_same_values(tmp_path):
    values = [{"a": 1}, {"a": 2}]
    array = tmp_path / "r.json"
    array.write_text(json.dumps(values, indent=2))
    lines = tmp_path / "r.jsonl"
    lines.write_text("\n" + "\n\n".join(json.dumps(v) for v in values) + "\n")
    assert [(r.index, r.line, r.value) for r in read_json_records(array)] == [(0, None, values[0]), (1, None, values[1])]
    assert [(r.index, r.line, r.value) for r in read_json_records(lines)] == [(0, 2, values[0]), (1, 4, values[1])]


@pytest.mark.parametrize("load", [load_train_records, load_candidates])
def test_pretty_printed_object_is_named_as_one_object(tmp_path, load):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(TRAIN, indent=2))
    with pytest.raises(RecordError) as info:
        load(path)
    err = info.value
    assert (err.file, err.record, err.reason) == (str(path), None, "single_json_object")
    assert "one JSON object over 7 lines" in str(err)
    assert "a JSON array of records or JSON Lines" in str(err)


def test_one_line_object_is_json_lines_with_one_record(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(TRAIN) + "\n")
    assert [r.value for r in read_json_records(path)] == [TRAIN]


def test_broken_json_lines_line_is_named_by_file_record_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(TRAIN) + "\n\n" + '{"input": "x",\n' + json.dumps(TRAIN) + "\n")
    records = read_json_records(path)
    assert [r.error is None for r in records] == [True, False, True]
    err = records[1].error
    assert (err.file, err.record, err.line, err.reason) == (str(path), 1, 3, "broken_line")
    assert "record 1, line 3" in str(err) and "expected one JSON object per line" in str(err)
    with pytest.raises(RecordError) as info:
        load_train_records(path)
    assert (info.value.record, info.value.line, info.value.reason) == (1, 3, "broken_line")
    _, report = load_candidates(path, on_bad_record="skip")  # records 0 and 2 are no candidates
    assert report.skipped["broken_line"] == 1
    assert [m for m in report.messages if "broken_line" in m] == [str(err)]


def test_pretty_printed_json_lines_is_a_broken_first_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(TRAIN, indent=2) + "\n" + json.dumps(TRAIN, indent=2))
    err = read_json_records(path)[0].error
    assert (err.record, err.line, err.reason) == (0, 1, "broken_line")


@pytest.mark.parametrize("content, reason", [(b"", "empty_file"), (b"[]", "empty_file"), (b"\n \n", "empty_file"),
                                             (b'[{"a": 1},\n', "malformed_json"), (b'{"a": "\xff"}\n', "not_utf8")])
def test_file_level_errors(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(RecordError) as info:
        read_json_records(path)
    assert (info.value.file, info.value.record, info.value.reason) == (str(path), None, reason)


# ----------------------------------------------------------------------------- path confinement


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.png").write_bytes(b"x")
    (tmp_path / "out.png").write_bytes(b"x")
    os.symlink(tmp_path / "out.png", root / "link_out.png")
    os.symlink(root / "sub" / "in.png", root / "link_in.png")
    return tmp_path, root


@pytest.mark.parametrize("name", ["sub/in.png", "sub/../sub/in.png", "link_in.png", "ABS_IN"])
def test_paths_inside_the_root_resolve(layout, name):
    tmp_path, root = layout
    name = str(root / "sub" / "in.png") if name == "ABS_IN" else name
    assert resolve_image_path(name, root) == os.path.realpath(root / "sub" / "in.png")


@pytest.mark.parametrize("name", ["../out.png", "sub/../../out.png", "link_out.png", "ABS_OUT"])
def test_paths_escaping_the_root_are_rejected(layout, name):
    tmp_path, root = layout
    name = str(tmp_path / "out.png") if name == "ABS_OUT" else name
    with pytest.raises(ImagePathEscape) as info:
        resolve_image_path(name, root)
    assert os.path.realpath(root) in info.value.expected and repr(name) in info.value.got


@pytest.mark.parametrize("name", ["../out.png", "link_out.png"])
def test_both_loaders_name_file_record_and_field_for_an_escape(layout, name):
    tmp_path, root = layout
    train = root / "train.jsonl"
    train.write_text(json.dumps(TRAIN) + "\n" + json.dumps({**TRAIN, "image_path": name}) + "\n")
    with pytest.raises(RecordError) as info:
        load_train_records(train, check_images=False)
    assert (info.value.file, info.value.record, info.value.line, info.value.field, info.value.reason) == (
        str(train), 1, 2, "image_path", "path_escapes_image_root")
    cands = root / "cands.json"
    good = {"id": "q0", "benchmark": "b", "image_path": None, "question": "Q", "answer": "A",
            "candidates": [{"text": "Step 1: a. Final answer: A"}]}
    cands.write_text(json.dumps([good, {**good, "id": "q1", "image_path": name}]))
    with pytest.raises(RecordError) as info:
        load_candidates(cands, check_images=False)
    assert (info.value.file, info.value.record, info.value.field, info.value.reason) == (
        str(cands), 1, "image_path", "path_escapes_image_root")
    assert "id='q1'" in str(info.value) and "inside the image root" in str(info.value)


def test_read_number_map_names_the_file_the_entry_and_what_was_expected(tmp_path):
    from dreamprm_jax.data.jsonfiles import read_number_map

    path = tmp_path / "weights.json"
    path.write_text('{"a": 1, "b": 2.5}')
    assert read_number_map(path, "{domain: weight}") == {"a": 1.0, "b": 2.5}
    for text, kwargs, message in (
            ('{"a": 1, "b": "x"}', {}, r"weights.json: entry 'b' is 'x'; expected a number$"),
            ('{"a": true}', {}, r"entry 'a' is True; expected a number"),
            ('{"a": -1}', {"minimum": 0.0}, r"entry 'a' is -1; expected a number >= 0"),
            ("{}", {"non_empty": True}, r"expected a non-empty JSON object \{domain: weight\}, got \{\}"),
            ("[1]", {}, r"expected a JSON object \{domain: weight\}, got list"),
            ('{"a": ', {}, r"weights.json: not valid JSON \(.*\); expected a JSON object \{domain: weight\}")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_number_map(path, "{domain: weight}", **kwargs)
