"""Pillow renderers for the synthetic benchmark's images.

Every renderer is a pure function of its arguments (no hidden randomness: a noise image
takes its pixels from the caller's generator), so a scene always renders to the same
pixels and therefore to the same PNG bytes.

Scenes (``size`` x ``size`` RGB, white background):

* ``bars``   three vertical bars of distinct colours; bar height = value / 9 of the plot
  height (values 1..9), a grey baseline.
* ``count``  a 4 x 4 grid; ``n_target`` cells hold a square of the target colour,
  ``n_other`` cells a square of another colour, the rest are empty (light grey).
* ``shapes`` one filled regular polygon (3..8 sides) with ``dots`` small black dots
  inside it.
* ``noise``  uniform random pixels: an image that carries no information.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "render_bars", "render_count", "render_shape", "render_noise", "png_bytes"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
_BACKGROUND = (255, 255, 255)
_EMPTY_CELL = (225, 225, 225)
_GRID = 4  # the count grid is _GRID x _GRID cells
MAX_BAR_VALUE = 9


def render_bars(values: Sequence[int], colours: Sequence[str], size: int) -> Image.Image:
    """Bars left to right; bar i has colour ``colours[i]`` and height ``values[i] / 9`` of the plot."""
    if len(values) != len(colours):
        raise ValueError(f"render_bars: {len(values)} values but {len(colours)} colours")
    img = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    margin = max(2, size // 14)
    base = size - margin
    plot_h = base - margin
    n = len(values)
    slot = (size - 2 * margin) / n
    for i, (value, colour) in enumerate(zip(values, colours)):
        if not 1 <= value <= MAX_BAR_VALUE:
            raise ValueError(f"render_bars: bar value {value} outside 1..{MAX_BAR_VALUE}")
        x0 = margin + i * slot + slot * 0.15
        x1 = margin + (i + 1) * slot - slot * 0.15
        top = base - plot_h * value / MAX_BAR_VALUE
        draw.rectangle([round(x0), round(top), round(x1), base], fill=COLOURS[colour])
    draw.line([margin, base, size - margin, base], fill=(90, 90, 90), width=1)
    return img


def render_count(cells: Sequence[str | None], size: int) -> Image.Image:
    """A 4 x 4 grid, row-major ``cells`` (a colour name or None for an empty cell)."""
    if len(cells) != _GRID * _GRID:
        raise ValueError(f"render_count: expected {_GRID * _GRID} cells, got {len(cells)}")
    img = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size / _GRID
    pad = max(1, round(cell * 0.15))
    for idx, colour in enumerate(cells):
        r, c = divmod(idx, _GRID)
        box = [round(c * cell) + pad, round(r * cell) + pad, round((c + 1) * cell) - pad - 1, round((r + 1) * cell) - pad - 1]
        draw.rectangle(box, fill=_EMPTY_CELL if colour is None else COLOURS[colour])
    return img


def render_shape(sides: int, colour: str, dots: int, rotation: float, size: int) -> Image.Image:
    """A filled regular ``sides``-gon (rotated by ``rotation`` radians) with ``dots`` dots inside."""
    if not 3 <= sides <= 8:
        raise ValueError(f"render_shape: sides must be in 3..8, got {sides}")
    img = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx = cy = size / 2
    radius = size * 0.42
    points = [(cx + radius * math.cos(rotation + 2 * math.pi * k / sides),
               cy + radius * math.sin(rotation + 2 * math.pi * k / sides)) for k in range(sides)]
    draw.polygon(points, fill=COLOURS[colour])
    # dots on a small circle well inside the inscribed circle (radius * cos(pi / 3) for a triangle)
    dot_r = max(1, size // 28)
    ring = radius * 0.25
    for k in range(dots):
        angle = 2 * math.pi * k / max(dots, 1) + math.pi / 2
        x = cx + (ring if dots > 1 else 0.0) * math.cos(angle)
        y = cy + (ring if dots > 1 else 0.0) * math.sin(angle)
        draw.ellipse([x - dot_r, y - dot_r, x + dot_r, y + dot_r], fill=(0, 0, 0))
    return img


def render_noise(rng: np.random.Generator, size: int) -> Image.Image:
    """Uniform random RGB pixels drawn from ``rng``."""
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)  # [H, W, 3]
    return Image.fromarray(pixels)


def png_bytes(img: Image.Image) -> bytes:
    """The PNG encoding of ``img`` (deterministic: no metadata, fixed compression)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
