"""A tiny training run: a generated benchmark with a handful of chains per domain and a
config whose model and batches are small enough to train in seconds on a CPU."""

from __future__ import annotations

import dataclasses
import os

from dreamprm_jax import configs
from dreamprm_jax.data import synthetic
from dreamprm_jax.train import demo, loop


def tiny_benchmark(out_dir) -> str:
    """Every generated domain, 6 training chains each, 8 meta and 4 test chains."""
    config = dataclasses.replace(synthetic.default_config(), train_per_domain=6, meta=8, test=4)
    synthetic.generate(out_dir, config)
    return str(out_dir)


def tiny_config(data_dir: str, out_dir: str, **overrides) -> configs.TrainConfig:
    base = dataclasses.replace(
        configs.default(),
        train_json=os.path.join(data_dir, "train.json"), meta_json=os.path.join(data_dir, "meta.json"),
        image_root=data_dir, cache_dir=os.path.join(data_dir, "cache"), out_dir=out_dir,
        model_hidden_size=32, model_layers=1, train_batch_size=4, meta_batch_size=2, unroll=2,
        iterations=4, checkpoint_every=2, log_every=1, progress=False, export=False, meta_warmup=0, meta_lr_warmup=0,
        seq_buckets=(192,), patch_buckets=(256,))  # one static shape: one compiled program per run
    return dataclasses.replace(base, **overrides)


def train(cfg: configs.TrainConfig, **kwargs) -> loop.TrainResult:
    """``loop.train`` on the config's record files and a fresh demo model."""
    source = demo.resolve_data(cfg)
    return loop.train(cfg, source.data, demo.resolve_model(cfg, source.data), **kwargs)


def final_state(out_dir: str):
    """``(step, state as numpy, extra)`` of the newest checkpoint in ``out_dir/checkpoints``."""
    import jax
    import numpy as np

    from dreamprm_jax.train.checkpointing import Checkpointer

    with Checkpointer(os.path.join(out_dir, "checkpoints")) as ckpt:
        step, state, extra = ckpt.restore_latest()
    return step, jax.tree.map(np.asarray, state), extra
