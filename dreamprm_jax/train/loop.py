"""The DreamPRM training loop: a library function over a data source and a model source.

    TrainData (records files)             PRMModel (config, parameters, processor, tokenizer)
                 \\                                  /
          per iteration: T stacked train batches + one meta batch (static buckets, host numpy)
                                    |
              jitted bi-level iteration (T inner AdamW steps + hypergradient + meta step)
                                    |
      metrics (JSONL / TensorBoard / progress bar), orbax checkpoints, export at the end

:func:`train` takes what it trains on and returns a :class:`TrainResult`; where the data and
the model come from (a generated benchmark, a random demo model, a checkpoint directory) is
the caller's business (:mod:`dreamprm_jax.train.demo` for the command line's choices). It can
be called several times in one process, e.g. once per arm of a study, and with
``fixed_domain_weights`` (or ``fixed_record_weights``) it trains the PRM under domain (or
record) weights the caller chooses.

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
alone writes metrics, the export and ``domain_weights.json``; all processes take part
in checkpoints (each writes its shards) and in the final gather of the parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreamprm_jax import bilevel
from dreamprm_jax import data as data_lib
from dreamprm_jax.configs import TrainConfig
from dreamprm_jax.data.accounting import file_report, format_skips, write_data_report
from dreamprm_jax.data.processor import Processor
from dreamprm_jax.data.records import BadRecords
from dreamprm_jax.models import prm, qwen2_vl
from dreamprm_jax.train import distributed, sharding
from dreamprm_jax.train import step as step_lib
from dreamprm_jax.train.checkpointing import Checkpointer, abstract_like
from dreamprm_jax.train.instance_weights_file import RecordWeights
from dreamprm_jax.train.interrupts import GracefulInterrupt
from dreamprm_jax.train.metrics import MetricsLogger, format_postfix
from dreamprm_jax.train.record_losses import record_losses
from dreamprm_jax.train.run_dir import RunDirError, check_out_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt")


class TrainingDiverged(RuntimeError):
    """A loss or a domain weight became NaN/Inf; the last good checkpoint is left in place."""


@dataclasses.dataclass(frozen=True)
class TrainData:
    """What the PRM trains on: DreamPRM training records and meta records (JSON array or JSON
    Lines), and the directory their image paths are resolved against (default: each file's own
    directory). They are validated, preprocessed and cached (``cfg.cache_dir``) by :func:`train`."""

    train_json: str
    meta_json: str
    image_root: str | None = None


@dataclasses.dataclass
class PRMModel:
    """A PRM to train: the backbone config, the PRM parameters ``{"backbone", "head"}``, the
    processor it reads with, and the directory whose tokenizer files go into the export."""

    config: qwen2_vl.Qwen2VLConfig
    params: Any
    processor: Processor
    tokenizer_dir: str


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns. Paths are ``None`` when the file was not written (an
    interrupted run exports nothing; processes other than 0 write no metrics or export)."""

    out_dir: str
    step: int
    domains: tuple[str, ...]
    weights: np.ndarray  # [K] normalised domain weights w (instance weighting: each domain's mean), ``domains`` order
    interrupted: bool
    seconds: float
    compile_count: int
    final_metrics: dict[str, Any]  # the last iteration's losses, hypergradient norm and weights
    metrics_path: str | None
    checkpoint_dir: str
    export_dir: str | None
    weights_path: str | None  # domain_weights.json
    record_weights: RecordWeights | None = None  # instance weighting: every training record's weight
    record_weights_path: str | None = None  # instance_weights.json

    @property
    def domain_weights(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self.weights)}


def _say(cfg: TrainConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr, flush=True)


def _note(message: str) -> None:
    """What a user must see whatever ``--progress`` says (skipped records, a resume): process 0, stderr."""
    if distributed.is_primary():
        print(message, file=sys.stderr, flush=True)


def start_processes(cfg: TrainConfig) -> None:
    """``jax.distributed.initialize`` when flags or environment ask for several processes
    (``--coordinator-address auto``: cluster auto-detection); a no-op for one process, and
    for every call after the first."""
    distributed.initialize(None if cfg.coordinator_address == "auto" else cfg.coordinator_address,
                           cfg.num_processes, cfg.process_id, auto=cfg.coordinator_address == "auto")


