"""A tiny Qwen2-VL PRM on the generated benchmark as a bilevel problem (test fixture).

The real training pieces, shrunk to a size where every hypergradient method runs on a
2-core CPU in about a second per call (compiling each takes tens of seconds)::

    synthetic.generate (K domains, 32 px images)  ->  offline BPE tokenizer  ->  Processor
        -> build_train_dataset / build_meta_dataset (cached Arrow tables)  ->  BatchBuilder
    qwen2_vl.tiny() (or demo()) + prm.init  ->  train.step.make_losses / inner_optimizer

    inner_loss(phi, r, batch) = sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i,   w = softplus(r)/mean softplus(r)
    outer_loss(phi, batch)    = mean_chains (sigmoid(A) - label)^2,            A = mean_s z_s

``sample_batches(rng)`` draws ``T`` training batches of ``batch_size`` step records (images
included) and one meta batch of ``meta_chains`` chains x 5 step prefixes, all padded to one
sequence bucket and one patch bucket, so every draw has the same shapes and one compiled
hypergradient serves them all.

Precision: the model's dtype policy (``ProcessRewardModel(dtype=..., param_dtype=...)``).
``param_dtype`` is the dtype of the parameters, optimizer state, domain weights and float
batch entries; ``compute_dtype`` the model's compute dtype (``qwen2_vl.DTYPES``). With both
float64 (inside ``jax.enable_x64``) the model computes in float64 throughout, norm
statistics, rotary tables, attention scores, logits and reward head included, so finite
differences can check hypergradients to 1e-5 (tests/test_prm_hypergradient.py).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamprm_jax.bilevel.domain_weights import init_raw_weights
from tests.problems import Problem

_CACHE: dict[tuple, "PRMData"] = {}
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class PRMData:
    """Prepared data and model config of one (data_dir, model, K, ...) combination."""

    model_config: Any
    train_builder: Any
    meta_builder: Any
    num_train: int  # training step records
    num_chains: int  # meta chains
    domains: tuple[str, ...]
    seq_bucket: int
    train_patch_bucket: int
    meta_patch_bucket: int


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def prepare_data(*, data_dir: str, model: str = "tiny", num_domains: int = 4,
                 synthetic_seed: int = 0, chains_per_domain: int = 8, meta: int = 8, image_size: int = 32,
                 batch_size: int = 4, meta_chains: int = 2, compute_dtype: str = "float32") -> PRMData:
    """Generate (or reuse) the benchmark, tokenizer and cached tables; build the model config.

    Memoised per argument tuple in this process; on disk, ``synthetic.generate(reuse=True)``
    and the dataset cache make a second process skip the work.

    Args:
      data_dir: receives ``synthetic_<config>/`` (benchmark + its ``tokenizer/``) and ``cache/``.
      model: ``"tiny"`` (``qwen2_vl.tiny``: hidden 64, 2 layers, 4 px patches) or ``"demo"``
        (``qwen2_vl.demo``: hidden 128, 3 layers, the real 14 px patches).
      num_domains: K, the first K of ``synthetic.default_domains()`` (1..6).
      chains_per_domain: training chains per domain (5 step records each).
      meta: meta chains generated (balanced correct / wrong).
      image_size: side of the generated square images (pixels).
      batch_size, meta_chains: B and M; they fix the patch buckets.
      compute_dtype: the model's compute dtype (``qwen2_vl.DTYPES``).
    """
    key = (os.path.abspath(data_dir), model, num_domains, synthetic_seed, chains_per_domain, meta, image_size,
           batch_size, meta_chains, compute_dtype)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _prepare(*key)
        return _CACHE[key]


def _prepare(data_dir, model, num_domains, synthetic_seed, chains_per_domain, meta, image_size, batch_size,
             meta_chains, compute_dtype) -> PRMData:
    from dreamprm_jax import data as data_lib
    from dreamprm_jax.data import synthetic
    from dreamprm_jax.data.processor import Processor
    from dreamprm_jax.data.records import iter_texts
    from dreamprm_jax.data.tokenizer import build_offline_tokenizer
    from dreamprm_jax.models import qwen2_vl

    all_domains = synthetic.default_domains()
    if not 1 <= num_domains <= len(all_domains):
        raise ValueError(f"prm_problem: num_domains={num_domains}; the generated benchmark has 1..{len(all_domains)} "
                         f"domains ({', '.join(d.name for d in all_domains)})")
    if model not in ("tiny", "demo"):
        raise ValueError(f"prm_problem: model={model!r}; expected 'tiny' or 'demo'")
    if meta < meta_chains:
        raise ValueError(f"prm_problem: meta={meta} generated chains < meta_chains={meta_chains} per batch")

    # --- generated benchmark ------------------------------------------------------------
    # one directory per benchmark config, so the tokenizer learnt from its texts stays in step
    name = f"synthetic_k{num_domains}_s{synthetic_seed}_c{chains_per_domain}_m{meta}_i{image_size}"
    bench = os.path.join(data_dir, name)
    config = synthetic.select_domains(synthetic.default_config(), [d.name for d in all_domains[:num_domains]])
    config = dataclasses.replace(config, seed=synthetic_seed, train_per_domain=chains_per_domain, meta=meta, test=0,
                                 image_size=image_size)
    synthetic.generate(bench, config, reuse=True)
    train_json, meta_json = os.path.join(bench, "train.json"), os.path.join(bench, "meta.json")

    # --- tokenizer, model config, processor ---------------------------------------------
    tok_dir = os.path.join(bench, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        train = data_lib.load_train_records(train_json, check_images=False).records
        metas = data_lib.load_meta_records(meta_json, check_images=False).records
        build_offline_tokenizer(list(iter_texts(train)) + list(iter_texts(metas)), 512, tok_dir)
    ids = Processor.from_directory(tok_dir).special_token_ids
    special = dict(vocab_size=ids.vocab_size, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                   vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    if model == "tiny":
        model_config = qwen2_vl.tiny(**special, dtype=compute_dtype)
    else:
        model_config = qwen2_vl.demo(**special, dtype=compute_dtype)
    v = model_config.vision
    unit = v.patch_size * v.spatial_merge_size  # image sides are multiples of this after smart_resize
    side = max(unit, (image_size // 2) // unit * unit)  # half the generated side: few patches
    processor = Processor.from_directory(tok_dir, vision=v, max_image_side=image_size, min_pixels=unit * unit,
                                         max_pixels=side * side)

    # --- cached tables and builders: one bucket for every draw ---------------------------
    cache = os.path.join(data_dir, "cache")
    train_table = data_lib.build_train_dataset(train_json, processor, cache)
    meta_table = data_lib.build_meta_dataset(meta_json, processor, cache)
    max_len = max(int(train_table.info["max_length"]), int(meta_table.info["max_length"]))
    seq_bucket = _round_up(max_len, 16)
    max_patches = max(int(train_table.info["max_patches"]), int(meta_table.info["max_patches"]))
    max_steps = int(meta_table.info["max_steps"])
    merge = v.spatial_merge_size ** 2
    train_patches = _round_up(batch_size * max_patches, merge)
    meta_patches = _round_up(meta_chains * max_steps * max_patches, merge)
    pad = ids.pad
    prepare = data_lib.model_prepare_fn(model_config)
    train_builder = data_lib.BatchBuilder(
        train_table, data_lib.BatchSpec(batch_size, (seq_bucket,), (train_patches,), pad_id=pad), prepare)
    meta_builder = data_lib.BatchBuilder(
        meta_table, data_lib.BatchSpec(meta_chains, (seq_bucket,), (meta_patches,), pad_id=pad, max_steps=max_steps),
        prepare)
    return PRMData(model_config, train_builder, meta_builder, len(train_table.samples), meta_builder.num_chains,
                   train_table.domains, seq_bucket, train_patches, meta_patches)


def _cast_floats(tree, dtype):
    """Floating leaves -> ``dtype`` (jax arrays); integer leaves unchanged (jax arrays)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else jnp.asarray(x), tree)


