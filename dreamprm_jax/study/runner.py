"""Run a reweighting study: per seed, generate (or read) the data, train every arm, score the
best-of-N test set with each, and compare the arms with paired statistics.

Layout of ``out_dir`` (every finished piece is reused when the study is run again, so an
interrupted study continues where it stopped)::

    seed_<s>/data/            the generated benchmark of seed s (absent with user files)
    seed_<s>/tokenizer/       the demo tokenizer, shared by the seed's arms
    seed_<s>/<arm>/           the arm's training run (checkpoints, metrics.jsonl, export/)
    seed_<s>/<arm>/test_scores.npz   step logits of every test candidate
    seed_<s>/<arm>/instance_weights.json   an instance-weighting arm's weight per training record
    seed_<s>/vanilla/record_losses.json    with an instance-weighting arm: each training record's loss
                                           under the vanilla PRM (the AUROC baseline)
    study.json, report.md, best_of_n.png, weights.png      (:mod:`dreamprm_jax.study.report`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dreamprm_jax.configs import TrainConfig
from dreamprm_jax.data.jsonfiles import read_number_map
from dreamprm_jax.study.analysis import (ArmOutcome, DomainSignal, arm_outcome, best_of_n_hits, hypergradient_signal,
                                         instance_weight_aurocs)
from dreamprm_jax.study.arms import BASELINE_ARM, Arm, get_arms
from dreamprm_jax.train.instance_weights_file import WEIGHTS_FILE, read_record_weights
from dreamprm_jax.train.record_losses import (LOSSES_FILE, export_record_losses, read_record_losses, small_loss_weights,
                                              write_record_losses)

__all__ = ["StudyConfig", "UserData", "ArmRun", "SeedResult", "run_study", "read_oracle_weights"]


@dataclasses.dataclass(frozen=True)
class UserData:
    """A study on the user's own files: DreamPRM training and meta records, a best-of-N
    candidates file, and optionally the weights an oracle arm trains with."""

    train_json: str
    meta_json: str
    candidates: str
    image_root: str | None = None
    candidates_image_root: str | None = None
    oracle_weights: Mapping[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What to run. ``train`` is every arm's base training configuration (each arm sets its
    own reweighting fields, the seed and the run directory); ``synthetic`` the generated
    benchmark (its seed is replaced per study seed) unless ``user_data`` is given."""

    out_dir: str = os.path.join("runs", "study")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ("vanilla", "dreamprm", "darts", "oracle_weights")
    train: TrainConfig = TrainConfig()
    synthetic: Any = None                 # SyntheticConfig; None: synthetic.default_config()
    user_data: UserData | None = None
    ns: tuple[int, ...] = (2, 4, 8)
    trials: int = 20
    resamples: int = 2000
    aggregation: str = "mean"
    score_batch_size: int = 32
    progress: bool = True


@dataclasses.dataclass
class ArmRun:
    """One arm trained and evaluated on one seed."""

    arm: str
    weights: dict[str, float]
    outcome: ArmOutcome
    train_seconds: float
    score_seconds: float
    run_dir: str
    hypergradient_signal: dict[str, DomainSignal] = dataclasses.field(default_factory=dict)
    # instance weighting: per domain, AUROC of the record weights for "label correct" (None: one class)
    instance_weight_auroc: dict[str, float | None] = dataclasses.field(default_factory=dict)
    # the same against only the labels too high / too low: {"too_high": {domain: AUROC}, "too_low": ...}
    instance_weight_auroc_by_direction: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)
    # the baseline arm when an arm learns instance weights: the same AUROCs for minus each record's
    # loss under this arm's PRM (no weight learned), {"any" | "too_high" | "too_low": {domain: AUROC}}
    loss_auroc: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SeedResult:
    seed: int
    num_questions: int
    arms: dict[str, ArmRun]
    baselines: dict[str, dict[int, np.ndarray]]    # name -> n -> [Q] hits
    planted_quality: dict[str, float] | None
    oracle_weights: dict[str, float] | None


