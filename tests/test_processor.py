"""Processor and offline tokenizer: template, token ids and patches equal transformers' own."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreamprm_jax.data.processor import (
    ImageDecodeError,
    Processor,
    build_offline_tokenizer,
    load_image,
    render_chat,
    resize_if_needed,
)
from dreamprm_jax.data.tokenizer import QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, TokenizerError, load_tokenizer

CORPUS = [
    "Which shape has the largest area? Step 1: The circle has radius 3. Step 2: Its area is 28.3.",
    "Final answer: B\n\nThe quick brown fox jumps over 12 lazy dogs.",
    "Question: how many apples are left? Step 1: 7 - 3 = 4. Final answer: 4",
] * 10


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_offline_tokenizer(CORPUS, 320, d)
    return d


@pytest.fixture(scope="module")
def processor(tok_dir):
    return Processor.from_directory(tok_dir, max_image_side=64, min_pixels=28 * 28, max_pixels=56 * 84)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_offline_tokenizer_layout_and_round_trip(tok_dir, processor):
    files = set(os.listdir(tok_dir))
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    ids = processor.special_token_ids
    n = ids.vocab_size
    assert n <= 320
    # The seven specials are the last ids, in Qwen2-VL's order.
    assert [ids.pad, ids.im_start, ids.im_end, ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad] == list(
        range(n - 7, n)
    )
    text = "Step 1: naïve ünïcode 3.14 and spaces  \n\nFinal answer: C"
    assert processor.decode(processor.tokenize(text)) == text
    s = render_chat("hi", 2)
    toks = processor.tokenize(s)
    assert (toks == ids.image_pad).sum() == 2 and (toks == ids.im_start).sum() == 3


def test_render_chat_equals_qwen2_vl_template(processor):
    tok = processor.tokenizer
    for content, n in (([{"type": "image", "image": "x.png"}, {"type": "text", "text": "Q?\n\nStep 1: a"}], 1),
                       ([{"type": "text", "text": "Q?\n\nStep 1: a"}], None)):
        msgs = [{"role": "user", "content": content}]
        ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                      chat_template=QWEN2_VL_CHAT_TEMPLATE)
        assert render_chat("Q?\n\nStep 1: a", n) == ref
    assert render_chat("T", 1) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>T<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encode_equals_transformers_qwen2_vl_pipeline(processor):
    """transformers' Qwen2-VL recipe step by step: jinja template, image processor, pad expansion.

    (Qwen2VLProcessor itself needs torchvision for its video processor, so its two steps are
    replayed here: ``<|image_pad|>`` -> ``<|image_pad|>`` * (grid.prod() // merge^2), then tokenise.)
    """
    from transformers import Qwen2VLImageProcessor  # falls back to the PIL backend without torchvision

    image = _image(100, 70)  # longest side 100 > max_image_side 64 -> LANCZOS to 64 x 44 first
    text = "How many sides?\n\nStep 1: count them."
    enc = processor.encode(text, image)
    ref_img = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 84)(
        images=[resize_if_needed(image, 64)], return_tensors="np")
    msgs = [{"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": text}]}]
    prompt = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                     chat_template=QWEN2_VL_CHAT_TEMPLATE)
    n = int(np.prod(ref_img["image_grid_thw"][0])) // 4
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n)
    ref_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(enc.input_ids, ref_ids)
    np.testing.assert_array_equal(enc.image_grid_thw, ref_img["image_grid_thw"])
    np.testing.assert_allclose(enc.pixel_values, ref_img["pixel_values"], rtol=0, atol=0)  # same maths: exact
    assert enc.input_ids.dtype == np.int32 and enc.pixel_values.dtype == np.float32
    assert enc.pixel_values.shape == (int(np.prod(enc.image_grid_thw)), processor.patch_dim)
    assert resize_if_needed(image, 64).size == (64, 44)

    text_only = processor.encode(text)
    assert text_only.pixel_values is None and text_only.image_grid_thw is None
    ref_t = processor.tokenizer(render_chat(text), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(text_only.input_ids, ref_t)

    # encode_text: the same ids from a known grid (the dataset encoder's path for a seen image)
    np.testing.assert_array_equal(processor.encode_text(text, enc.image_grid_thw), enc.input_ids)
    np.testing.assert_array_equal(processor.encode_text(text), text_only.input_ids)


def test_pixels_match_independent_patchify(processor):
    """Patch layout against the transformers-4 slow processor's formula, written out here.

    A 56 x 28 image needs no resize; rows are (t, h/m, w/m, m, m) windows of
    (C, Tp, P, P) values; the still frame is repeated Tp times. Tolerance: float32 rounding.
    """
    image = _image(56, 28, seed=1)
    pix, grid = processor.preprocess_image(image)
    x = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0  # [C, H, W]
    mean = np.asarray(processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(processor.image_std, np.float32)[:, None, None]
    x = np.tile(((x - mean) / std)[None], (2, 1, 1, 1))  # [Tp, C, H, W]
    gh, gw, m, p = 28 // 14, 56 // 14, 2, 14
    x = x.reshape(1, 2, 3, gh // m, m, p, gw // m, m, p)
    ref = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * 2 * p * p)
    np.testing.assert_array_equal(grid, [[1, gh, gw]])
    np.testing.assert_allclose(pix, ref, rtol=0, atol=1e-5)


def test_image_path_and_vision_config_patch_sizes(tok_dir, tmp_path):
    image_path = tmp_path / "img.png"
    _image(40, 30).save(image_path)
    proc = Processor.from_directory(tok_dir, vision={"patch_size": 7, "temporal_patch_size": 1,
                                                     "spatial_merge_size": 2}, max_pixels=28 * 28 * 4)
    enc = proc.encode("x", str(image_path))
    assert proc.patch_dim == 3 * 1 * 7 * 7 == enc.pixel_values.shape[1]
    n = proc.num_image_tokens(enc.image_grid_thw)
    assert (enc.input_ids == proc.special_token_ids.image_pad).sum() == n == np.prod(enc.image_grid_thw) // 4


def test_from_directory_reads_config_and_preprocessor(tok_dir, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in os.listdir(tok_dir):
        (d / f).write_bytes((tok_dir / f).read_bytes())
    (d / "config.json").write_text(json.dumps({"vision_config": {"patch_size": 7, "temporal_patch_size": 2,
                                                                 "spatial_merge_size": 2}}))
    Processor(load_tokenizer(tok_dir), min_pixels=100, max_pixels=2000).save_preprocessor_config(d)
    proc = Processor.from_directory(d)
    assert (proc.patch_size, proc.temporal_patch_size, proc.merge_size) == (7, 2, 2)
    assert (proc.min_pixels, proc.max_pixels, proc.max_image_side) == (100, 2000, 512)


def test_undecodable_image_names_the_file(processor, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageDecodeError, match=r"broken\.png.*cannot decode"):
        processor.encode("x", str(bad))
    with pytest.raises(ImageDecodeError, match=r"nothere\.jpg.*does not exist"):
        load_image(tmp_path / "nothere.jpg")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing_dir.*does not exist"):
        load_tokenizer(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty.*no tokenizer found"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_offline_tokenizer(["a"], 100, tmp_path / "t")
    assert len(SPECIAL_TOKENS) == 7


def test_processor_runs_without_torch(tok_dir, tmp_path):
    """Import path check: with torch hidden, the processor still tokenises and patchifies."""
    import site

    sp = site.getsitepackages()[0]
    shadow = tmp_path / "site"
    shadow.mkdir()
    for name in os.listdir(sp):
        if name.split("-")[0].split(".")[0] in ("torch", "torchvision", "functorch", "torchgen"):
            continue
        os.symlink(os.path.join(sp, name), shadow / name)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys; sys.path[:0] = [%r, %r]\n"
        "from PIL import Image; import numpy as np\n"
        "from dreamprm_jax.data.processor import Processor\n"
        "p = Processor.from_directory(%r, max_pixels=56*56)\n"
        "e = p.encode('hi', Image.new('RGB', (60, 50), (10, 200, 30)))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(e.pixel_values.shape, int(e.image_grid_thw.prod()))\n"
    ) % (repo, str(shadow), str(tok_dir))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(16, 1176) 16" in out.stdout  # 60 x 50 -> 56 x 56 -> 4 x 4 patches