def stop_requested(interrupt: GracefulInterrupt, iteration: int, every: int) -> bool:
    """One process: whether SIGTERM/SIGINT arrived. Several processes: checked every ``every``
    iterations, true if any process got the signal, so all of them save the same iteration
    and stop together (a checkpoint is a collective: one process saving alone would hang)."""
    if jax.process_count() == 1:
        return interrupt.requested
    return iteration % every == 0 and distributed.any_process(interrupt.requested)


def _latest_step(checkpoint_dir: str) -> int | None:
    """The latest committed checkpoint step in ``checkpoint_dir`` (``None``: none, or no directory)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    with Checkpointer(checkpoint_dir) as checkpointer:
        return checkpointer.latest_step()


def check_run_dir(cfg: TrainConfig, *, create_parents: bool = True) -> None:
    """Before any work: ``cfg.out_dir`` is a writable directory (created if missing;
    :func:`~dreamprm_jax.train.run_dir.check_out_dir`), and ``resume="always"`` finds a
    checkpoint there. Raises :class:`~dreamprm_jax.train.run_dir.RunDirError` (one line)."""
    check_out_dir(cfg.out_dir, create_parents=create_parents)
    checkpoint_dir = os.path.join(cfg.out_dir, "checkpoints")
    if cfg.resume == "always" and _latest_step(checkpoint_dir) is None:
        raise RunDirError(f"--resume: no checkpoint in {checkpoint_dir}; expected the run directory of an earlier "
                          "run (check --out-dir), or --resume auto to start from step 0 when there is none")


class _NoLogger:
    """Stands in for :class:`MetricsLogger` on processes other than process 0."""

    def log(self, *args, **kwargs) -> None:
        pass

    def histogram(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------
# Model source
# ----------------------------------------------------------------------------------------

def processor_options(cfg: TrainConfig) -> dict[str, int]:
    """The image settings of ``cfg`` as :class:`Processor` keyword arguments."""
    return dict(max_image_side=cfg.max_image_side, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


def load_model(model_dir: str, cfg: TrainConfig) -> PRMModel:
    """The PRM of a local Hugging Face Qwen2-VL checkpoint directory: its backbone, its reward
    head when the directory has one (``prm.HEAD_FILE``, a training export), else a new head
    drawn from ``cfg.seed``; its tokenizer and ``cfg``'s image settings."""
    model_config, backbone = qwen2_vl.load_checkpoint(model_dir, dtype=cfg.dtype, remat=cfg.remat)
    processor = Processor.from_directory(model_dir, vision=model_config.vision, **processor_options(cfg))
    if os.path.isfile(os.path.join(model_dir, prm.HEAD_FILE)):
        _, params = prm.load(model_dir)
    else:
        params = prm.init(model_config, jax.random.key(cfg.seed), backbone)
    return PRMModel(model_config, params, processor, model_dir)


# ----------------------------------------------------------------------------------------
# Domain weights
# ----------------------------------------------------------------------------------------

def raw_weights_for(weights: Mapping[str, float], domains: tuple[str, ...]) -> np.ndarray:
    """Raw weights r [K] with ``softplus(r) / mean(softplus(r))`` equal to ``weights`` normalised
    to mean 1 (in ``domains`` order): r = softplus^-1(w / mean(w)), so mean(softplus(r)) = 1."""
    if set(weights) != set(domains):
        raise ValueError(f"fixed_domain_weights: expected one weight for each of the data's domains {list(domains)}, "
                         f"got {sorted(weights)}")
    w = np.array([float(weights[d]) for d in domains], np.float64)
    if not np.all(np.isfinite(w) & (w > 0)):
        raise ValueError(f"fixed_domain_weights: expected finite weights > 0, got {dict(zip(domains, w.tolist()))}")
    w = w / w.mean()
    return (w + np.log(-np.expm1(-w))).astype(np.float32)  # softplus^-1(w) = log(e^w - 1), stable form