def _numpy_rng(rng) -> np.random.Generator:
    """A numpy generator seeded from a jax PRNG key (raw uint32 or typed)."""
    seed = np.asarray(jax.random.randint(rng, (4,), 0, np.iinfo(np.int32).max))
    return np.random.default_rng([int(s) for s in seed])


def prm_problem(*, seed: int = 0, param_dtype=jnp.float32, num_domains: int = 4, inner_steps: int = 5,
                inner_lr: float = 1e-3, batch_size: int = 4, meta_chains: int = 2, model: str = "tiny",
                aggregation: str = "mean", weight_decay: float = 1e-2, data_dir: str,
                synthetic_seed: int = 0, chains_per_domain: int = 8, meta: int = 8, image_size: int = 32,
                compute_dtype: str = "float32", optimizer: optax.GradientTransformation | None = None) -> Problem:
    """A tiny Qwen2-VL PRM on generated multimodal data, with DreamPRM's two losses.

    Args:
      seed: parameter init seed (backbone and head).
      param_dtype: dtype of params, optimizer state, alpha and float batch entries (see the
        module docstring for float64).
      num_domains: K (the first K generated domains: trivial, clean_easy, clean_hard,
        label_noise, blank_image, flipped; ids follow their sorted names).
      inner_steps: T.
      inner_lr: AdamW learning rate (StepLR 5000 / 0.5 as in training).
      batch_size: B step records per inner step; meta_chains: M chains (x 5 step prefixes).
      model: ``"tiny"`` or ``"demo"`` preset.
      aggregation: ``"mean"`` (reference code) or ``"sum"`` (paper) of the step logits.
      data_dir: benchmark / tokenizer / cache directory (reused across calls and processes).
      chains_per_domain, meta, image_size, synthetic_seed: size of the generated benchmark.
      compute_dtype: the model's compute dtype (``qwen2_vl.DTYPES``; "float64" with
        ``param_dtype=jnp.float64`` inside ``jax.enable_x64``).
      optimizer: overrides the inner AdamW.

    Returns a :class:`tests.problems.Problem` whose ``sample_batches(rng)``
    returns ``(inner [T, B, ...], outer)`` train / meta batches (numpy -> jax, static shapes).
    """
    from flax import nnx

    from dreamprm_jax.models import ProcessRewardModel, prm, qwen2_vl
    from dreamprm_jax.train.step import inner_optimizer, make_losses

    prep = prepare_data(data_dir=data_dir, model=model, num_domains=num_domains, synthetic_seed=synthetic_seed,
                        chains_per_domain=chains_per_domain, meta=meta, image_size=image_size, batch_size=batch_size,
                        meta_chains=meta_chains, compute_dtype=compute_dtype)
    backbone_key, head_key = jax.random.split(jax.random.PRNGKey(seed))
    drawn = prm.init(prep.model_config, head_key, qwen2_vl.init_params(prep.model_config, backbone_key))
    model = ProcessRewardModel.from_params(prep.model_config, drawn, dtype=compute_dtype, param_dtype=param_dtype)
    _, state = nnx.split(model, nnx.Param)
    config, params = model.config, nnx.to_pure_dict(state)  # the engine's plain pytree
    optimizer = optimizer if optimizer is not None else inner_optimizer(inner_lr, 5000, 0.5, weight_decay)
    inner_loss, outer_loss = make_losses(config, aggregation)

    def sample_batches(rng):
        gen = _numpy_rng(rng)
        picks = [gen.choice(prep.num_train, size=batch_size, replace=False) for _ in range(inner_steps)]
        inner, _ = prep.train_builder.stacked_train(picks)  # [T, B, ...]
        outer, _ = prep.meta_builder.meta_batch(gen.choice(prep.num_chains, size=meta_chains, replace=False))
        return _cast_floats(inner, param_dtype), _cast_floats(outer, param_dtype)

    description = (f"Qwen2-VL PRM ({model}: hidden {config.text.hidden_size}, {config.text.num_hidden_layers} layers, "
                   f"vision depth {config.vision.depth}) on generated data, B={batch_size}, M={meta_chains}x5 steps, "
                   f"L={prep.seq_bucket}, patches {prep.train_patch_bucket}/{prep.meta_patch_bucket}")
    return Problem("prm", inner_loss, outer_loss, params, optimizer, optimizer.init(params),
                   init_raw_weights(num_domains, param_dtype), sample_batches, num_domains, inner_steps, description)
