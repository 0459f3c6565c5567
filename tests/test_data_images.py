"""Image defects are caught at validation, named by file, record and field, and counted in
skip mode: everything the processor would reject later (or silently mangle)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dreamprm_jax.data import processor as processor_lib
from dreamprm_jax.data.processor import ImageRejected, Processor, build_offline_tokenizer, check_image_file
from dreamprm_jax.data.records import BadRecords, load_meta_records, load_train_records


def write_image(root, name: str, image: Image.Image) -> str:
    image.save(os.path.join(root, name))
    return name


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    build_offline_tokenizer(["Step 1: a. Final answer: b"], 300, str(tok_dir))
    return Processor.from_directory(str(tok_dir), max_image_side=512, min_pixels=56 * 56, max_pixels=448 * 448)


# (file name, image, reason); each one fails in Processor.preprocess_image or is refused on purpose
DEFECTS = {
    "tall.png": (lambda: Image.new("RGB", (1, 300)), processor_lib.IMAGE_ASPECT_RATIO),
    "shrunk_tall.png": (lambda: Image.new("RGB", (3, 1000)), processor_lib.IMAGE_ASPECT_RATIO),  # 1 x 512 once shrunk
    "sliver.png": (lambda: Image.new("RGB", (1, 1000)), processor_lib.IMAGE_TOO_SMALL),  # 0 x 512 once shrunk
    "deep.png": (lambda: Image.new("I;16", (40, 40)), processor_lib.IMAGE_MODE),
}


def test_each_defect_is_named_with_its_reason(tmp_path, processor):
    for name, (make, reason) in DEFECTS.items():
        path = str(tmp_path / name)
        make().save(path)
        with pytest.raises(ImageRejected) as err:
            processor.check_image(path)
        assert err.value.reason == reason and path in err.value.got, name


def test_the_processor_rejects_what_validation_rejects(tmp_path, processor):
    """The check is not stricter than needed where the processor itself fails."""
    for name in ("tall.png", "shrunk_tall.png", "sliver.png"):
        path = str(tmp_path / name)
        DEFECTS[name][0]().save(path)
        with pytest.raises(ValueError):
            processor.preprocess_image(path)
    ok = str(tmp_path / "ok.png")
    Image.new("RGB", (2, 300)).save(ok)  # 150:1 passes both
    assert check_image_file(ok) == (2, 300)
    pixels, grid = processor.preprocess_image(ok)
    assert pixels.shape[0] == int(np.prod(grid))


def test_unreadable_and_too_large(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageRejected) as err:
        check_image_file(str(broken))
    assert err.value.reason == processor_lib.IMAGE_UNREADABLE and str(broken) in err.value.got
    big = str(tmp_path / "big.png")
    Image.new("L", (64, 64)).save(big)
    with pytest.raises(ImageRejected) as err:
        check_image_file(big, max_image_pixels=1000)
    assert err.value.reason == processor_lib.IMAGE_TOO_LARGE and "4096 pixels" in err.value.got
    assert check_image_file(big, max_image_pixels=None) == (64, 64)


def test_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.png")
    Image.new("1", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)  # PIL raises over twice the limit
    with pytest.raises(ImageRejected) as err:
        check_image_file(path)
    assert err.value.reason == processor_lib.IMAGE_TOO_LARGE


def _records(tmp_path) -> tuple[str, list[str]]:
    names = []
    for name, (make, _) in DEFECTS.items():
        names.append(write_image(tmp_path, name, make()))
    names.append(write_image(tmp_path, "good.png", Image.new("RGB", (32, 32))))
    rows = [{"input": "Q", "add": "Step 1: a", "image_path": n, "dataset": "math", "accuracy": 0.5} for n in names]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path), names


def test_skip_mode_counts_image_defects_and_error_mode_names_them(tmp_path, processor):
    path, names = _records(tmp_path)
    loaded = load_train_records(path, on_bad_record="skip", image_check=processor.check_image)
    assert [os.path.basename(r.image_path) for r in loaded.records] == ["good.png"]
    assert loaded.skipped == Counter(reason for _, reason in DEFECTS.values())
    assert loaded.num_read == len(names)
    first = loaded.first_errors[0]
    assert (first.file, first.record, first.field) == (path, 0, "image_path") and "tall.png" in str(first)

    with pytest.raises(BadRecords) as err:
        load_train_records(path, image_check=processor.check_image)
    message = str(err.value)
    assert f"{path}: 4 of 5 records are bad" in message
    assert "record 0, line 1, field 'image_path'" in message and "aspect ratio of at most 200" in message
    assert "--on-bad-record skip" in message


def test_meta_records_use_the_same_check(tmp_path):
    write_image(tmp_path, "tall.png", Image.new("RGB", (300, 1)))
    rows = [{"input": "Q Step 1: a. Final answer: b", "image_path": "tall.png", "true_false": True}]
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_meta_records(str(path), on_bad_record="skip")  # default check: Qwen2-VL's default settings
    assert loaded.skipped == Counter({processor_lib.IMAGE_ASPECT_RATIO: 1}) and loaded.records == []
