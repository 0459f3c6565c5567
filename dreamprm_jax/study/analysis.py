"""What a reweighting study measures on one test set, and how arms are compared.

Every arm picks from the same candidates with the same random subsets (one subset draw
per question, N and trial, shared by all arms), so its per-question hit rates are paired
with every other arm's. For one arm on one seed:

* ``hits[n]``: [Q] the chance that the arm's best-of-n pick is correct, averaged over
  ``trials`` random subsets of n candidates (at the full candidate count there is one
  subset, the whole set, and the hit is 0 or 1);
* ``within_question_auroc``: how well the chain scores order each question's candidates
  (the only thing best-of-N selection uses), averaged over questions with a correct and a
  wrong candidate;
* ``step_auroc``: per error type, the AUROC of step logits for "this step is correct" over
  the steps of clean chains and the erroneous steps of that type (how well the PRM
  detects each kind of error);
* ``score_std``: the standard deviation of the chain scores (a PRM that hedges towards
  0.5 everywhere has compressed scores);
* ``pairwise_loss`` / ``scale_free_pairwise_loss``: the pairwise ranking loss on the test
  candidates (mean of ``softplus(A_wrong - A_correct)`` over the (correct, wrong) pairs of
  each question), on the scores as they are and divided by their pooled within-question
  standard deviation (:func:`test_pairwise_losses`). A PRM can lower the first by spreading
  its scores alone; only a better order lowers the second.

For an arm that learns its weights, :func:`hypergradient_signal` reads the per-domain
hypergradient the trainer logged every iteration and reports, per domain, its mean over the
second half of training and ``t = mean / standard error``: how consistently the meta loss
pushed that weight (positive: down) rather than how far the weight happened to drift. A
domain with ``|t|`` near 0 was moved by noise.

For an arm that learns a weight per training record (``instance_table``, ``instance_net``),
:func:`instance_weight_auroc` asks, per domain, whether the weights found the records with
wrong labels: the AUROC of the learned weight for "the record's label is correct". On the
generated benchmark a record's Monte-Carlo label ``accuracy`` is correct when it lies on the
side of 0.5 of the step's true label, ``|accuracy - true_label| < 0.5``; records without a
``true_label`` (real data) give no AUROC.

Pooled over seeds, an arm's best-of-N difference to the baseline is
:func:`dreamprm_jax.evaluation.statistics.paired_bootstrap` of the per-question hit
differences.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dreamprm_jax.bilevel.losses import NORMALIZED_PAIRWISE_EPS
from dreamprm_jax.evaluation import statistics
from dreamprm_jax.evaluation.selection import SelectionInputs, Selector, sample_subsets

__all__ = ["ArmOutcome", "DomainSignal", "best_of_n_hits", "step_auroc_by_error_type", "test_pairwise_losses",
           "arm_outcome", "gap_closed", "hypergradient_signal", "WRONG_LABELS", "instance_weight_auroc",
           "instance_weight_aurocs"]


@dataclasses.dataclass(frozen=True)
class ArmOutcome:
    """One arm on one seed's test set (fields in the module docstring)."""

    hits: Mapping[int, np.ndarray]            # n -> [Q] float64 in [0, 1]
    within_question_auroc: float
    step_auroc: Mapping[str, float]
    score_std: float
    pairwise_loss: float = float("nan")
    scale_free_pairwise_loss: float = float("nan")

    def accuracy(self, n: int) -> float:
        return float(np.mean(self.hits[n]))


def best_of_n_hits(inputs: SelectionInputs, selector: Selector, ns: Sequence[int], *, trials: int = 20,
                   seed: int = 0) -> dict[int, np.ndarray]:
    """n -> [Q] hit rate of ``selector`` over ``trials`` subsets of n candidates per question.

    The subsets come from ``np.random.default_rng([seed, n, t])``, as in
    :func:`dreamprm_jax.evaluation.selection.evaluate`, so every arm sees the same ones. At
    n >= the candidate count a single trial is used (every subset is the full set).
    """
    rows = np.arange(inputs.num_questions)
    out = {}
    for n in ns:
        num_trials = 1 if n >= inputs.max_candidates else trials
        total = np.zeros(inputs.num_questions)                              # [Q]
        for t in range(num_trials):
            subset = sample_subsets(inputs.candidate_mask, n, np.random.default_rng([seed, n, t]))
            chosen = np.asarray(selector(inputs, subset, np.random.default_rng([seed, n, t, 1])), np.int64)
            total += inputs.correct[rows, chosen]
        out[int(n)] = total / num_trials
    return out


