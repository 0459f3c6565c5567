"""The DreamPRM training loop: one flat function in banner-marked sections.

    data (records -> validated -> cached tables)   model (checkpoint dir, or a small random Qwen2-VL)
                 \\                                  /
          per iteration: T stacked train batches + one meta batch (static buckets, host numpy)
                                    |
              jitted bi-level iteration (T inner AdamW steps + hypergradient + meta step)
                                    |
      metrics (JSONL / TensorBoard / progress bar), orbax checkpoints, export at the end

The state is a dict of pytrees; the jitted iteration donates it. Metrics of iteration k are
fetched from the device after iteration k + 1 has been dispatched, so the host never waits
for the device except at logging and checkpoint boundaries.

Devices (``--mesh``, :mod:`dreamprm_jax.train.sharding`): the state lives on a
``("data", "fsdp")`` mesh, built in its shards; the iteration is jitted with the sharding
rules (:class:`~dreamprm_jax.train.sharding.ShardedStep`). One device gives a 1x1 mesh, the
plain single-device program. Several processes (``--num-processes``, ``--coordinator-address``,
``--process-id``, :mod:`dreamprm_jax.train.distributed`) run this same function: every
process reads the same files and runs the same samplers, so every process builds the same
*global* batch, and each uploads only the rows its own devices hold (``put`` slices the
global batch; the image-patch rows stay global, as the sharding module requires). Process 0
alone writes metrics, plots, the export and ``domain_weights.json``; all processes take part
in checkpoints (each writes its shards) and in the final gather of the parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from dreamprm_jax import bilevel
from dreamprm_jax import data as data_lib
from dreamprm_jax.configs import TrainConfig
from dreamprm_jax.data import synthetic
from dreamprm_jax.data.processor import Processor
from dreamprm_jax.data.tokenizer import build_offline_tokenizer
from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train import distributed, sharding
from dreamprm_jax.train import step as step_lib
from dreamprm_jax.train.checkpointing import Checkpointer, abstract_like
from dreamprm_jax.train.interrupts import GracefulInterrupt
from dreamprm_jax.train.metrics import MetricsLogger, format_postfix
from dreamprm_jax.train.plots import plot_domain_weights, plot_losses

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt")


class TrainingDiverged(RuntimeError):
    """A loss or a domain weight became NaN/Inf; the last good checkpoint is left in place."""


@dataclasses.dataclass
class TrainResult:
    out_dir: str
    step: int
    domains: tuple[str, ...]
    weights: np.ndarray  # [K] normalised domain weights w
    planted_quality: dict[str, float] | None
    spearman: float | None
    interrupted: bool
    seconds: float
    compile_count: int
    final_metrics: dict[str, Any]


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(a):
        a = np.asarray(a, np.float64)
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for v in np.unique(a):  # average ties
            tie = a == v
            r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _say(cfg: TrainConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr, flush=True)


def start_processes(cfg: TrainConfig) -> None:
    """``jax.distributed.initialize`` when flags or environment ask for several processes
    (``--coordinator-address auto``: cluster auto-detection); a no-op for one process."""
    distributed.initialize(None if cfg.coordinator_address == "auto" else cfg.coordinator_address,
                           cfg.num_processes, cfg.process_id, auto=cfg.coordinator_address == "auto")


def stop_requested(interrupt: GracefulInterrupt, iteration: int, every: int) -> bool:
    """One process: whether SIGTERM/SIGINT arrived. Several processes: checked every ``every``
    iterations, true if any process got the signal, so all of them save the same iteration
    and stop together (a checkpoint is a collective: one process saving alone would hang)."""
    if jax.process_count() == 1:
        return interrupt.requested
    return iteration % every == 0 and distributed.any_process(interrupt.requested)


class _NoLogger:
    """Stands in for :class:`MetricsLogger` on processes other than process 0."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------

def resolve_data(cfg: TrainConfig) -> tuple[str, str, str | None, dict[str, float] | None]:
    """(train_json, meta_json, image_root, planted qualities or None); generates the demo data."""
    if cfg.train_json is not None:
        if cfg.meta_json is None:
            raise ValueError("--train-json was given without --meta-json; expected both DreamPRM files")
        return cfg.train_json, cfg.meta_json, cfg.image_root, None
    config = dataclasses.replace(synthetic.default_config(), seed=cfg.synthetic_seed)
    _say(cfg, f"[data] generated benchmark in {cfg.data_dir} (seed {cfg.synthetic_seed})")
    manifest = synthetic.generate(cfg.data_dir, config, progress=cfg.progress, reuse=True)
    return (os.path.join(cfg.data_dir, "train.json"), os.path.join(cfg.data_dir, "meta.json"), cfg.data_dir,
            synthetic.planted_qualities(manifest))


