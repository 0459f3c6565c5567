"""Training presets as code. ``default`` is the CPU demo; ``qwen2_vl_2b`` is the paper's run."""

from __future__ import annotations

import dataclasses
from typing import Callable

from dreamprm_jax.configs.train_config import TrainConfig


def default() -> TrainConfig:
    """The CPU demo: a small Qwen2-VL PRM on the generated benchmark, a few minutes on 2 cores."""
    return TrainConfig()


def qwen2_vl_2b() -> TrainConfig:
    """The paper's hyper-parameters for Qwen2-VL-2B on one 80 GB device.

    Inner AdamW lr 5e-7 with StepLR(5000, 0.5), meta AdamW lr 0.01 / weight decay 1e-3,
    unroll 5, 10,000 iterations, images' longest side capped at 512 (the reference).
    ``--model-dir``, ``--train-json`` and ``--meta-json`` must point at local files.
    """
    return dataclasses.replace(
        TrainConfig(),
        model_preset="qwen2_vl_2b",
        dtype="bfloat16",
        remat="full",
        train_batch_size=1,
        meta_batch_size=1,
        unroll=5,
        meta_warmup=0,
        unroll_inner_scan=True,
        sampler="shuffle",
        inner_lr=5e-7,
        inner_lr_step_size=5000,
        inner_lr_gamma=0.5,
        inner_weight_decay=0.01,
        meta_lr=0.01,
        meta_lr_warmup=0,
        meta_grad_clip=0.0,
        meta_weight_decay=1e-3,
        iterations=10_000,
        checkpoint_every=500,
        log_every=10,
        min_pixels=56 * 56,
        max_pixels=512 * 512,
        out_dir="runs/qwen2_vl_2b",
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {"default": default, "qwen2_vl_2b": qwen2_vl_2b}


def get(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