def raw_record_weights_for(weights: Mapping[str, float], keys: Sequence[str], max_weight: float,
                           source: str = "fixed_record_weights") -> np.ndarray:
    """Raw table ``r [N]`` (in the order of ``keys``) whose bounded weights ``max_weight * sigmoid(r)``
    equal ``weights`` (record key -> weight, each in ``(0, max_weight)``): ``r = logit(w / max_weight)``.
    ``source`` names the weights in errors (e.g. the file they came from)."""
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ValueError(f"{source}: no weight for {len(missing)} of the {len(keys)} training records "
                         f"(first: {missing[:3]}); expected one weight per record key (data.records.record_keys)")
    w = np.array([float(weights[k]) for k in keys], np.float64)  # [N]
    bad = ~(np.isfinite(w) & (w > 0) & (w < max_weight))
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: record {keys[first]!r} has weight {w[first]}; expected finite "
                         f"weights in (0, {max_weight}) (--instance-max-weight), {int(bad.sum())} records outside")
    u = w / max_weight
    return (np.log(u) - np.log1p(-u)).astype(np.float32)


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
    meta_sampler: data_lib.Sampler | data_lib.QuestionSampler


def build_batch_sources(cfg: TrainConfig, model_config, processor, data: TrainData) -> BatchSources:
    """Cached tables, static-bucket batch builders and seeded samplers of a run (samplers at
    their start; a resumed run loads their positions from the checkpoint)."""
    try:
        train_table = data_lib.build_train_dataset(data.train_json, processor, cfg.cache_dir,
                                                   image_root=data.image_root, on_bad_record=cfg.on_bad_record)
    except BadRecords as train_error:
        # Validate the meta file too, so that one error run reports the bad records of both.
        try:
            data_lib.load_meta_records(data.meta_json, image_root=data.image_root, on_bad_record="error",
                                       step_mode=cfg.step_split, image_check=getattr(processor, "check_image", None))
        except BadRecords as meta_error:
            raise ValueError(f"{train_error}\n{meta_error}") from None
        raise
    meta_table = data_lib.build_meta_dataset(data.meta_json, processor, cfg.cache_dir, image_root=data.image_root,
                                             on_bad_record=cfg.on_bad_record, step_mode=cfg.step_split)
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
    if cfg.meta_loss == "chain_mse":
        meta_sampler = data_lib.Sampler(meta_builder.num_chains, cfg.meta_batch_size, seed=cfg.seed + 1)
    else:  # ranking losses compare a question's candidates: draw whole questions
        meta_sampler = data_lib.QuestionSampler(meta_table.chain_questions(), cfg.meta_batch_size, seed=cfg.seed + 1)
    return BatchSources(train_table, meta_table, train_builder, meta_builder, train_sampler, meta_sampler)


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def export(out_dir: str, model_config, params, processor, tokenizer_dir: str, domains, weights) -> tuple[str, str]:
    """Hugging Face-compatible PRM directory (backbone + head + tokenizer + image settings) and the
    weights as JSON; returns both paths.

    Both appear whole or not at all: the directory is written under a temporary name and
    renamed into place (an older export is removed only after that), the JSON is written to
    a temporary file and renamed, so a process killed while exporting leaves the previous
    export (or none) and ``--resume`` writes it again from the final checkpoint."""
    path = os.path.join(out_dir, "export")
    work = os.path.join(out_dir, f".export-tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    prm.save(work, model_config, jax.device_get(params))
    processor.save_preprocessor_config(work)
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(work, name))
    old = None
    if os.path.exists(path):
        old = os.path.join(out_dir, f".export-old-{os.getpid()}")
        os.replace(path, old)
    os.replace(work, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    weights_path = os.path.join(out_dir, "domain_weights.json")
    with open(weights_path + ".tmp", "w") as f:
        json.dump({d: float(w) for d, w in zip(domains, weights)}, f, indent=2)
    os.replace(weights_path + ".tmp", weights_path)
    return path, weights_path


# ----------------------------------------------------------------------------------------
# Instance weights
# ----------------------------------------------------------------------------------------

def final_record_weights(cfg: TrainConfig, model_config, raw, params, train_table, train_builder,
                         mesh) -> RecordWeights:
    """Every training record's weight under the final upper-level variable ``raw``.

    The table's weights are read off; the Instance Net needs each record's loss under the
    final ``params``, so every record is scored once (batches of ``cfg.train_batch_size``)."""
    domain_ids = np.asarray(train_table.samples["domain_id"], np.int64)  # [N]
    host_raw = sharding.to_host(raw, mesh)
    if cfg.weighting == "instance_table":
        weights = np.asarray(bilevel.instance_weights(jnp.asarray(host_raw), cfg.instance_max_weight))
    else:
        losses = record_losses(model_config, params, train_table, train_builder, cfg.train_batch_size, mesh)  # [N]
        weights = np.asarray(bilevel.instance_net_weights(jax.tree.map(jnp.asarray, host_raw), jnp.asarray(losses),
                                                          jnp.asarray(domain_ids), cfg.instance_max_weight))
    return RecordWeights(tuple(train_table.record_keys()), domain_ids, weights.astype(np.float64),
                         tuple(train_table.domains))


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def train(cfg: TrainConfig, data: TrainData, model: PRMModel | str, *,
          fixed_domain_weights: Mapping[str, float] | None = None,
          fixed_record_weights: Mapping[str, float] | None = None) -> TrainResult:
    """Train ``model`` on ``data`` with ``cfg``'s optimisation, run and device settings.

    Args:
      cfg: the run's settings. Its data and model fields (``train_json``, ``model_dir``,
        ``model_preset``, ``data_dir``, ...) are not read here: they choose ``data`` and
        ``model`` on the command line (:mod:`dreamprm_jax.train.demo`).
      data: the training and meta records.
      model: a built PRM, or a local checkpoint directory (:func:`load_model`). The state
        takes over ``model.params`` and donates its buffers: build a model per call.
      fixed_domain_weights: ``{domain: weight}`` for every domain of ``data``: the PRM trains
        under these weights (normalised to mean 1), held fixed (reweighting off). ``None``:
        ``cfg.reweighting`` decides. Only with ``cfg.weighting == "domain"``.
      fixed_record_weights: ``{record key: weight}`` for every training record (keys as in
        ``instance_weights.json``), each in ``(0, cfg.instance_max_weight)``: the PRM trains under
        these per-record weights, held fixed (reweighting off). Only with
        ``cfg.weighting == "instance_table"``. ``None``: read from ``cfg.record_weights_file``
        when that is set.

    ``cfg.weighting`` chooses the upper-level variable (:mod:`dreamprm_jax.train.step`). With
    instance weights the table (``[N]``, 4 bytes a record) or the net is replicated on every
    device like the domain weights: 100,000 records are 400 KB, nothing next to the model,
    and a replicated table is gathered per row without communication. The export then also
    writes ``instance_weights.json`` (record key -> weight, :mod:`~dreamprm_jax.train.instance_weights_file`)
    and the result carries them (``record_weights``).

    Faults:
      - the run directory is checked first (:func:`check_run_dir`): not writable, a file, or
        ``cfg.resume == "always"`` with no checkpoint raise a one-line
        :class:`~dreamprm_jax.train.run_dir.RunDirError`;
      - bad records: ``cfg.on_bad_record == "error"`` raises after validating the files, with
        the counts by reason and the first few; ``"skip"`` prints the counts (always); once
        the data is loaded, what was read, kept and skipped per file and reason is written
        to ``<out_dir>/data_report.json``;
      - SIGTERM / SIGINT at any moment of the loop, the final checkpoint and the export
        included: the current step is checkpointed (a checkpoint being written is finished)
        and the function returns with ``interrupted=True``; a resumed run continues from
        that step (and writes the export when only the export was missing).

    Returns the final step, the learned (or fixed) domain weights, the last iteration's
    metrics and the paths written. Raises :class:`TrainingDiverged` on a NaN/Inf loss or weight.
    """
    t_start = time.perf_counter()
    if fixed_domain_weights is not None and cfg.weighting != "domain":
        raise ValueError(f"train: fixed_domain_weights holds domain weights; expected weighting='domain', got "
                         f"{cfg.weighting!r}")
    weights_source = "fixed_record_weights"
    if fixed_record_weights is None and cfg.record_weights_file is not None:
        from dreamprm_jax.train.instance_weights_file import read_record_weights

        fixed_record_weights, weights_source = read_record_weights(cfg.record_weights_file), cfg.record_weights_file
    if fixed_record_weights is not None and cfg.weighting != "instance_table":
        raise ValueError(f"train: fixed_record_weights holds a weight per record; expected "
                         f"weighting='instance_table', got {cfg.weighting!r}")
    fixed = fixed_domain_weights is not None or fixed_record_weights is not None
    start_processes(cfg)  # before anything touches a device
    primary = distributed.is_primary()
    cfg = dataclasses.replace(cfg, progress=cfg.progress and primary,
                              reweighting=cfg.reweighting and not fixed)
    check_run_dir(cfg)  # before anything is loaded or compiled
    checkpointer_dir = os.path.join(cfg.out_dir, "checkpoints")
    if isinstance(model, str):
        model = load_model(model, cfg)
    model_config, processor = model.config, model.processor

    # --- data -----------------------------------------------------------------------------
    # Process 0 first: the preprocessing cache is then reused by the others.
    with distributed.primary_first("dreamprm_jax.data"):
        sources = build_batch_sources(cfg, model_config, processor, data)
    train_table, meta_table, train_builder, meta_builder, train_sampler, meta_sampler = sources
    reports = [file_report("train", train_table), file_report("meta", meta_table)]
    for line in format_skips(reports):
        _note(line)
    if primary:
        report_path = write_data_report(cfg.out_dir, reports, cfg.on_bad_record)
        if any(r.skipped for r in reports):
            _note(f"[data] skipped records by file and reason, first examples: {report_path}")
    domains = train_table.domains
    fixed_raw = None if fixed_domain_weights is None else raw_weights_for(fixed_domain_weights, domains)  # [K]
    _say(cfg, f"[data] {len(train_table.samples)} training samples in {len(domains)} domains, "
              f"{meta_builder.num_chains} meta chains" + (" (cached)" if train_table.from_cache else ""))

    # --- mesh, optimizers and the bi-level iteration ---------------------------------------
    mesh = sharding.make_mesh(cfg.mesh)
    _say(cfg, f"[devices] mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
              f"{jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} device(s)")
    optimizer = sharding.constrain_optimizer(step_lib.inner_optimizer(
        cfg.inner_lr, cfg.inner_lr_step_size, cfg.inner_lr_gamma, cfg.inner_weight_decay, cfg.inner_grad_clip), mesh)
    meta_opt = step_lib.meta_optimizer(cfg.meta_lr, cfg.meta_weight_decay, cfg.meta_lr_warmup, cfg.meta_grad_clip,
                                       cfg.meta_second_moment)

    num_records = len(train_table.samples)
    record_domains = np.asarray(train_table.samples["domain_id"], np.int32)  # [N]
    fixed_table = None if fixed_record_weights is None else raw_record_weights_for(
        fixed_record_weights, tuple(train_table.record_keys()), cfg.instance_max_weight, weights_source)  # [N]

    def init_state(params):
        upper = None
        if cfg.weighting != "domain":
            upper = step_lib.init_upper(cfg.weighting, num_domains=len(domains), num_records=num_records,
                                        max_weight=cfg.instance_max_weight, hidden=cfg.instance_net_hidden,
                                        seed=cfg.seed)
        state = step_lib.init_state(params, len(domains), optimizer, meta_opt, raw_weights=upper)
        if fixed_raw is not None:  # a [K] constant; the meta optimizer's state does not depend on r
            state["raw_weights"] = jnp.asarray(fixed_raw)
        if fixed_table is not None:  # [N], likewise
            state["raw_weights"] = jnp.asarray(fixed_table)
        return state

    state = sharding.sharded_init(init_state, mesh, sharding.shard_tree(model.params, mesh))

    def make_step(reweighting: bool):
        return sharding.ShardedStep(step_lib.make_bilevel_step(
            model_config, optimizer, meta_opt, method=cfg.hypergradient, aggregation=cfg.aggregation,
            reweighting=reweighting, method_options=cfg.hypergradient_kwargs(),
            unroll_inner=cfg.unroll_inner_scan, meta_loss=cfg.meta_loss, weighting=cfg.weighting,
            max_weight=cfg.instance_max_weight, num_domains=len(domains), instance_normalize=cfg.instance_normalize,
            record_domains=record_domains if cfg.weighting == "instance_table" else None), mesh)

    bilevel_step = make_step(cfg.reweighting)
    # Warm-up iterations train the PRM only (no hypergradient: about 5x cheaper on CPU).
    warmup_step = make_step(False) if cfg.reweighting and cfg.meta_warmup > 0 else bilevel_step
    # --- checkpoint: resume -------------------------------------------------------------
    checkpointer = Checkpointer(checkpointer_dir, save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    start = 0
    if cfg.resume != "never":
        latest = checkpointer.latest_step()
        if latest is not None:  # a checkpoint of another upper level would fail to restore with a shape error
            saved = checkpointer.restore_extra(latest).get("config", {}).get("weighting", "domain")
            if saved != cfg.weighting:
                raise ValueError(f"--resume: the checkpoint of step {latest} in {checkpointer_dir} was trained with "
                                 f"--weighting {saved}; expected the same weighting, got {cfg.weighting}")
        restored = checkpointer.restore_latest(abstract_like(state))  # lands in the live state's shards
        if restored is None:  # "auto" (checked above for "always")
            _note(f"[resume] no checkpoint in {checkpointer_dir}; starting from step 0")
        else:
            start, state, extra = restored
            if tuple(extra["domains"]) != tuple(domains):
                raise ValueError(f"--resume: the checkpoint's domains {extra['domains']} differ from the data's "
                                 f"{list(domains)}; expected the same training files")
            train_sampler.load_state_dict(extra["train_sampler"])
            meta_sampler.load_state_dict(extra["meta_sampler"])
            _note(f"[resume] resuming from step {start}")
    if start == 0 and cfg.reweighting and cfg.hypergradient == "exact_reversible" and cfg.meta_warmup == 0:
        # Reversing AdamW from m = v = 0 turns the gradients below eps into noise in float32 (docs/reversible.md).
        _note("[note] --hypergradient exact_reversible with --meta-warmup 0: the first iteration reverses AdamW from "
              "m = v = 0, where a float32 hypergradient can be wrong by orders of magnitude; --meta-warmup 1 starts "
              "every hypergradient from a warm optimizer state")

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
        # the iterations that computed one (the Instance Net logs none per domain)
        if cfg.reweighting and iteration > cfg.meta_warmup and "hypergradient" in host:
            last["hypergradient"] = {d: float(g) for d, g in zip(domains, host["hypergradient"])}
        if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
            elapsed = time.perf_counter() - t_loop
            logger.log(iteration, last, iterations_per_s=(iteration - start) / max(elapsed, 1e-9))
            if "instance_weights" in host:  # the table's [N] weights, or the net's [T, B] rows (NaN: padding)
                values = np.asarray(host["instance_weights"]).reshape(-1)
                logger.histogram("instance_weights", values[np.isfinite(values)], iteration)
            bar.set_postfix(format_postfix({k: last[k] for k in ("inner_loss", "meta_loss")}), refresh=False)

    # The guard covers the final checkpoint and the export too: a signal there lets them finish.
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
        if not interrupted and (interrupt.requested if jax.process_count() == 1
                                else distributed.any_process(interrupt.requested)):
            # A signal during the final checkpoint: it is written; stop before the (long) export.
            interrupted = True
            _note(f"[interrupt] final checkpoint written at step {step}; --resume writes the export")

        # --- export (process 0; every process joins the gathers) ---------------------------
        record_weights = record_weights_path = None
        if cfg.weighting == "domain":
            weights = np.asarray(jax.device_get(bilevel.domain_weights(sharding.to_host(state["raw_weights"], mesh))))
        elif cfg.weighting == "instance_table" or not interrupted:  # the net scores every record: not when stopping
            record_weights = final_record_weights(cfg, model_config, state["raw_weights"], state["params"],
                                                  train_table, train_builder, mesh)
            weights = record_weights.domain_means()
        else:
            weights = np.asarray([last.get("domain_weights", {}).get(d, np.nan) for d in domains])
        log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        metrics_path = log_path if primary and os.path.isfile(log_path) and os.path.getsize(log_path) > 0 else None
        export_dir = weights_path = None
        if cfg.export and not interrupted:
            host_params = sharding.to_host(state["params"], mesh)
            if primary:
                export_dir, weights_path = export(cfg.out_dir, model_config, host_params, processor,
                                                  model.tokenizer_dir, domains, weights)
                if record_weights is not None:
                    record_weights_path = record_weights.write(cfg.out_dir)
    compile_count = bilevel_step.compile_count() + (warmup_step.compile_count() if warmup_step is not bilevel_step else 0)
    return TrainResult(out_dir=cfg.out_dir, step=step, domains=domains, weights=weights, interrupted=interrupted,
                       seconds=time.perf_counter() - t_start, compile_count=compile_count, final_metrics=last,
                       metrics_path=metrics_path, checkpoint_dir=checkpointer_dir, export_dir=export_dir,
                       weights_path=weights_path, record_weights=record_weights,
                       record_weights_path=record_weights_path)
