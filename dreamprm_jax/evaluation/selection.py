"""Best-of-N selection methods and the N sweep.

A *selector* picks one candidate per question from a subset of its candidates::

    selector(inputs: SelectionInputs, subset [Q, N] bool, rng) -> chosen [Q] int

Built in (all deterministic given the subset, except ``Random``):

* ``ZeroShot``      candidate 0 of the file, whatever the subset (the policy's first
                    sample; a line that does not depend on N).
* ``Random``        a uniformly random candidate of the subset (seeded); its mean over
                    trials estimates single-sample accuracy.
* ``MajorityVote``  self-consistency: the most frequent extracted answer (by
                    :func:`answers.answer_key`) in the subset; candidates without an
                    answer do not vote. Ties go to the answer whose first candidate has
                    the smallest index (file order); that candidate is returned.
* ``ScoreArgmax``   the highest score of the subset; ties go to the smallest index.
                    Outcome-only scoring (one logit per whole chain) and PRM selection
                    (step logits -> :mod:`aggregation` -> chain score) are both this, so
                    "vanilla PRM" and "DreamPRM" are two score arrays from two checkpoints.
* ``Oracle``        pass@N upper bound: a correct candidate whenever the subset has one.

N sweep (:func:`evaluate`): for each n and trial t, every question draws a subset of
min(n, its candidate count) candidates without replacement from
``np.random.default_rng([seed, n, t])``; all methods see the same subsets (a paired
comparison). Accuracy is reported per benchmark and overall, as mean and standard
deviation (ddof=0, as the reference's ``np.std``) over trials. "overall_micro" is the
mean over all questions; "overall_macro" the unweighted mean of per-benchmark
accuracies. The largest n is always the full candidate count N ("all candidates").
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from dreamprm_jax.evaluation import aggregation as agg_lib
from dreamprm_jax.evaluation.answers import DEFAULT_CONFIG, MatchConfig, answer_key, extract_final_answer, match_answer
from dreamprm_jax.evaluation.candidates import Question
from dreamprm_jax.evaluation.scoring import StepScores, candidate_mask

__all__ = [
    "MajorityVote",
    "Oracle",
    "Random",
    "ScoreArgmax",
    "SelectionInputs",
    "Selector",
    "Stat",
    "SweepResult",
    "ZeroShot",
    "build_inputs",
    "evaluate",
    "prm_selector",
    "sample_subsets",
    "standard_methods",
]

OVERALL_MICRO = "overall_micro"
OVERALL_MACRO = "overall_macro"


@dataclasses.dataclass(frozen=True)
class SelectionInputs:
    """What selection needs to know about the candidates (no model).

    ``answer_ids[q, n]`` numbers the distinct answer keys within question q (-1: no
    answer or no candidate), so that equal ids mean equal answers.
    """

    question_ids: tuple[str, ...]          # [Q]
    benchmarks: tuple[str, ...]            # [Q]
    correct: np.ndarray                    # [Q, N] bool
    candidate_mask: np.ndarray             # [Q, N] bool
    answer_ids: np.ndarray                 # [Q, N] int32
    answers: tuple[tuple[str | None, ...], ...] = ()    # [Q][N_q] extracted answers
    label_disagreements: int = 0           # candidates whose "correct" label != matching

    @property
    def num_questions(self) -> int:
        return self.correct.shape[0]

    @property
    def max_candidates(self) -> int:
        return self.correct.shape[1]


def build_inputs(questions: Sequence[Question], *,
                 correct_source: Literal["auto", "label", "match"] = "auto",
                 config: MatchConfig = DEFAULT_CONFIG) -> SelectionInputs:
    """Extract answers, decide correctness and number answer keys.

    correct_source: "match" compares the extracted final answer with the gold answer
      (:func:`answers.match_answer`, per-benchmark matchers included); "label" uses
      each candidate's ``correct`` field (error if missing); "auto" uses the label
      where present and matching elsewhere. Disagreements between label and matching
      are counted in ``label_disagreements`` either way.
    """
    if correct_source not in ("auto", "label", "match"):
        raise ValueError(f"build_inputs: correct_source must be 'auto', 'label' or 'match', got "
                         f"{correct_source!r}")
    mask = candidate_mask(questions)                                   # [Q, N]
    Q, N = mask.shape
    correct = np.zeros((Q, N), dtype=bool)
    answer_ids = np.full((Q, N), -1, dtype=np.int32)
    answers = []
    disagreements = 0
    for qi, q in enumerate(questions):
        ids: dict[str, int] = {}
        extracted = []
        for ci, c in enumerate(q.candidates):
            pred = extract_final_answer(c.text)
            extracted.append(pred)
            key = answer_key(pred, q.choices)
            if key is not None:
                answer_ids[qi, ci] = ids.setdefault(key, len(ids))
            matched = match_answer(pred, q.answer, choices=q.choices, benchmark=q.benchmark, config=config)
            if c.correct is not None and c.correct != matched:
                disagreements += 1
            if correct_source == "match" or (correct_source == "auto" and c.correct is None):
                correct[qi, ci] = matched
            elif c.correct is None:
                raise ValueError(f"build_inputs: question {q.id!r} (record {q.record_index}) field "
                                 f"'candidates[{ci}].correct': expected true/false with "
                                 "correct_source='label', the field is missing")
            else:
                correct[qi, ci] = c.correct
        answers.append(tuple(extracted))
    return SelectionInputs(question_ids=tuple(q.id for q in questions),
                           benchmarks=tuple(q.benchmark for q in questions), correct=correct,
                           candidate_mask=mask, answer_ids=answer_ids, answers=tuple(answers),
                           label_disagreements=disagreements)


# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------


class Selector(Protocol):
    def __call__(self, inputs: SelectionInputs, subset: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ...


def _first_max(key: np.ndarray) -> np.ndarray:
    """argmax over the last axis; numpy returns the first (smallest index) maximum."""
    return np.argmax(key, axis=-1)


@dataclasses.dataclass(frozen=True)
class ZeroShot:
    """Candidate 0 (the first sample), independent of the subset."""

    def __call__(self, inputs, subset, rng):
        return np.zeros(inputs.num_questions, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Random:
    """A uniformly random candidate of the subset."""

    def __call__(self, inputs, subset, rng):
        key = np.where(subset, rng.random(subset.shape), -1.0)        # [Q, N]
        return _first_max(key)


@dataclasses.dataclass(frozen=True)
class Oracle:
    """A correct candidate of the subset when there is one (pass@N)."""

    def __call__(self, inputs, subset, rng):
        key = np.where(subset, inputs.correct.astype(np.int8), -1)   # [Q, N]
        return _first_max(key)


@dataclasses.dataclass(frozen=True)
class MajorityVote:
    """Self-consistency; ties -> the answer first seen in file order."""

    def __call__(self, inputs, subset, rng):
        ids = inputs.answer_ids                                        # [Q, N]
        valid = subset & (ids >= 0)                                    # [Q, N]
        same = ids[:, :, None] == ids[:, None, :]                      # [Q, N, N]
        votes = (same & valid[:, None, :]).sum(-1)                     # [Q, N]
        key = np.where(valid, votes, np.where(subset, 0, -1))          # answerless: 0, outside: -1
        return _first_max(key)


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreArgmax:
    """The highest ``scores[q, n]`` in the subset (-inf never beats a finite score)."""

    scores: np.ndarray                                                 # [Q, N]

    def __call__(self, inputs, subset, rng):
        s = np.asarray(self.scores, dtype=np.float64)
        if s.shape != subset.shape:
            raise ValueError(f"ScoreArgmax: scores shape {s.shape} != candidates shape {subset.shape}")
        if np.isnan(s[subset]).any():
            raise ValueError("ScoreArgmax: NaN score for a candidate in the subset; expected numbers")
        finite = np.nan_to_num(s, neginf=-np.finfo(np.float64).max, posinf=np.finfo(np.float64).max)
        key = np.where(subset, finite, -np.inf)                        # [Q, N]
        return _first_max(key)


def prm_selector(step_scores: StepScores | tuple[np.ndarray, np.ndarray], aggregation: str = "mean") -> ScoreArgmax:
    """PRM selection: step logits [Q, N, S] + mask -> aggregated chain scores -> argmax."""
    if isinstance(step_scores, StepScores):
        logits, mask = step_scores.step_logits, step_scores.step_mask
    else:
        logits, mask = step_scores
    return ScoreArgmax(agg_lib.aggregate(aggregation, logits, mask))


def standard_methods(*, prm_scores: Mapping[str, StepScores] | None = None,
                     aggregations: Sequence[str] = ("mean",),
                     outcome_logits: Mapping[str, np.ndarray] | None = None,
                     baselines: bool = True) -> dict[str, Selector]:
    """The comparison-table methods, in table order.

    Names: "zero_shot", "random", "self_consistency", "outcome:<name>" per outcome
    score array, "<prm name>/<aggregation>" per PRM and aggregation (e.g.
    "dreamprm/mean", "vanilla_prm/sum"), "oracle".
    """
    methods: dict[str, Selector] = {}
    if baselines:
        methods.update(zero_shot=ZeroShot(), random=Random(), self_consistency=MajorityVote())
    for name, logits in (outcome_logits or {}).items():
        methods[f"outcome:{name}"] = ScoreArgmax(np.asarray(logits, dtype=np.float64))
    for name, scores in (prm_scores or {}).items():
        for agg in aggregations:
            methods[f"{name}/{agg}"] = prm_selector(scores, agg)
    if baselines:
        methods["oracle"] = Oracle()
    return methods


# ---------------------------------------------------------------------------------------
# N sweep
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Accuracy of every method at every n.

    ``accuracy[method][n][scope]`` is a :class:`Stat` over trials, where scope is a
    benchmark name, "overall_micro" (mean over questions) or "overall_macro" (mean of
    per-benchmark accuracies). ``selections[method]`` are the chosen candidate indices
    at the full N in trial 0.
    """

    methods: tuple[str, ...]
    ns: tuple[int, ...]
    benchmarks: tuple[str, ...]
    num_questions: Mapping[str, int]
    num_trials: int
    seed: int
    accuracy: Mapping[str, Mapping[int, Mapping[str, Stat]]]
    selections: Mapping[str, tuple[int, ...]]
    skipped_ns: tuple[int, ...] = ()
    max_candidates: int = 0

    @property
    def scopes(self) -> tuple[str, ...]:
        return self.benchmarks + (OVERALL_MICRO, OVERALL_MACRO)

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "ns": list(self.ns),
            "max_candidates": self.max_candidates,
            "skipped_ns": list(self.skipped_ns),
            "benchmarks": list(self.benchmarks),
            "num_questions": dict(self.num_questions),
            "num_trials": self.num_trials,
            "seed": self.seed,
            "overall_definitions": {
                OVERALL_MICRO: "mean accuracy over all questions",
                OVERALL_MACRO: "unweighted mean of the per-benchmark accuracies",
            },
            "std": "population standard deviation (ddof=0) over trials",
            "accuracy": {m: {str(n): {s: st.to_dict() for s, st in per_n.items()}
                             for n, per_n in per_m.items()}
                         for m, per_m in self.accuracy.items()},
            "selections_full_n_trial0": {m: list(v) for m, v in self.selections.items()},
        }