def step_auroc_by_error_type(step_logits: np.ndarray, step_labels: np.ndarray,
                             step_error_types: np.ndarray) -> dict[str, float]:
    """Per error type: AUROC of the step logits for "correct step" over correct steps
    (label 1) against that type's erroneous steps (label 0 and that type).

    ``step_logits`` [Q, N, S] float, ``step_labels`` [Q, N, S] int (1 correct, 0 wrong, -1
    none), ``step_error_types`` [Q, N, S] str ("" where the step is not an error).
    """
    logits = np.asarray(step_logits, np.float64)
    labels = np.asarray(step_labels)
    types = np.asarray(step_error_types)
    positives = logits[labels == 1]
    out = {}
    for kind in sorted({str(t) for t in types[labels == 0].reshape(-1)} - {""}):
        negatives = logits[(labels == 0) & (types == kind)]
        scores = np.concatenate([positives, negatives])
        truth = np.concatenate([np.ones(positives.size, bool), np.zeros(negatives.size, bool)])
        out[kind] = statistics.auroc(scores, truth)
    return out


def test_pairwise_losses(chain_scores: np.ndarray, correct: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(pairwise loss, scale-free pairwise loss) of ``chain_scores`` [Q, N] on a test set.

    Both are means over every (correct i, wrong j) pair of candidates of one question of
    ``softplus(A_j - A_i)``, the second on ``A / sigma`` with ``sigma`` the pooled
    within-question standard deviation of the scores (over questions with two or more
    candidates): :func:`dreamprm_jax.bilevel.pairwise_loss` and
    :func:`~dreamprm_jax.bilevel.normalized_pairwise_loss` on the whole test set at once, in
    numpy, question by question. NaN where no question has both kinds of candidate.
    """
    scores = np.asarray(chain_scores, np.float64)
    ok = np.asarray(mask, bool)
    good = np.asarray(correct, bool) & ok
    bad = ~np.asarray(correct, bool) & ok
    sizes = ok.sum(-1)                                                         # [Q]
    means = np.where(sizes > 0, np.where(ok, scores, 0.0).sum(-1) / np.maximum(sizes, 1), 0.0)  # [Q]
    deviations = np.where(ok & (sizes >= 2)[:, None], scores - means[:, None], 0.0)            # [Q, N]
    counted = int(np.sum(ok & (sizes >= 2)[:, None]))
    eps = NORMALIZED_PAIRWISE_EPS  # as in training
    sigma = float(np.sqrt(np.sum(deviations ** 2) / counted + eps ** 2)) if counted else eps
    margins = scores[:, None, :] - scores[:, :, None]                             # [Q, N, N]: A_j - A_i
    pairs = good[:, :, None] & bad[:, None, :]                                   # [Q, N, N]: (i correct, j wrong)
    if not pairs.any():
        return float("nan"), float("nan")
    m = margins[pairs]
    return float(np.mean(np.logaddexp(0.0, m))), float(np.mean(np.logaddexp(0.0, m / sigma)))


def arm_outcome(inputs: SelectionInputs, chain_scores: np.ndarray, *, ns: Sequence[int], trials: int, seed: int,
                step_logits: np.ndarray | None = None, step_labels: np.ndarray | None = None,
                step_error_types: np.ndarray | None = None) -> ArmOutcome:
    """Everything :class:`ArmOutcome` holds for a PRM's aggregated ``chain_scores`` [Q, N]."""
    from dreamprm_jax.evaluation.selection import ScoreArgmax

    scores = np.asarray(chain_scores, np.float64)
    hits = best_of_n_hits(inputs, ScoreArgmax(scores), ns, trials=trials, seed=seed)
    mask = inputs.candidate_mask
    by_type: dict[str, float] = {}
    if step_logits is not None and step_labels is not None and step_error_types is not None:
        by_type = step_auroc_by_error_type(step_logits, step_labels, step_error_types)
    pairwise, scale_free = test_pairwise_losses(scores, inputs.correct, mask)
    return ArmOutcome(hits=hits, within_question_auroc=statistics.within_question_auroc(scores, inputs.correct, mask),
                      step_auroc=by_type, score_std=float(np.std(scores[mask])), pairwise_loss=pairwise,
                      scale_free_pairwise_loss=scale_free)


def gap_closed(arm_diff: float, oracle_diff: float) -> float:
    """Share of the baseline-to-oracle gap an arm closes (NaN when the oracle gains nothing)."""
    return float(arm_diff / oracle_diff) if oracle_diff > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class DomainSignal:
    """One domain's logged hypergradient ``d meta_loss / d r_k`` over the iterations read:
    ``mean``, ``t = mean / (std / sqrt(iterations))``, the number of ``iterations``, and two
    statistics a few huge iterations cannot sway (long unrolls have heavy tails): the
    ``median`` and ``share_down``, the share of iterations whose hypergradient is positive
    (pushes the weight down; 0.5: no consistent direction)."""

    mean: float
    t: float
    iterations: int
    median: float = float("nan")
    share_down: float = float("nan")


def hypergradient_signal(metrics_path: str, *, from_fraction: float = 0.5) -> dict[str, DomainSignal]:
    """Per-domain hypergradient statistics from a run's ``metrics.jsonl``.

    Args:
      metrics_path: the file the trainer writes (one JSON object per logged iteration, with
        ``"step"`` and ``"hypergradient": {domain: float}``; lines without it are skipped).
      from_fraction: only iterations after this fraction of the last logged step are read
        (0.5: the second half, where the weights have left their start).

    Returns:
      ``{domain: DomainSignal}``; empty when the file logs no hypergradient (an arm without
      reweighting, or a run older than this log). ``t`` is 0 for a constant series.
    """
    if not os.path.isfile(metrics_path):
        return {}
    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_path}:{line_no}: not valid JSON ({e})") from None
            if isinstance(row.get("hypergradient"), dict) and isinstance(row.get("step"), int):
                rows.append(row)
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    rows = [r for r in rows if r["step"] > from_fraction * last]
    out = {}
    for domain in rows[0]["hypergradient"]:
        g = np.array([r["hypergradient"].get(domain, np.nan) for r in rows], np.float64)  # [iterations]
        g = g[np.isfinite(g)]
        if g.size == 0:
            continue
        se = float(np.std(g, ddof=1) / np.sqrt(g.size)) if g.size > 1 else 0.0
        out[domain] = DomainSignal(float(np.mean(g)), float(np.mean(g) / se) if se > 0 else 0.0, int(g.size),
                                   float(np.median(g)), float(np.mean(g > 0)))
    return out