def _say(config: StudyConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def read_oracle_weights(path: str) -> dict[str, float]:
    """``{domain: weight}`` from a JSON object file; every value a number >= 0."""
    return read_number_map(path, "{domain: weight}", non_empty=True, minimum=0.0)


# ----------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------

def _seed_data(config: StudyConfig, seed: int, seed_dir: str):
    """(TrainData, candidates file, candidates image root, planted quality, oracle weights)."""
    from dreamprm_jax.data import synthetic
    from dreamprm_jax.train.loop import TrainData

    user = config.user_data
    if user is not None:
        return (TrainData(user.train_json, user.meta_json, user.image_root), user.candidates,
                user.candidates_image_root, None, None if user.oracle_weights is None else dict(user.oracle_weights))
    data_dir = os.path.join(seed_dir, "data")
    base = config.synthetic if config.synthetic is not None else synthetic.default_config()
    manifest = synthetic.generate(data_dir, dataclasses.replace(base, seed=seed), progress=config.progress, reuse=True)
    data = TrainData(os.path.join(data_dir, "train.json"), os.path.join(data_dir, "meta.json"), data_dir)
    return (data, os.path.join(data_dir, "test_bon.json"), data_dir, synthetic.planted_qualities(manifest),
            synthetic.oracle_weights(manifest))


def _train_arm(config: StudyConfig, arm: Arm, seed: int, seed_dir: str, data, oracle_weights,
               record_weights=None) -> tuple[str, dict, float]:
    """(export dir, domain weights, seconds); a finished run is reused, an interrupted one resumed."""
    from dreamprm_jax.train import demo, loop

    run_dir = os.path.join(seed_dir, arm.name)
    export_dir = os.path.join(run_dir, "export")
    weights_path = os.path.join(run_dir, "domain_weights.json")
    if os.path.isdir(export_dir) and os.path.isfile(weights_path):
        with open(weights_path, encoding="utf-8") as f:
            return export_dir, json.load(f), 0.0
    # The run's saved config names its data, and its directory holds its tokenizer, so the run
    # stands alone (e.g. for dreamprm-compare-hypergradients --run-dir).
    cfg = dataclasses.replace(config.train, out_dir=run_dir, seed=seed + arm.seed_offset, progress=config.progress,
                              resume="auto", export=True, log_every=1, train_json=data.train_json, meta_json=data.meta_json,
                              image_root=data.image_root, **dict(arm.overrides))
    if cfg.model_dir is None:  # every arm of a seed reads the same demo tokenizer
        shared = demo.build_demo_tokenizer(data, os.path.join(seed_dir, "tokenizer"))
        if not os.path.isdir(os.path.join(run_dir, "tokenizer")):
            shutil.copytree(shared, os.path.join(run_dir, "tokenizer"))
    model = demo.resolve_model(cfg, data)
    _say(config, f"[study] seed {seed}: training {arm.name} ({arm.description}), {cfg.iterations} iterations")
    result = loop.train(cfg, data, model, fixed_domain_weights=oracle_weights if arm.oracle_weights else None,
                        fixed_record_weights=record_weights)
    if result.interrupted:
        raise KeyboardInterrupt(f"{arm.name} on seed {seed} was interrupted; its checkpoint is in {run_dir}")
    return export_dir, result.domain_weights, result.seconds


def _score_arm(config: StudyConfig, questions, export_dir: str, run_dir: str, desc: str):
    """(step logits [Q, N, S], step mask [Q, N, S], seconds); cached in ``test_scores.npz``."""
    from dreamprm_jax import evaluation
    from dreamprm_jax.evaluation import prm_scorer

    path = os.path.join(run_dir, "test_scores.npz")
    if os.path.isfile(path):
        cached = np.load(path)
        return cached["step_logits"], cached["step_mask"], 0.0
    t0 = time.perf_counter()
    scorer = prm_scorer.load_scorer(export_dir, batch_size=config.score_batch_size, progress=config.progress,
                                    desc=desc)
    scores = evaluation.score_steps(questions, scorer)
    tmp = path + ".tmp.npz"
    np.savez(tmp, step_logits=scores.step_logits, step_mask=scores.step_mask)
    os.replace(tmp, path)  # a score file is either whole or absent
    return scores.step_logits, scores.step_mask, time.perf_counter() - t0


def _step_error_types(candidates_path: str, questions, shape) -> np.ndarray | None:
    """[Q, N, S] error type of each erroneous step (the candidate's ``error_type`` where its
    step label is 0), or None when the file records no error types."""
    from dreamprm_jax.data.jsonfiles import read_json_records

    raw = {str(r.value.get("id")): r.value for r in read_json_records(candidates_path) if isinstance(r.value, dict)}
    out = np.full(shape, "", dtype=object)
    found = False
    for qi, q in enumerate(questions):
        record = raw.get(str(q.id))
        if record is None:
            continue
        for ci, c in enumerate(record.get("candidates", [])[: shape[1]]):
            kind = c.get("error_type") if isinstance(c, dict) else None
            labels = c.get("step_labels") if isinstance(c, dict) else None
            if kind and labels:
                found = True
                for si, label in enumerate(labels[: shape[2]]):
                    if label == 0:
                        out[qi, ci, si] = str(kind)
    return out if found else None


def run_seed(config: StudyConfig, seed: int, arms: Sequence[Arm]) -> SeedResult:
    from dreamprm_jax import evaluation
    from dreamprm_jax.evaluation.aggregation import aggregate
    from dreamprm_jax.evaluation.selection import MajorityVote, Oracle, Random

    seed_dir = os.path.join(config.out_dir, f"seed_{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    data, candidates, candidates_root, planted, oracle = _seed_data(config, seed, seed_dir)
    questions, _ = evaluation.load_candidates(candidates, image_root=candidates_root)
    inputs = evaluation.build_inputs(questions)
    step_labels = evaluation.step_label_array(questions)                       # [Q, N, S]
    error_types = _step_error_types(candidates, questions, step_labels.shape)
    _say(config, f"[study] seed {seed}: {inputs.num_questions} test questions x {inputs.max_candidates} candidates")

    runs: dict[str, ArmRun] = {}
    for arm in arms:
        if arm.oracle_weights and oracle is None:
            _say(config, f"[study] {arm.name}: skipped (no oracle weights; pass --oracle-weights FILE)")
            continue
        record_weights = None
        if arm.loss_weights:  # the vanilla PRM's losses, ranked (the baseline arm ran first)
            record_weights = small_loss_weights(_vanilla_record_losses(config, runs[BASELINE_ARM].run_dir, data))
        export_dir, weights, train_s = _train_arm(config, arm, seed, seed_dir, data, oracle, record_weights)
        run_dir = os.path.dirname(export_dir)
        logits, mask, score_s = _score_arm(config, questions, export_dir, run_dir, f"seed {seed} {arm.name}")
        chain_scores = aggregate(config.aggregation, logits, mask)             # [Q, N]
        outcome = arm_outcome(inputs, chain_scores, ns=config.ns, trials=config.trials, seed=seed,
                              step_logits=logits, step_labels=step_labels, step_error_types=error_types)
        signal = hypergradient_signal(os.path.join(run_dir, "metrics.jsonl"))  # {} without reweighting
        record_weights = os.path.join(run_dir, WEIGHTS_FILE)  # instance weighting only
        label_auroc, by_direction = {}, {}
        if os.path.isfile(record_weights):
            by_direction = instance_weight_aurocs(data.train_json, read_record_weights(record_weights))
            label_auroc = by_direction.pop("any")
        runs[arm.name] = ArmRun(arm.name, dict(weights), outcome, train_s, score_s, run_dir, signal, label_auroc,
                                by_direction)
        _say(config, f"[study] seed {seed}: {arm.name} best-of-{max(config.ns)} "
                     f"{outcome.accuracy(max(config.ns)):.3f}")
    if BASELINE_ARM in runs and any(arm.overrides.get("weighting", config.train.weighting) != "domain"
                                    for arm in arms):
        runs[BASELINE_ARM].loss_auroc = _loss_auroc(config, runs[BASELINE_ARM].run_dir, data)
    baselines = {name: best_of_n_hits(inputs, selector, config.ns, trials=config.trials, seed=seed)
                 for name, selector in (("self_consistency", MajorityVote()), ("random", Random()),
                                        ("oracle_answer", Oracle()))}
    return SeedResult(seed, inputs.num_questions, runs, baselines, planted, oracle)


def _loss_auroc(config: StudyConfig, run_dir: str, data) -> dict[str, dict[str, float | None]]:
    """Per direction and domain, the AUROC of minus each training record's squared error under
    the PRM exported to ``run_dir`` for "label correct"."""
    losses = _vanilla_record_losses(config, run_dir, data)
    return instance_weight_aurocs(data.train_json, {key: -loss for key, loss in losses.items()})


def _vanilla_record_losses(config: StudyConfig, run_dir: str, data) -> dict[str, float]:
    """Each training record's squared error under the PRM exported to ``run_dir``, cached in the
    run's ``record_losses.json``."""
    path = os.path.join(run_dir, LOSSES_FILE)
    if os.path.isfile(path):
        losses = read_record_losses(path)
    else:
        cfg = dataclasses.replace(config.train, out_dir=run_dir, progress=False, train_json=data.train_json,
                                  meta_json=data.meta_json, image_root=data.image_root)
        _say(config, f"[study] scoring every training record with {run_dir}/export (the loss baseline)")
        losses = export_record_losses(os.path.join(run_dir, "export"), cfg, data)
        write_record_losses(run_dir, losses)
    return losses


def run_study(config: StudyConfig) -> list[SeedResult]:
    """Every seed, every arm; returns the per-seed results (see :mod:`dreamprm_jax.study.report`)."""
    if not config.seeds:
        raise ValueError("run_study: expected at least one seed")
    arms = get_arms(config.arms)
    if arms[0].name != BASELINE_ARM:
        raise AssertionError("the baseline arm comes first")
    return [run_seed(config, seed, arms) for seed in config.seeds]