def _stat(values: np.ndarray) -> Stat:
    """Mean and population std over trials; exactly (v, 0) when every trial gave v."""
    if np.all(values == values[0]):
        return Stat(float(values[0]), 0.0)
    return Stat(float(values.mean()), float(values.std()))


def sample_subsets(candidate_mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[Q, N] bool: min(n, N_q) candidates of each question, uniformly without replacement."""
    Q, N = candidate_mask.shape
    keys = np.where(candidate_mask, rng.random((Q, N)), np.inf)       # [Q, N]
    order = np.argsort(keys, axis=1, kind="stable")                     # [Q, N]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(N)[None, :].repeat(Q, 0), axis=1)
    return candidate_mask & (rank < n)


def evaluate(inputs: SelectionInputs, methods: Mapping[str, Selector], *,
             ns: Sequence[int] = (2, 4, 8), num_trials: int = 20, seed: int = 0) -> SweepResult:
    """Run every method on the same random candidate subsets for each n (module docstring)."""
    if num_trials < 1:
        raise ValueError(f"evaluate: num_trials must be >= 1, got {num_trials}")
    if not methods:
        raise ValueError("evaluate: expected at least one method")
    if inputs.num_questions == 0:
        raise ValueError("evaluate: no questions to evaluate")
    N = inputs.max_candidates
    bad = [n for n in ns if n < 1]
    if bad:
        raise ValueError(f"evaluate: ns must be >= 1, got {bad}")
    kept = sorted({n for n in ns if n <= N} | {N})
    skipped = tuple(sorted({n for n in ns if n > N}))
    benchmarks = tuple(sorted(set(inputs.benchmarks)))
    bench_idx = np.array([benchmarks.index(b) for b in inputs.benchmarks])     # [Q]
    counts = np.bincount(bench_idx, minlength=len(benchmarks))                  # [B]
    correct = inputs.correct
    rows = np.arange(inputs.num_questions)

    per_trial: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}     # -> [T, B + 2]
    selections: dict[str, tuple[int, ...]] = {}
    for n in kept:
        acc = {m: np.zeros((num_trials, len(benchmarks) + 2)) for m in methods}
        for t in range(num_trials):
            subset = sample_subsets(inputs.candidate_mask, n, np.random.default_rng([seed, n, t]))
            for name, selector in methods.items():
                # a method's stream depends on its name only, not on the other methods
                rng = np.random.default_rng([seed, n, t, 1 + zlib.crc32(name.encode())])
                chosen = np.asarray(selector(inputs, subset, rng), dtype=np.int64)   # [Q]
                if chosen.shape != (inputs.num_questions,):
                    raise ValueError(f"evaluate: method {name!r} returned shape {chosen.shape}, "
                                     f"expected ({inputs.num_questions},)")
                hit = correct[rows, chosen].astype(np.float64)                      # [Q]
                per_bench = np.bincount(bench_idx, weights=hit, minlength=len(benchmarks)) / counts
                acc[name][t, : len(benchmarks)] = per_bench
                acc[name][t, -2] = hit.mean()
                acc[name][t, -1] = per_bench.mean()
                if n == N and t == 0:
                    selections[name] = tuple(int(c) for c in chosen)
        for name in methods:
            per_trial[name][n] = acc[name]

    scopes = benchmarks + (OVERALL_MICRO, OVERALL_MACRO)
    accuracy = {name: {n: {s: _stat(a[:, k]) for k, s in enumerate(scopes)}
                       for n, a in per_n.items()}
                for name, per_n in per_trial.items()}
    return SweepResult(methods=tuple(methods), ns=tuple(kept), benchmarks=benchmarks,
                       num_questions={b: int(c) for b, c in zip(benchmarks, counts)},
                       num_trials=num_trials, seed=seed, accuracy=accuracy, selections=selections,
                       skipped_ns=skipped, max_candidates=N)
