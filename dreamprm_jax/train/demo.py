"""The command line's data and model sources: a generated benchmark and a small random PRM
unless files and a checkpoint directory are given.

- :func:`resolve_data`: ``--train-json``/``--meta-json``/``--image-root``, or the generated
  benchmark (:mod:`dreamprm_jax.data.synthetic`) written to ``--data-dir``, whose planted domain
  qualities come back with it.
- :func:`resolve_model`: ``--model-dir`` (:func:`~dreamprm_jax.train.loop.load_model`), or a
  random ``--model-preset demo`` Qwen2-VL with a byte-level BPE learnt offline from the
  training texts (:func:`build_demo_tokenizer`), kept in the run directory so that a resumed
  run reads the same one.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax

from dreamprm_jax import data as data_lib
from dreamprm_jax.configs import TrainConfig
from dreamprm_jax.data import synthetic
from dreamprm_jax.data.processor import Processor
from dreamprm_jax.data.records import iter_texts
from dreamprm_jax.data.tokenizer import build_offline_tokenizer
from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train.loop import PRMModel, TrainData, load_model, processor_options

#: Vocabulary size of the demo tokenizer.
DEMO_VOCAB_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The records to train on, and the planted domain qualities when they were generated."""

    data: TrainData
    planted_quality: dict[str, float] | None = None


def _say(cfg: TrainConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr, flush=True)


def resolve_data(cfg: TrainConfig) -> DataSource:
    """``cfg``'s record files, or the generated benchmark in ``cfg.data_dir`` (written once,
    reused when present) with its planted qualities."""
    if cfg.train_json is not None:
        if cfg.meta_json is None:
            raise ValueError("--train-json was given without --meta-json; expected both DreamPRM files")
        return DataSource(TrainData(cfg.train_json, cfg.meta_json, cfg.image_root))
    config = dataclasses.replace(synthetic.default_config(), seed=cfg.synthetic_seed)
    _say(cfg, f"[data] generated benchmark in {cfg.data_dir} (seed {cfg.synthetic_seed})")
    manifest = synthetic.generate(cfg.data_dir, config, progress=cfg.progress, reuse=True)
    data = TrainData(os.path.join(cfg.data_dir, "train.json"), os.path.join(cfg.data_dir, "meta.json"), cfg.data_dir)
    return DataSource(data, synthetic.planted_qualities(manifest))


def build_demo_tokenizer(data: TrainData, out_dir: str, vocab_size: int = DEMO_VOCAB_SIZE) -> str:
    """A byte-level BPE learnt from the texts of ``data``'s training and meta records, saved in
    ``out_dir`` (left alone when it already holds one); returns ``out_dir``."""
    if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        train = data_lib.load_train_records(data.train_json, image_root=data.image_root, check_images=False,
                                            on_bad_record="skip").records
        meta = data_lib.load_meta_records(data.meta_json, image_root=data.image_root, check_images=False,
                                          on_bad_record="skip").records
        build_offline_tokenizer(list(iter_texts(train)) + list(iter_texts(meta)), vocab_size, out_dir)
    return out_dir


def demo_model(cfg: TrainConfig, tokenizer_dir: str) -> PRMModel:
    """A random ``cfg.model_preset`` Qwen2-VL PRM (only ``demo``) over the tokenizer in
    ``tokenizer_dir``, drawn from ``cfg.seed``."""
    if cfg.model_preset != "demo":
        raise ValueError(f"--model-preset {cfg.model_preset!r}: without --model-dir only 'demo' (a small random "
                         "Qwen2-VL) is built; for the 2B model pass --model-dir with a local checkpoint")
    ids = Processor.from_directory(tokenizer_dir, **processor_options(cfg)).special_token_ids
    model_config = qwen2_vl.demo(
        vocab_size=ids.vocab_size, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
        hidden_size=cfg.model_hidden_size, num_hidden_layers=cfg.model_layers, dtype=cfg.dtype, remat=cfg.remat)
    processor = Processor.from_directory(tokenizer_dir, vision=model_config.vision, **processor_options(cfg))
    backbone_key, head_key = jax.random.split(jax.random.key(cfg.seed))
    params = prm.init(model_config, head_key, qwen2_vl.init_params(model_config, backbone_key))
    return PRMModel(model_config, params, processor, tokenizer_dir)


def resolve_model(cfg: TrainConfig, data: TrainData) -> PRMModel:
    """``cfg.model_dir``'s PRM, or the demo PRM with its tokenizer in ``<out_dir>/tokenizer``."""
    if cfg.model_dir is not None:
        return load_model(cfg.model_dir, cfg)
    tokenizer_dir = os.path.join(cfg.out_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        _say(cfg, f"[model] building an offline tokenizer in {tokenizer_dir}")
    return demo_model(cfg, build_demo_tokenizer(data, tokenizer_dir))