#: Which wrong labels :func:`instance_weight_auroc` sets against the correct ones.
WRONG_LABELS = ("any", "too_high", "too_low")


def instance_weight_aurocs(train_json: str, weights: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """:func:`instance_weight_auroc` for every entry of :data:`WRONG_LABELS`, reading
    ``train_json`` once: ``{wrong: {domain: AUROC or None}}``."""
    from dreamprm_jax.data.jsonfiles import read_json_records
    from dreamprm_jax.data.records import load_train_records, record_keys

    raw = read_json_records(train_json)
    loaded = load_train_records(train_json, check_images=False, on_bad_record="skip")
    by_domain: dict[str, tuple[list[float], list[float]]] = {}  # domain -> (weights, label errors)
    for key, rec in zip(record_keys(loaded.records), loaded.records):
        value = raw[rec.source[1]].value if 0 <= rec.source[1] < len(raw) else None
        truth = value.get("true_label") if isinstance(value, dict) else None
        if truth is None or key not in weights:
            continue
        scores, errors = by_domain.setdefault(rec.dataset, ([], []))
        scores.append(float(weights[key]))
        errors.append(rec.accuracy - float(truth))  # > 0: the label says more correct than the step is
    out: dict[str, dict[str, float | None]] = {wrong: {} for wrong in WRONG_LABELS}
    for domain, (scores, errors) in sorted(by_domain.items()):
        w, e = np.asarray(scores), np.asarray(errors)  # [records of the domain] each
        for wrong, kept in (("any", np.ones(e.shape, bool)), ("too_high", e > -0.5), ("too_low", e < 0.5)):
            value = statistics.auroc(w[kept], np.abs(e[kept]) < 0.5)
            out[wrong][domain] = None if np.isnan(value) else value
    return out


def instance_weight_auroc(train_json: str, weights: Mapping[str, float],
                          wrong: str = "any") -> dict[str, float | None]:
    """Per domain, the AUROC of the learned instance weight for "the record's label is correct".

    ``wrong`` picks the wrong labels set against the correct ones: ``"any"``, or only those
    too high (``accuracy >= true_label + 0.5``: an erroneous step labelled as correct) or too
    low (``accuracy <= true_label - 0.5``: a correct step labelled as wrong). The two kinds
    can fare very differently: a PRM can only tell a mislabelled step from a well-labelled one
    for errors it already recognises.

    Args:
      train_json: the training records file (the generated benchmark's ``train.json``: every
        record with ``accuracy`` and ``true_label``).
      weights: ``{record key: weight}`` (a run's ``instance_weights.json``; keys as
        :func:`dreamprm_jax.data.records.record_keys` names them).
      wrong: one of :data:`WRONG_LABELS`.

    Returns:
      ``{domain: AUROC}`` over the domain's records found in ``weights``, ``None`` where the
      domain's labels are all correct or all wrong; empty when the records carry no
      ``true_label``.
    """
    if wrong not in WRONG_LABELS:
        raise ValueError(f"instance_weight_auroc: wrong must be one of {WRONG_LABELS}, got {wrong!r}")
    return instance_weight_aurocs(train_json, weights)[wrong]
