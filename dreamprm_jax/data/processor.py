"""Qwen2-VL processor without the network: chat template, image patches, token ids.

One DreamPRM sample is the single user message ``[image, text]`` rendered by Qwen2-VL's
chat template with the generation prompt (``add_generation_prompt=True``)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|> x n<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n

(without an image the ``<|vision_start|>...<|vision_end|>`` span is absent). The image is
first shrunk so that its longest side is at most ``max_image_side`` (LANCZOS, new side
``int(side * max_image_side / longest)``, as DreamPRM's ``resize_image_if_needed``), then
goes through transformers' Qwen2-VL image processor with the PIL/numpy backend
(``Qwen2VLImageProcessorPil``; the default "fast" one needs torch/torchvision):

- ``smart_resize``: both sides rounded to multiples of ``factor = patch_size * merge_size``,
  area kept in ``[min_pixels, max_pixels]``, BICUBIC;
- rescale by 1/255, normalise with the CLIP mean / std;
- patchify to ``P = grid_h * grid_w`` rows of ``D = C * temporal_patch_size * patch^2``
  values, rows in merge-window order (the still image is repeated ``temporal_patch_size``
  times along time).

The image contributes ``n = grid_t * grid_h * grid_w / merge_size^2`` ``<|image_pad|>``
tokens, which the model fills with the merged patch features in order.

DreamPRM's texts: a training sample is ``record["input"] + "\\n\\n" + record["add"]``; a
meta (step) sample is the chain prefix up to step s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from dreamprm_jax.data.tokenizer import (
    QWEN2_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_offline_tokenizer,
    load_tokenizer,
)

__all__ = [
    "EncodedSample",
    "IMAGE_MODES",
    "ImageDecodeError",
    "ImageRejected",
    "check_image_file",
    "Processor",
    "QWEN2_VL_CHAT_TEMPLATE",
    "SYSTEM_PROMPT",
    "SpecialTokenIds",
    "build_offline_tokenizer",
    "load_image",
    "render_chat",
    "resize_if_needed",
]

SYSTEM_PROMPT = "You are a helpful assistant."

#: CLIP normalisation used by Qwen2-VL's image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


# Why an image file is refused (the skip counters' keys; :class:`ImageRejected` ``reason``).
IMAGE_UNREADABLE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_ASPECT_RATIO = "image_aspect_ratio"
IMAGE_MODE = "image_mode"

#: ``smart_resize`` of Qwen2-VL's image processor refuses a longer side over 200 x the shorter.
MAX_ASPECT_RATIO = 200

#: PIL modes that convert to RGB faithfully. 16- and 32-bit modes ("I", "I;16", "F") are
#: refused: ``convert("RGB")`` clips them to 0..255, so a 16-bit scan would turn white.
IMAGE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


class ImageRejected(ValueError):
    """An image file the processor would refuse or mangle: ``reason`` (one of the
    ``IMAGE_*`` keys), ``expected`` and ``got`` in words (the file is named in ``got``)."""

    def __init__(self, reason: str, expected: str, got: str):
        self.reason, self.expected, self.got = reason, expected, got
        super().__init__(f"expected {expected}, got {got} [{reason}]")


def check_image_file(path: str | os.PathLike, *, max_image_side: int | None = 512,
                     max_image_pixels: int | None = -1) -> tuple[int, int]:
    """Everything :meth:`Processor.preprocess_image` would reject later, checked now; returns
    the (width, height) of the file.

    Raises :class:`ImageRejected` when the file

    - cannot be identified, verified or fully decoded by PIL (``corrupt_image``);
    - has more than ``max_image_pixels`` pixels (``image_too_large``; ``-1``: PIL's
      ``Image.MAX_IMAGE_PIXELS``, its decompression-bomb limit; ``None``: no limit);
    - has a mode outside :data:`IMAGE_MODES` (``image_mode``);
    - has a side that the shrink to ``max_image_side`` (:func:`resize_if_needed`) makes 0
      pixels (``image_too_small``);
    - has, after that shrink, a longer side more than :data:`MAX_ASPECT_RATIO` times the
      shorter (``image_aspect_ratio``; Qwen2-VL's ``smart_resize`` raises there).
    """
    import warnings

    from PIL import Image

    path = os.fspath(path)
    limit = Image.MAX_IMAGE_PIXELS if max_image_pixels == -1 else max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                (width, height), mode = img.size, img.mode
                if limit is not None and width * height > limit:
                    raise ImageRejected(IMAGE_TOO_LARGE, f"at most {limit} pixels (a decompression-bomb guard)",
                                        f"{path}: {width} x {height} = {width * height} pixels")
                img.verify()
            with Image.open(path) as img:  # verify() leaves the object unusable; reopen to decode pixels
                img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(IMAGE_TOO_LARGE, "an image under PIL's decompression-bomb limit",
                            f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageRejected(IMAGE_UNREADABLE, "an image PIL can decode", f"{path} ({type(exc).__name__}: {exc})") from None
    if mode not in IMAGE_MODES:
        raise ImageRejected(IMAGE_MODE, f"an 8-bit image mode ({', '.join(sorted(IMAGE_MODES))})",
                            f"{path}: mode {mode!r}")
    w, h = width, height
    if max_image_side is not None and max(w, h) > max_image_side:
        scale = max_image_side / float(max(w, h))
        w, h = int(w * scale), int(h * scale)
    if min(w, h) < 1:
        raise ImageRejected(IMAGE_TOO_SMALL, f"both sides at least 1 pixel after the shrink to a longest side of "
                            f"{max_image_side}", f"{path}: {width} x {height} becomes {w} x {h}")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        resized = "" if (w, h) == (width, height) else f" (after the shrink to {w} x {h})"
        raise ImageRejected(IMAGE_ASPECT_RATIO, f"an aspect ratio of at most {MAX_ASPECT_RATIO}:1",
                            f"{path}: {width} x {height}{resized}, {max(w, h) / min(w, h):g}:1")
    return width, height


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of Qwen2-VL's special tokens in a tokenizer, and the tokenizer's length.

    ``pad`` is ``<|endoftext|>`` (Qwen2-VL's pad token), ``eos`` is ``<|im_end|>``. Build a
    model config to match: ``image_token_id=image_pad``, ``video_token_id=video_pad``,
    ``vision_start_token_id=vision_start``, ``vision_end_token_id=vision_end`` and
    ``vocab_size >= vocab_size`` (the tokenizer length).
    """

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    vocab_size: int

    @property
    def eos(self) -> int:
        return self.im_end


@dataclasses.dataclass(frozen=True)
class EncodedSample:
    """One tokenised sample.

    input_ids: np.int32 [L]; pixel_values: np.float32 [P, D] or None;
    image_grid_thw: np.int64 [1, 3] (t, h, w in patches) or None.
    """

    input_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None


def render_chat(text: str, num_image_tokens: int | None = None) -> str:
    """Qwen2-VL's chat template for DreamPRM's message ``[{role: user, content: [image, text]}]``.

    Equal to ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
    with :data:`QWEN2_VL_CHAT_TEMPLATE`, with the single ``<|image_pad|>`` already expanded to
    ``num_image_tokens`` copies (as the Qwen2-VL processor does). ``None`` means no image.
    """
    image = ""
    if num_image_tokens is not None:
        image = "<|vision_start|>" + "<|image_pad|>" * int(num_image_tokens) + "<|vision_end|>"
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{image}{text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def load_image(path: str | os.PathLike):
    """Open and fully decode an image file as RGB (PIL), naming the file on failure."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageDecodeError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); expected a readable "
            "PNG/JPEG/GIF/BMP/WebP file"
        ) from exc


def resize_if_needed(image, max_side: int | None):
    """Shrink ``image`` so its longest side is ``<= max_side`` (DreamPRM's resize_image_if_needed).

    New size ``(int(w * s), int(h * s))`` with ``s = max_side / max(w, h)``, LANCZOS; images
    already small enough (or ``max_side=None``) are returned unchanged.
    """
    from PIL import Image

    if max_side is None:
        return image
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / float(max(width, height))
    return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)


def _vision_field(vision: Any, *names: str, default: int) -> int:
    if vision is None:
        return default
    for name in names:
        if isinstance(vision, dict) and name in vision:
            return int(vision[name])
        if hasattr(vision, name):
            return int(getattr(vision, name))
    return default


class Processor:
    """Turns (text, image) into Qwen2-VL model inputs, on the host, with numpy only.

    Args:
      tokenizer: a transformers tokenizer holding Qwen2-VL's special tokens
        (:func:`~dreamprm_jax.data.tokenizer.load_tokenizer`).
      vision: the model's ``VisionConfig`` (or any object / dict with ``patch_size``,
        ``temporal_patch_size``, ``spatial_merge_size``); ``None`` means Qwen2-VL's 14 / 2 / 2.
      max_image_side: longest image side before the Qwen2-VL resize (DreamPRM: 512); None
        disables it.
      min_pixels, max_pixels: area bounds of ``smart_resize`` (Qwen2-VL: 56*56 and
        28*28*1280). Tiny demo images want a small ``max_pixels``.
      image_mean, image_std: per-channel normalisation (CLIP's by default).
    """

    def __init__(
        self,
        tokenizer,
        vision: Any = None,
        *,
        max_image_side: int | None = 512,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
    ):
        self.tokenizer = tokenizer
        self.patch_size = _vision_field(vision, "patch_size", default=14)
        self.temporal_patch_size = _vision_field(vision, "temporal_patch_size", default=2)
        self.merge_size = _vision_field(vision, "spatial_merge_size", "merge_size", default=2)
        self.max_image_side = max_image_side
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self._image_processor = None
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"Processor: tokenizer lacks the Qwen2-VL special token(s) {missing}")
        self.special_token_ids = SpecialTokenIds(
            pad=vocab["<|endoftext|>"],
            im_start=vocab["<|im_start|>"],
            im_end=vocab["<|im_end|>"],
            vision_start=vocab["<|vision_start|>"],
            vision_end=vocab["<|vision_end|>"],
            image_pad=vocab["<|image_pad|>"],
            video_pad=vocab["<|video_pad|>"],
            vocab_size=len(tokenizer),
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_directory(cls, path: str | os.PathLike, vision: Any = None, **overrides) -> "Processor":
        """Processor from a local checkpoint (or offline tokenizer) directory.

        Reads the tokenizer files; ``preprocessor_config.json`` when present (min/max pixels,
        mean/std, patch sizes); and, when ``vision`` is not given, the patch sizes from
        ``config.json``'s ``vision_config``. Keyword ``overrides`` (``max_image_side``,
        ``min_pixels``, ...) win over the files.
        """
        path = os.fspath(path)
        tokenizer = load_tokenizer(path)
        kwargs: dict[str, Any] = {}
        pre_file = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre_file):
            pre = _read_json(pre_file)
            size = pre.get("size") or {}
            min_pixels = pre.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
            max_pixels = pre.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
            if min_pixels is not None:
                kwargs["min_pixels"] = int(min_pixels)
            if max_pixels is not None:
                kwargs["max_pixels"] = int(max_pixels)
            if "image_mean" in pre:
                kwargs["image_mean"] = tuple(pre["image_mean"])
            if "image_std" in pre:
                kwargs["image_std"] = tuple(pre["image_std"])
            if vision is None:
                vision = {k: pre[k] for k in ("patch_size", "temporal_patch_size", "merge_size") if k in pre}
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            vision_cfg = _read_json(cfg_file).get("vision_config")
            if vision_cfg and (vision is None or isinstance(vision, dict)):
                vision = {**(vision or {}), **vision_cfg}  # the model's VisionConfig wins
        kwargs.update(overrides)
        return cls(tokenizer, vision, **kwargs)

    def save_preprocessor_config(self, path: str | os.PathLike) -> str:
        """Write ``preprocessor_config.json`` (Qwen2-VL image processor layout) into ``path``."""
        os.makedirs(path, exist_ok=True)
        out = os.path.join(os.fspath(path), "preprocessor_config.json")
        d = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "rescale_factor": 1 / 255,
            "resample": 3,
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
        return out

    # ------------------------------------------------------------------ images
    @property
    def image_processor(self):
        """transformers' ``Qwen2VLImageProcessorPil`` (numpy/PIL backend, no torch needed)."""
        if self._image_processor is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self._image_processor = Qwen2VLImageProcessorPil(
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                patch_size=self.patch_size,
                temporal_patch_size=self.temporal_patch_size,
                merge_size=self.merge_size,
                image_mean=list(self.image_mean),
                image_std=list(self.image_std),
            )
        return self._image_processor

    def check_image(self, path: str | os.PathLike) -> None:
        """Raise :class:`ImageRejected` for a file :meth:`preprocess_image` would refuse
        (:func:`check_image_file` with this processor's ``max_image_side``)."""
        check_image_file(path, max_image_side=self.max_image_side)

    @property
    def patch_dim(self) -> int:
        """D = 3 * temporal_patch_size * patch_size^2 (one row of ``pixel_values``)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def preprocess_image(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Image (PIL or path) -> (pixel_values f32 [P, D], image_grid_thw i64 [1, 3])."""
        if not hasattr(image, "size") or isinstance(image, np.ndarray):
            if isinstance(image, (str, os.PathLike)):
                image = load_image(image)
            else:
                raise TypeError(f"Processor: expected a PIL image or a file path, got {type(image).__name__}")
        image = resize_if_needed(image.convert("RGB"), self.max_image_side)
        out = self.image_processor(images=[image], return_tensors="np")
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)  # [P, D]
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(1, 3)  # [1, (t, h, w)]
        return pixel_values, grid

    def num_image_tokens(self, image_grid_thw: np.ndarray) -> int:
        """n = t * h * w / merge_size^2 ``<|image_pad|>`` tokens for one image."""
        return int(np.prod(image_grid_thw)) // (self.merge_size**2)

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of an already rendered string (special tokens recognised), np.int32 [L]."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def encode(self, text: str, image=None) -> EncodedSample:
        """Chat-templated token ids and image patches for one (text, image) sample.

        ``image`` is a PIL image, a file path, or None (text only).
        """
        if image is None:
            return EncodedSample(self.encode_text(text))
        pixel_values, grid = self.preprocess_image(image)
        return EncodedSample(self.encode_text(text, grid), pixel_values, grid)

    def encode_text(self, text: str, image_grid_thw=None) -> np.ndarray:
        """The token ids of :meth:`encode` for a text whose image (if any) has this grid: a
        caller that already holds an image's patches skips preprocessing it again."""
        if image_grid_thw is None:
            return self.tokenize(render_chat(text))
        return self.tokenize(render_chat(text, self.num_image_tokens(np.asarray(image_grid_thw))))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(np.asarray(ids).tolist()), skip_special_tokens=False)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