# ----------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, train_json: str, meta_json: str, image_root: str | None):
    """(model_config, prm params, processor, tokenizer_dir)."""
    processor_kw = dict(max_image_side=cfg.max_image_side, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    key = jax.random.key(cfg.seed)
    if cfg.model_dir is not None:
        model_config, backbone = qwen2_vl.load_checkpoint(cfg.model_dir, dtype=cfg.dtype, remat=cfg.remat)
        processor = Processor.from_directory(cfg.model_dir, vision=model_config.vision, **processor_kw)
        if os.path.isfile(os.path.join(cfg.model_dir, prm.HEAD_FILE)):
            _, params = prm.load(cfg.model_dir)
        else:
            params = prm.init(model_config, key, backbone)
        return model_config, params, processor, cfg.model_dir

    # A small random Qwen2-VL and a byte-level BPE learnt offline from the training texts;
    # the tokenizer is kept in the run directory so a resumed run reads the same one.
    tokenizer_dir = os.path.join(cfg.out_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        _say(cfg, f"[model] building an offline tokenizer in {tokenizer_dir}")
        train = data_lib.load_train_records(train_json, image_root=image_root, check_images=False,
                                            on_bad_record="skip").records
        meta = data_lib.load_meta_records(meta_json, image_root=image_root, check_images=False,
                                          on_bad_record="skip").records
        from dreamprm_jax.data.records import iter_texts
        build_offline_tokenizer(list(iter_texts(train)) + list(iter_texts(meta)), 1024, tokenizer_dir)
    processor = Processor.from_directory(tokenizer_dir, **processor_kw)
    ids = processor.special_token_ids
    if cfg.model_preset != "demo":
        raise ValueError(f"--model-preset {cfg.model_preset!r}: without --model-dir only 'demo' (a small random "
                         "Qwen2-VL) is built; for the 2B model pass --model-dir with a local checkpoint")
    model_config = qwen2_vl.demo(
        vocab_size=ids.vocab_size, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
        hidden_size=cfg.model_hidden_size, num_hidden_layers=cfg.model_layers, dtype=cfg.dtype, remat=cfg.remat)
    processor = Processor.from_directory(tokenizer_dir, vision=model_config.vision, **processor_kw)
    backbone_key, head_key = jax.random.split(key)
    params = prm.init(model_config, head_key, qwen2_vl.init_params(model_config, backbone_key))
    return model_config, params, processor, tokenizer_dir


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------

class BatchSources(NamedTuple):
    """Where every iteration's batches come from: ``cfg.unroll`` train draws stacked
    (``train_builder.stacked_train([train_sampler.next() ...])``) and one meta batch
    (``meta_builder.meta_batch(meta_sampler.next())``)."""

    train_table: Any
    meta_table: Any
    train_builder: data_lib.BatchBuilder
    meta_builder: data_lib.BatchBuilder
    train_sampler: data_lib.Sampler
    meta_sampler: data_lib.Sampler


def build_batch_sources(cfg: TrainConfig, model_config, processor, train_json: str, meta_json: str,
                        image_root: str | None) -> BatchSources:
    """Cached tables, static-bucket batch builders and seeded samplers of a run (samplers at
    their start; a resumed run loads their positions from the checkpoint)."""
    train_table = data_lib.build_train_dataset(train_json, processor, cfg.cache_dir, image_root=image_root,
                                               on_bad_record=cfg.on_bad_record)
    meta_table = data_lib.build_meta_dataset(meta_json, processor, cfg.cache_dir, image_root=image_root,
                                             on_bad_record=cfg.on_bad_record)
    pad = processor.special_token_ids.pad
    prepare = data_lib.model_prepare_fn(model_config)
    train_builder = data_lib.BatchBuilder(
        train_table, data_lib.BatchSpec(cfg.train_batch_size, cfg.seq_buckets, cfg.patch_buckets, pad_id=pad), prepare)
    meta_builder = data_lib.BatchBuilder(
        meta_table, data_lib.BatchSpec(cfg.meta_batch_size, cfg.seq_buckets, cfg.patch_buckets, pad_id=pad,
                                       max_steps=int(meta_table.info["max_steps"]), pack_chains=cfg.pack_meta),
        prepare)
    groups = np.asarray(train_table.samples["domain_id"]) if cfg.sampler in ("stratified", "balanced") else None
    train_sampler = data_lib.Sampler(len(train_table.samples), cfg.train_batch_size, seed=cfg.seed, mode=cfg.sampler,
                                     groups=groups)
    meta_sampler = data_lib.Sampler(meta_builder.num_chains, cfg.meta_batch_size, seed=cfg.seed + 1)
    return BatchSources(train_table, meta_table, train_builder, meta_builder, train_sampler, meta_sampler)


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def export(out_dir: str, model_config, params, processor, tokenizer_dir: str, domains, weights) -> str:
    """Hugging Face-compatible PRM directory (backbone + head + tokenizer + image settings) and the
    weights as JSON."""
    path = os.path.join(out_dir, "export")
    prm.save(path, model_config, jax.device_get(params))
    processor.save_preprocessor_config(path)
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(path, name))
    with open(os.path.join(out_dir, "domain_weights.json"), "w") as f:
        json.dump({d: float(w) for d, w in zip(domains, weights)}, f, indent=2)
    return path


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> TrainResult:
    t_start = time.perf_counter()
    start_processes(cfg)  # before anything touches a device
    primary = distributed.is_primary()
    cfg = dataclasses.replace(cfg, progress=cfg.progress and primary)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # --- data and model ------------------------------------------------------------------
    # Process 0 first: the generated data, tokenizer and cache are then reused by the others.
    with distributed.primary_first("dreamprm_jax.data"):
        train_json, meta_json, image_root, planted = resolve_data(cfg)
        model_config, params, processor, tokenizer_dir = build_model(cfg, train_json, meta_json, image_root)
        train_table, meta_table, train_builder, meta_builder, train_sampler, meta_sampler = build_batch_sources(
            cfg, model_config, processor, train_json, meta_json, image_root)
    for name, table in (("train", train_table), ("meta", meta_table)):
        if table.skipped:
            _say(cfg, f"[data] {name}: skipped bad records: " + ", ".join(f"{r}: {n}" for r, n in table.skipped.items()))
    domains = train_table.domains
    _say(cfg, f"[data] {len(train_table.samples)} training samples in {len(domains)} domains, "
              f"{meta_builder.num_chains} meta chains" + (" (cached)" if train_table.from_cache else ""))

    # --- mesh, optimizers and the bi-level iteration ---------------------------------------
    mesh = sharding.make_mesh(cfg.mesh)
    _say(cfg, f"[devices] mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
              f"{jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} device(s)")
    optimizer = sharding.constrain_optimizer(step_lib.inner_optimizer(
        cfg.inner_lr, cfg.inner_lr_step_size, cfg.inner_lr_gamma, cfg.inner_weight_decay, cfg.inner_grad_clip), mesh)
    meta_opt = step_lib.meta_optimizer(cfg.meta_lr, cfg.meta_weight_decay, cfg.meta_lr_warmup, cfg.meta_grad_clip)
    state = sharding.sharded_init(lambda p: step_lib.init_state(p, len(domains), optimizer, meta_opt), mesh,
                                  sharding.shard_tree(params, mesh))
    del params  # the state owns the parameters from here on (its buffers are donated)

    def make_step(reweighting: bool):
        return sharding.ShardedStep(step_lib.make_bilevel_step(
            model_config, optimizer, meta_opt, method=cfg.hypergradient, aggregation=cfg.aggregation,
            reweighting=reweighting, method_options=cfg.hypergradient_kwargs(),
            unroll_inner=cfg.unroll_inner_scan), mesh)

    bilevel_step = make_step(cfg.reweighting)
    # Warm-up iterations train the PRM only (no hypergradient: about 5x cheaper on CPU).
    warmup_step = make_step(False) if cfg.reweighting and cfg.meta_warmup > 0 else bilevel_step

    # --- checkpoint: resume -------------------------------------------------------------
    checkpointer = Checkpointer(os.path.join(cfg.out_dir, "checkpoints"), save_every=cfg.checkpoint_every,
                                keep=cfg.keep_checkpoints)
    start = 0
    if cfg.resume:
        restored = checkpointer.restore_latest(abstract_like(state))  # lands in the live state's shards
        if restored is None:
            _say(cfg, f"[resume] no checkpoint in {cfg.out_dir}/checkpoints; starting from scratch")
        else:
            start, state, extra = restored
            if tuple(extra["domains"]) != tuple(domains):
                raise ValueError(f"--resume: the checkpoint's domains {extra['domains']} differ from the data's "
                                 f"{list(domains)}; expected the same training files")
            train_sampler.load_state_dict(extra["train_sampler"])
            meta_sampler.load_state_dict(extra["meta_sampler"])
            _say(cfg, f"[resume] continuing from iteration {start}")

    def save(step: int, force: bool = False) -> None:
        extra = {"domains": list(domains), "train_sampler": train_sampler.state_dict(),
                 "meta_sampler": meta_sampler.state_dict(), "config": cfg.to_dict()}
        checkpointer.save(step, state, extra, force=force)

    logger = MetricsLogger(cfg.out_dir, resume_step=start) if primary else _NoLogger()

    # --- the loop -------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iterations, initial=start, disable=not cfg.progress, desc="bi-level", dynamic_ncols=True)
    pending: tuple[int, Any, dict] | None = None  # (iteration, device metrics, host stats)
    last: dict[str, Any] = {}
    interrupted = False
    t_loop = time.perf_counter()

    def finish(iteration: int, metrics, stats) -> None:
        """Fetch iteration ``iteration``'s metrics (device -> host), check them, log them."""
        nonlocal last
        host = jax.device_get(metrics)
        if not bool(host["finite"]):
            last_good = checkpointer.latest_step()
            raise TrainingDiverged(
                f"iteration {iteration}: non-finite value (inner loss {float(host['inner_loss'])}, meta loss "
                f"{float(host['meta_loss'])}, raw weights finite: {bool(np.all(np.isfinite(host['weights'])))}); "
                f"stopping. The last good checkpoint is step {last_good} in {cfg.out_dir}/checkpoints.")
        weights = {d: float(w) for d, w in zip(domains, host["weights"])}
        last = {"inner_loss": float(host["inner_loss"]), "inner_loss_last": float(host["inner_loss_last"]),
                "meta_loss": float(host["meta_loss"]), "hypergrad_norm": float(host["hypergrad_norm"]),
                "domain_weights": weights, **stats}
        if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
            elapsed = time.perf_counter() - t_loop
            logger.log(iteration, last, iterations_per_s=(iteration - start) / max(elapsed, 1e-9))
            bar.set_postfix(format_postfix({k: last[k] for k in ("inner_loss", "meta_loss")}), refresh=False)

    with GracefulInterrupt(verbose=cfg.progress) as interrupt:
        try:
            for iteration in range(start + 1, cfg.iterations + 1):
                inner_batches, train_stats = train_builder.stacked_train(
                    [train_sampler.next() for _ in range(cfg.unroll)])
                meta_batch, meta_stats = meta_builder.meta_batch(meta_sampler.next())
                run_step = warmup_step if iteration <= cfg.meta_warmup else bilevel_step
                state, metrics = run_step(state, inner_batches, meta_batch)  # global host batches in
                if pending is not None:
                    finish(*pending)
                stats = {"token_waste": float(train_stats.get("token_waste", 0.0)),
                         "meta_token_waste": float(meta_stats.get("token_waste", 0.0))}
                pending = (iteration, metrics, stats)
                bar.update(1)
                stop = stop_requested(interrupt, iteration, cfg.log_every)
                if checkpointer.should_save(iteration) or stop:
                    finish(*pending)  # never save a state whose metrics were not checked
                    pending = None
                    save(iteration, force=stop)
                if stop:
                    interrupted = True
                    _say(cfg, f"\n[interrupt] checkpoint written at iteration {iteration}; resume with --resume")
                    break
            if pending is not None:
                finish(*pending)
                pending = None
        finally:
            bar.close()
            logger.close()

    step = int(jax.device_get(state["step"]))
    if not interrupted:
        save(step, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()

    # --- report and export (process 0; every process joins the gathers) -------------------
    weights = np.asarray(jax.device_get(bilevel.domain_weights(sharding.to_host(state["raw_weights"], mesh))))
    rho = None
    if planted is not None:
        rho = spearman(weights, [planted[d] for d in domains])
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if primary and os.path.isfile(log_path) and os.path.getsize(log_path) > 0:
        plot_domain_weights(log_path, os.path.join(cfg.out_dir, "domain_weights.png"), planted_quality=planted)
        plot_losses(log_path, os.path.join(cfg.out_dir, "losses.png"))
    if cfg.export and not interrupted:
        host_params = sharding.to_host(state["params"], mesh)
        if primary:
            export(cfg.out_dir, model_config, host_params, processor, tokenizer_dir, domains, weights)
    compile_count = bilevel_step.compile_count() + (warmup_step.compile_count() if warmup_step is not bilevel_step else 0)
    return TrainResult(out_dir=cfg.out_dir, step=step, domains=domains, weights=weights, planted_quality=planted,
                       spearman=rho, interrupted=interrupted, seconds=time.perf_counter() - t_start,
                       compile_count=compile_count, final_metrics=last)


def format_result(result: TrainResult) -> str:
    """The closing table: domain, planted quality, learned weight (and Spearman)."""
    lines = [f"{'domain':<24} {'planted quality':>16} {'learned weight':>15}"]
    order = np.argsort(-result.weights)
    for i in order:
        d = result.domains[i]
        q = "" if result.planted_quality is None else f"{result.planted_quality.get(d, float('nan')):.3f}"
        lines.append(f"{d:<24} {q:>16} {result.weights[i]:>15.4f}")
    if result.spearman is not None:
        lines.append(f"Spearman(learned weight, planted quality) = {result.spearman:.3f}")
    lines.append(f"{result.step} iterations in {result.seconds:.1f} s ({result.compile_count} compiled programs)"
                 + (" [interrupted]" if result.interrupted else ""))
    return "\n".join(lines)
