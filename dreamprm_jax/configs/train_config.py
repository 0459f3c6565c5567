"""The training configuration: one frozen dataclass, presets as code, CLI overrides of any field.

Every field carries its help text in ``metadata["help"]``; :func:`add_arguments` turns the
dataclass into argparse flags (``--inner-lr 1e-3``), so ``--help`` documents every field and
the presets (``--preset qwen2_vl_2b``) only change defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any


def _field(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse
    return dataclasses.field(default=default, metadata={"help": help, **kw})


#: What the upper level learns (``TrainConfig.weighting``).
WEIGHTINGS = ("domain", "instance_table", "instance_net")
#: How the meta optimizer normalises each hypergradient (``TrainConfig.meta_second_moment``).
SECOND_MOMENTS = ("per_weight", "shared")
#: How a batch's instance weights are normalised (``TrainConfig.instance_normalize``; the same
#: names as ``dreamprm_jax.bilevel.INSTANCE_NORMALIZATIONS``, kept here so the configuration
#: imports no JAX).
INSTANCE_NORMALIZATIONS = ("none", "batch", "label")
#: How the meta loss makes a chain score from step log-odds (``TrainConfig.aggregation``; the
#: names of ``dreamprm_jax.bilevel.CHAIN_REDUCTIONS``).
AGGREGATIONS = ("mean", "sum", "min")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one DreamPRM training run needs; the defaults are the CPU demo."""

    # --- model ---------------------------------------------------------------------------
    model_dir: str | None = _field(
        None, "Local Hugging Face Qwen2-VL checkpoint directory (config.json + safetensors, tokenizer "
        "files). Omitted: a small random Qwen2-VL ('--model-preset') with a tokenizer built offline.")
    model_preset: str = _field("demo", "Model built when --model-dir is not given: demo (a small random Qwen2-VL).")
    model_hidden_size: int = _field(64, "Hidden size of the preset model (demo/tiny presets only).")
    model_layers: int = _field(2, "Decoder layers of the preset model (demo/tiny presets only).")
    dtype: str = _field("float32", "Compute dtype (float32 | bfloat16); parameters stay float32.")
    remat: str = _field("none", "Per-block rematerialisation policy (none | full | dots_saveable | nothing_saveable).")
    max_image_side: int = _field(512, "Images whose longest side is larger are resized (LANCZOS) first.")
    min_pixels: int = _field(56 * 56, "Qwen2-VL image processor min_pixels.")
    max_pixels: int = _field(448 * 448, "Qwen2-VL image processor max_pixels.")

    # --- data ----------------------------------------------------------------------------
    train_json: str | None = _field(
        None, "DreamPRM training records (JSON array or JSON Lines). Omitted: a generated benchmark with "
        "planted domain quality is written to --data-dir and used.")
    meta_json: str | None = _field(None, "DreamPRM meta records (true/false chains); required with --train-json.")
    image_root: str | None = _field(None, "Directory that image paths are resolved against (default: the JSON's directory).")
    data_dir: str = _field("runs/synthetic", "Where the generated benchmark is written when no --train-json is given.")
    synthetic_seed: int = _field(0, "Seed of the generated benchmark.")
    on_bad_record: str = _field(
        "error", "What to do with invalid records: error (stop after validating every file, with the counts by "
        "reason and the first examples) | skip (train on the good ones; the counts are printed and written to "
        "<out-dir>/data_report.json).")
    step_split: str = _field(
        "strict", "How meta chains split into step prefixes: strict (the reference's prefixes on DreamPRM's "
        "released files, with step numbers checked) | reference (the reference implementation's rule, quirks "
        "included; see dreamprm_jax.data.steps).")
    cache_dir: str = _field("runs/cache", "Preprocessing cache (tokens and image patches, keyed by content).")
    seq_buckets: tuple[int, ...] = _field((112, 256, 384, 512, 768, 1024, 1536, 2048, 4096),
                                          "Static sequence-length buckets (a batch takes the smallest that fits; every "
                                          "bucket that occurs is one more compile of the bi-level step).")
    patch_buckets: tuple[int, ...] = _field((64, 128, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192),
                                            "Static buckets of image patches per batch.")

    sampler: str = _field(
        "stratified", "Training sample order: shuffle (uniform over all records, the reference) | stratified (domains "
        "in proportion to their sizes in every batch) | balanced (equal shares per domain in every batch: a "
        "batch of k * domains holds k of each, so every domain's hypergradient sees the same number of samples).")

    # --- lower level (the PRM) -----------------------------------------------------------
    train_batch_size: int = _field(12, "Training samples per inner step.")
    unroll: int = _field(5, "Inner AdamW steps per meta step (T).")
    inner_lr: float = _field(2e-3, "Inner AdamW learning rate.")
    inner_lr_step_size: int = _field(5000, "StepLR: multiply the inner learning rate by --inner-lr-gamma every this many inner steps.")
    inner_lr_gamma: float = _field(0.5, "StepLR decay factor.")
    inner_weight_decay: float = _field(0.01, "Inner AdamW weight decay.")
    inner_grad_clip: float = _field(0.0, "Global-norm clip of inner gradients (0: off).")

    # --- upper level (the domain weights) -------------------------------------------------
    meta_batch_size: int = _field(32, "Meta chains per meta step.")
    pack_meta: bool = _field(True, "Score each meta chain's step prefixes in one packed row (one image encoding, "
                             "shared tokens run once, a tree attention mask; the same scores as one row per step).")
    meta_lr: float = _field(0.03, "Meta AdamW learning rate on the raw domain weights (the paper: 0.01 over 10,000 "
                            "iterations; the 240-iteration demo uses 0.03). For --weighting instance_net use about "
                            "0.003: its output moves every record's weight at once, and at 0.03 the weights swing "
                            "between 0 and 2.")
    meta_lr_warmup: int = _field(
        80, "Meta steps over which the meta learning rate ramps linearly from 0 to --meta-lr (0: constant from the "
        "first step, the reference). Adam's first steps are sign steps of single, noisy hypergradients taken at "
        "full size; on the demo they decided which side of 1 the middle domains ended on, and the ramp keeps them small.")
    meta_weight_decay: float = _field(1e-3, "Meta AdamW weight decay.")
    meta_second_moment: str = _field(
        "per_weight", "How the meta AdamW scales each hypergradient: per_weight (Adam's own second moment per entry) "
        "| shared (one second moment, the running mean of the squared non-zero entries, shared by all: an entry's "
        "step keeps its size relative to the others). With --weighting instance_table a batch touches few records, "
        "and per_weight makes each visit move a record's weight by about the same amount whatever the size of its "
        "hypergradient; shared keeps that size.", choices=SECOND_MOMENTS)
    meta_grad_clip: float = _field(
        0.0, "Clip each hypergradient to this multiple of the median norm of the last 32 (0: off, the reference; 2 "
        "is a good value). Exact hypergradients are heavy-tailed (single iterations up to 20x the median on the "
        "demo), and one spike moves Adam's step for about 10 iterations (its second moment, b2 = 0.999, barely "
        "registers it). On the demo it removed the spike-driven jumps but did not help the criteria (README).")
    aggregation: str = _field(
        "mean", "How the meta loss makes a chain score from its step log-odds: mean (reference code) | sum (paper) "
        "| min (the weakest step: a wrong chain's gradient reaches its most suspect step alone, not the correct "
        "steps before the error).", choices=AGGREGATIONS)
    meta_loss: str = _field(
        "chain_mse", "Upper-level loss on the chain scores A: chain_mse (DreamPRM: (sigmoid(A) - correct)^2 per "
        "chain, a calibration objective) | listwise (softmax cross-entropy over each meta question's candidates "
        "against its correct ones) | pairwise (softplus(A_wrong - A_correct) over the (correct, wrong) pairs of a "
        "question) | pairwise_normalized (pairwise on the scores divided by their within-question standard "
        "deviation: no credit for scaling the scores up). The ranking losses draw whole meta questions (chains "
        "grouped by the records' question_id, else by question text and image), --meta-batch-size // (most "
        "candidates of a question) per meta step.")
    hypergradient: str = _field(
        "exact", "Hypergradient method: exact | exact_forward | exact_lowmem | exact_reversible | truncated | darts | "
        "darts_exact | sama | neumann | cg.")
    hypergradient_options: str = _field(
        "{}", "JSON dict of method options, e.g. '{\"k\": 2}' (truncated) or '{\"second_order\": \"reverse\"}' "
        "(exact, exact_lowmem, exact_reversible, truncated: reverse-over-reverse instead of the default "
        "forward-over-reverse Hessian-vector products; same numbers, more memory) or '{\"in_place\": true}' "
        "(exact_reversible: the same numbers in 71.7 GiB on one device for the 2B model, against 89.1).")
    unroll_inner_scan: bool = _field(
        False, "Unroll the T-step inner scan of the exact method into straight-line code instead of a loop (same "
        "maths; the other methods keep the loop, which is their smaller program: 2B darts 50 GiB looped, 81 "
        "unrolled). Off for the CPU demo, where the loop is faster to run and to compile; on in the qwen2_vl_2b "
        "preset, where exact's loop stacks per-step residuals (315 GiB looped against 211 GiB unrolled on one "
        "device).")
    meta_warmup: int = _field(
        0, "Iterations of lower-level training only (weights held at 1) before the first meta step. 0 = meta steps "
        "from the start (the reference). The hypergradient separates domains mostly while the PRM is learning what "
        "they disagree on; once it predicts an error confidently, the sigmoid saturates and that signal fades.")
    reweighting: bool = _field(True, "Learn domain weights (off: the vanilla PRM baseline, uniform weights).")
    weighting: str = _field(
        "domain", "What the upper level learns: domain (one weight per domain, DreamPRM) | instance_table (one weight "
        "per training record, w_i = w_max * sigmoid(r_i), DreamPRM-1.5's Instance Table) | instance_net (a small "
        "network maps each record's loss at the start of the iteration and its domain to its weight, DreamPRM-1.5's "
        "Instance Net). Instance weights start at 1 and stay in (0, --instance-max-weight); the run directory gets "
        "instance_weights.json (record key -> weight).", choices=WEIGHTINGS)
    instance_max_weight: float = _field(2.0, "Upper bound w_max of an instance weight (> 1; weights start at 1).")
    instance_normalize: str = _field(
        "none", "How a batch's instance weights are normalised before the weighted MSE: none | batch (divided by "
        "the batch's mean weight) | label (divided by the mean weight of the batch's rows whose label is on the same "
        "side of 0.5, so reweighting cannot trade high labels against low ones and shift the PRM's scores as a "
        "whole; the weights then choose which records of a label group to trust).", choices=INSTANCE_NORMALIZATIONS)
    instance_net_hidden: int = _field(16, "Hidden units of the Instance Net (--weighting instance_net).")
    record_weights_file: str | None = _field(
        None, "JSON object, record key -> weight (e.g. another run's instance_weights.json, or weights computed from "
        "a record_losses.json): train under these per-record weights, held fixed (no meta step, whatever "
        "--reweighting says). Needs --weighting instance_table and a weight in (0, --instance-max-weight) for every "
        "training record.")

    # --- run -----------------------------------------------------------------------------
    iterations: int = _field(240, "Bi-level iterations (each: --unroll inner steps + one meta step).")
    seed: int = _field(0, "Seed of parameter init and data order.")
    out_dir: str = _field("runs/default", "Run directory: checkpoints, metrics.jsonl, TensorBoard, plots, export.")
    checkpoint_every: int = _field(100, "Save a checkpoint every this many iterations (and at the end).")
    keep_checkpoints: int = _field(2, "How many checkpoints to keep.")
    log_every: int = _field(10, "Log metrics (and fetch them from the device) every this many iterations.")
    resume: str = _field(
        "never", "Continue from the latest checkpoint in --out-dir: never | always (plain --resume; no checkpoint "
        "there is an error naming the directory) | auto (continue if there is one, else start at step 0). "
        "Library code may pass True / False for always / never.")
    export: bool = _field(True, "At the end, export the PRM as a Hugging Face directory and the weights as JSON.")
    progress: bool = _field(True, "Show a progress bar.")

    # --- devices -------------------------------------------------------------------------
    mesh: str | None = _field(
        None, "Device mesh 'data=D,fsdp=F' (axes of dreamprm_jax.train.sharding; one size may be omitted or -1 "
        "and is inferred). Parameters, gradients and optimizer moments are sharded over fsdp, batch rows over "
        "data x fsdp, domain weights replicated. Omitted: every device of every process on fsdp (one device: 1x1, "
        "the plain single-device run).")
    coordinator_address: str | None = _field(
        None, "Multi-process (multi-host) run: host:port of process 0's coordinator (env JAX_COORDINATOR_ADDRESS), "
        "or 'auto' to let jax.distributed detect the cluster (Cloud TPU pod slices, Slurm, Open MPI). "
        "Omitted with --num-processes unset: one process.")
    num_processes: int | None = _field(
        None, "Number of processes of a multi-process run (env JAX_NUM_PROCESSES; default 1). Every process runs "
        "the same command with its own --process-id.")
    process_id: int | None = _field(
        None, "This process's index 0..num_processes-1 (env JAX_PROCESS_ID). Process 0 writes the metrics, plots, "
        "export and domain_weights.json; all processes write their shards of the checkpoints.")

    def __post_init__(self):
        from dreamprm_jax.train.run_dir import resume_mode

        object.__setattr__(self, "resume", resume_mode(self.resume))  # frozen: normalise True/False once
        if self.step_split not in ("strict", "reference"):
            raise ValueError(f"step_split: expected 'strict' or 'reference', got {self.step_split!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.record_weights_file is not None and self.weighting != "instance_table":
            raise ValueError(f"record_weights_file holds a weight per record; expected weighting='instance_table', "
                             f"got {self.weighting!r}")
        if self.meta_second_moment not in SECOND_MOMENTS:
            raise ValueError(f"meta_second_moment: expected one of {SECOND_MOMENTS}, got {self.meta_second_moment!r}")
        if self.instance_normalize not in INSTANCE_NORMALIZATIONS:
            raise ValueError(f"instance_normalize: expected one of {INSTANCE_NORMALIZATIONS}, got "
                             f"{self.instance_normalize!r}")
        if self.instance_normalize != "none" and self.weighting == "domain":
            raise ValueError(f"instance_normalize={self.instance_normalize!r} needs instance weights (--weighting "
                             "instance_table or instance_net); domain weights are normalised over the domains")
        if not self.instance_max_weight > 1.0 or self.instance_net_hidden < 1:
            raise ValueError(f"instance_max_weight must be > 1 and instance_net_hidden >= 1, got "
                             f"{self.instance_max_weight!r}, {self.instance_net_hidden!r}")

    def hypergradient_kwargs(self) -> dict[str, Any]:
        try:
            options = json.loads(self.hypergradient_options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--hypergradient-options: expected a JSON object, got {self.hypergradient_options!r} ({e})") from e
        if not isinstance(options, dict):
            raise ValueError(f"--hypergradient-options: expected a JSON object, got {self.hypergradient_options!r}")
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        """The inverse of :meth:`to_dict` after a JSON round trip (lists back to tuples).

        A field missing from ``values`` keeps its default; an unknown one is an error naming
        ``where`` (e.g. the checkpoint the dict was read from)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown TrainConfig field(s) {unknown}; expected fields of TrainConfig")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _scalar_type(annotation: Any) -> Any:
    """The argparse type for a field annotation (``str | None`` -> str, ``tuple[int, ...]`` -> int)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"tuple": tuple})  # from __future__ annotations: resolve
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(inner)
    if origin is tuple:
        return typing.get_args(annotation)[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """One flag per field, defaults from ``defaults``; ``None`` means 'keep the preset's value'."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        annotation = hints[field.name]
        base = _scalar_type(annotation)
        default = getattr(defaults, field.name)
        help_text = f"{field.metadata['help']} (default: {default})"
        if field.name == "resume":
            from dreamprm_jax.train.run_dir import RESUME_MODES

            parser.add_argument(flag, nargs="?", const="always", default=None, choices=RESUME_MODES, metavar="MODE",
                                help=help_text)
        elif "choices" in field.metadata:
            parser.add_argument(flag, default=None, choices=field.metadata["choices"], help=help_text)
        elif base is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL", help=help_text)
            if field.name == "reweighting":
                parser.add_argument("--no-reweighting", dest="reweighting", action="store_const", const=False,
                                    help="Train the vanilla PRM baseline (uniform domain weights).")
        elif typing.get_origin(annotation) is tuple:
            parser.add_argument(flag, type=base, nargs="+", default=None, metavar="N", help=help_text)
        else:
            parser.add_argument(flag, type=base, default=None, help=help_text)


def parse_override(text: str) -> tuple[str, Any]:
    """``"FIELD=VALUE"`` -> ``(field, value)``, the value parsed by the field's type.

    ``FIELD`` is a :class:`TrainConfig` field name (``meta_lr`` or ``meta-lr``); a tuple field
    takes comma-separated values (``image_buckets=64,256``). Raises ``ValueError`` naming the
    field and what was expected.
    """
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    hints = typing.get_type_hints(TrainConfig)
    if not sep or name not in hints:
        raise ValueError(f"training option {text!r}: expected FIELD=VALUE with FIELD a training-config field, e.g. "
                         f"meta_lr=0.1 (fields: {', '.join(sorted(hints))})")
    annotation = hints[name]
    base = _scalar_type(annotation)
    if raw.strip().lower() == "none" and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return name, None
    convert = _parse_bool if base is bool else base
    try:
        if typing.get_origin(annotation) is tuple:
            return name, tuple(convert(v.strip()) for v in raw.split(",") if v.strip())
        return name, convert(raw.strip())
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"training option {text!r}: {name} expects a {getattr(base, '__name__', base)} value "
                         f"({e})") from None


def from_arguments(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    overrides = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            overrides[field.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(defaults, **overrides)
