"""Position ids on the host (numpy): M-RoPE text positions and 2D vision positions.

Text (M-RoPE, transformers' ``Qwen2VLModel.get_rope_index``). Every non-pad token gets three
position ids (temporal, height, width). A text token at running position ``p`` gets
``(p, p, p)`` and advances ``p`` by one. A run of ``t * (h/m) * (w/m)`` image tokens (merge size
``m``; grid ``(t, h, w)`` in patches) starting at ``p`` gets, for merged cell ``(ti, hi, wi)`` in
row-major order, ``(p + ti, p + hi, p + wi)``; then ``p`` advances by ``max(h, w) / m``.
Padding positions (``attention_mask == 0``) get 0, wherever they are (left or right).

Vision (transformers' ``get_vision_position_ids``). Patch rows of ``pixel_values`` come from
the processor ordered by merge window: for each frame, windows of ``m x m`` patches in
row-major window order, patches row-major within a window. Row ``r`` of an image therefore has
``(h_r, w_r) = (H * m + i, W * m + j)`` for window ``(H, W)`` and in-window offset ``(i, j)``.
The 2D rotary embedding rotates half of each head by ``h_r`` and half by ``w_r``.
"""

from __future__ import annotations

import numpy as np

from .config import Qwen2VLConfig


def _grids(image_grid_thw) -> np.ndarray:
    if image_grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return grids


def rope_index(config: Qwen2VLConfig, input_ids, attention_mask=None, image_grid_thw=None) -> np.ndarray:
    """M-RoPE position ids ``[3, B, L]`` int32, equal to transformers' ``get_rope_index``.

    Args:
      input_ids: ``[B, L]`` ints.
      attention_mask: ``[B, L]`` (1 = token, 0 = padding) or None (all tokens).
      image_grid_thw: ``[num_images, 3]`` (t, h, w) in patches, in the order the images
        appear in the batch (row-major over ``input_ids``), or None.

    Raises ValueError if an image-token run does not match its grid, or grids are left over.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"rope_index: input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = _grids(image_grid_thw)
    m = config.vision.spatial_merge_size
    image, video = config.image_token_id, config.video_token_id
    positions = np.zeros((3, batch, length), dtype=np.int64)
    next_grid = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        if np.any(ids == video):
            raise ValueError(f"rope_index: row {b} holds video tokens ({video}); videos are not supported")
        is_image = ids == image
        out = np.empty((3, ids.shape[0]), dtype=np.int64)
        pos = 0
        start = 0
        while start < ids.shape[0]:
            end = start
            while end < ids.shape[0] and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                out[:, start:end] = np.arange(end - start)[None, :] + pos
                pos += end - start
            else:
                if next_grid >= grids.shape[0]:
                    raise ValueError(
                        f"rope_index: row {b} has more image-token runs than image_grid_thw rows ({grids.shape[0]})"
                    )
                t, h, w = (int(x) for x in grids[next_grid])
                gh, gw = h // m, w // m
                if t * gh * gw != end - start:
                    raise ValueError(
                        f"rope_index: row {b}, image {next_grid}: {end - start} image tokens but grid "
                        f"{(t, h, w)} needs t*h*w/{m * m} = {t * gh * gw}"
                    )
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                out[:, start:end] = np.stack([tt, hh, ww]).reshape(3, -1) + pos
                pos += max(h, w) // m
                next_grid += 1
            start = end
        positions[:, b, mask[b]] = out
    if next_grid != grids.shape[0]:
        raise ValueError(
            f"rope_index: image_grid_thw has {grids.shape[0]} rows but input_ids hold {next_grid} image-token runs"
        )
    return positions.astype(np.int32)


def vision_position_ids(config: Qwen2VLConfig, image_grid_thw) -> np.ndarray:
    """(row, col) patch coordinates ``[sum t*h*w, 2]`` int32 in the processor's merge-window order."""
    m = config.vision.spatial_merge_size
    out = []
    for t, h, w in _grids(image_grid_thw):
        t, h, w = int(t), int(h), int(w)
        if h % m or w % m:
            raise ValueError(f"vision_position_ids: grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    if not out:
        return np.zeros((0, 2), dtype=np.int32)
    return np.concatenate(out).astype(np.int32)


def vision_segment_ids(config: Qwen2VLConfig, image_grid_thw) -> np.ndarray:
    """Attention segment of every patch row ``[sum t*h*w]`` int32: one id per image frame (0, 1, ...).

    Vision attention is block-diagonal: a patch attends only to patches of its own frame.
    """
    del config
    lengths = [int(h * w) for t, h, w in _grids(image_grid_thw) for _ in range(int(t))]
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
