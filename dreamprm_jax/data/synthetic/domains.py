"""Training domains with planted quality, and their Monte-Carlo step labels.

Labels.  DreamPRM labels a chain prefix (steps 1..k) with the Monte-Carlo accuracy of a
policy that completes it ``times`` times: ``accuracy = score / times``.  Here the policy
is simulated::

    score_k ~ Binomial(times, p_clean)   if the prefix has no error (k < first_error)
    score_k ~ Binomial(times, p_error)   if it contains the error   (k >= first_error)
    score_5 = times * [chain correct]    (a complete chain has nothing left to roll out)

The ``first_error`` the labels are drawn from is the chain's own, except where a domain
plants a defect (below).  Every training record also carries its step's *true* label
(``true_label``: 1 iff the prefix has no error in its text) and the chain's error type,
so an analysis can tell planted label defects from Monte-Carlo noise.

Errors.  An error chain uses a wrong value from its first error on (step 3, 4 or 5), of
type A (the value zero: blatant), B (a number word out of every task's range: learnable,
less obvious) or C (an in-range value contradicting the image: subtle); see
:mod:`.tasks`.  The best-of-N test candidates' errors are 25 % A, 50 % B, 25 % C, and the
meta set is drawn from that same distribution on other questions, so a PRM that learns
A and B ranks most wrong candidates below the correct ones; C marks the limit.

Domains.  The default domains, with their planted ``quality`` (higher = more useful for
the test distribution; recorded in ``manifest.json``) and the ``oracle_weight`` a study
can train with to measure what the right weights are worth:

==========  ========  =======  ==============================================================
name        quality   oracle   what is planted
==========  ========  =======  ==============================================================
good_1      1.00      1.00     clean labels; errors A / B / C as in the test set
good_2      0.80      1.00     good_1 with 30 % of the step labels exchanged at random among
                               the domain's records of the same step (noisier MC labels)
easy_A      0.60      1.00     clean labels, every error of type A: correct but narrow (it
                               teaches A only)
noise_img   0.10      0.05     noise images; the chain's text is as usual but its labels are
                               those of an unrelated hidden chain (uncorrelated with the text)
misled_B    0.00      0.05     the largest (3x the others); errors as in good_1, but the MC
                               labels are systematically wrong for type B: B chains carry the
                               labels of correct chains, and as many correct chains carry the
                               labels of the B chains
==========  ========  =======  ==============================================================

Trained without reweighting and with domains sampled in proportion to their sizes, a PRM
sees B errors labelled "correct" three times as often as labelled "wrong", and learns B
backwards or not at all; with misled_B and noise_img weighted near 0 it learns A and B.
The gap between the two at best-of-N is what domain reweighting can recover.

One label distribution.  The meta loss rewards *calibration* as well as quality: a domain
whose labels pull the PRM's predictions (at some step, or on average) towards what the
meta loss prefers gets a larger hypergradient, whatever its quality.  So every default
domain has the same label distribution at every step: the same p_clean, p_error, error
rate and error steps; the domains differ only in *which* texts carry which labels.  The
defects keep it: ``label_noise`` exchanges labels within a step, and misled_B swaps the
label draws of its B chains with those of an equal number of its correct chains (the
multiset of label sources is unchanged).  Relabelling the B chains alone as correct would
raise the domain's mean label, and the meta loss would then *raise* its weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dreamprm_jax.data.synthetic.tasks import ERROR_STEPS, ERROR_TYPES, NUM_STEPS, TASKS

__all__ = ["DomainSpec", "TEST_ERROR_MIX", "default_domains", "expected_mean_label", "rollout_scores",
           "corrupt_scores", "sample_first_error", "sample_error_type", "mislabel"]

#: Fractions of the error types A, B, C among wrong test candidates and wrong meta chains.
TEST_ERROR_MIX: tuple[float, float, float] = (0.25, 0.5, 0.25)


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """One training domain: how its chains are made and how their labels are planted.

    Attributes:
      name: the ``dataset`` field of its records.
      quality: planted quality, higher = more useful for the test distribution.
      description: one line for the manifest.
      oracle_weight: the weight a study's oracle arm gives the domain (relative; the
        trainer normalises weights to mean 1).
      p_clean: rollout success probability from a prefix without an error.
      p_error: rollout success probability from a prefix that contains the error.
      error_rate: fraction of chains with a planted error.
      error_steps: steps the first error is drawn from (uniformly).
      error_mix: fractions of the error types A, B, C among the error chains.
      image: ``"informative"`` (the scene) or ``"noise"`` (random pixels).
      hidden_labels: labels come from an independent hidden chain, not from the text.
      label_noise: fraction of step records whose score is re-drawn: the randomised records of
        each step index exchange their scores by a random permutation.
      mislabel_type: an error type whose chains carry the labels of correct chains, while as
        many correct chains carry theirs (:func:`mislabel`); None for none.
      scale: chain count relative to the config's ``train_per_domain``.
      tasks: the question types drawn from.
    """

    name: str
    quality: float
    description: str
    oracle_weight: float = 1.0
    p_clean: float = 0.85
    p_error: float = 0.05
    error_rate: float = 0.5
    error_steps: tuple[int, ...] = ERROR_STEPS
    error_mix: tuple[float, float, float] = TEST_ERROR_MIX
    image: str = "informative"
    hidden_labels: bool = False
    label_noise: float = 0.0
    mislabel_type: str | None = None
    scale: float = 1.0
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self):
        if not 0.0 <= self.p_error <= self.p_clean <= 1.0:
            raise ValueError(f"domain {self.name!r}: expected 0 <= p_error <= p_clean <= 1, got "
                             f"p_error={self.p_error}, p_clean={self.p_clean}")
        if not all(0.0 <= x <= 1.0 for x in (self.error_rate, self.label_noise)):
            raise ValueError(f"domain {self.name!r}: error_rate and label_noise must be in [0, 1]")
        if len(self.error_mix) != len(ERROR_TYPES) or min(self.error_mix) < 0 \
                or abs(sum(self.error_mix) - 1.0) > 1e-9:
            raise ValueError(f"domain {self.name!r}: error_mix must be {len(ERROR_TYPES)} fractions (types "
                             f"{ERROR_TYPES}) summing to 1, got {self.error_mix}")
        if not self.error_steps or any(k not in ERROR_STEPS for k in self.error_steps):
            raise ValueError(f"domain {self.name!r}: error_steps must be a non-empty subset of {ERROR_STEPS}, "
                             f"got {self.error_steps}")
        if self.image not in ("informative", "noise"):
            raise ValueError(f"domain {self.name!r}: image must be 'informative' or 'noise', got {self.image!r}")
        if self.mislabel_type is not None and self.mislabel_type not in ERROR_TYPES:
            raise ValueError(f"domain {self.name!r}: mislabel_type must be None or one of {ERROR_TYPES}, "
                             f"got {self.mislabel_type!r}")
        if self.hidden_labels and self.mislabel_type is not None:
            raise ValueError(f"domain {self.name!r}: hidden_labels and mislabel_type exclude each other")
        if not self.scale > 0 or self.oracle_weight < 0:
            raise ValueError(f"domain {self.name!r}: expected scale > 0 and oracle_weight >= 0, got "
                             f"scale={self.scale}, oracle_weight={self.oracle_weight}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"domain {self.name!r}: tasks must be a non-empty subset of {TASKS}, got {self.tasks}")

    def num_chains(self, train_per_domain: int) -> int:
        """Chains of this domain for a config's ``train_per_domain`` (at least 1)."""
        return max(1, int(round(self.scale * train_per_domain)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["error_steps"] = list(self.error_steps)
        d["error_mix"] = list(self.error_mix)
        d["tasks"] = list(self.tasks)
        return d

    def corruption(self) -> dict[str, Any]:
        """The planted defects in one dict (for the manifest)."""
        return {"error_mix": dict(zip(ERROR_TYPES, self.error_mix)), "error_steps": list(self.error_steps),
                "image": self.image, "hidden_labels": self.hidden_labels, "label_noise": self.label_noise,
                "mislabel_type": self.mislabel_type}


def expected_mean_label(p_clean: float, p_error: float, error_rate: float, error_steps=ERROR_STEPS) -> float:
    """E[accuracy] over a domain's step records (5 per chain, errors uniform over ``error_steps``).

    A correct chain's prefixes score p_clean (k = 1..4) and 1 (k = 5); a chain whose first
    error is at k scores p_clean before k, p_error from k to 4 and 0 at k = 5.
    """
    correct = ((NUM_STEPS - 1) * p_clean + 1.0) / NUM_STEPS
    wrong = float(np.mean([((k - 1) * p_clean + (NUM_STEPS - k) * p_error) / NUM_STEPS for k in error_steps]))
    return (1.0 - error_rate) * correct + error_rate * wrong


def default_domains() -> tuple[DomainSpec, ...]:
    """The five default domains (see the module docstring for why each has its quality).

    All share p_clean 0.85, p_error 0.05, error rate 0.5 and error steps 3..5, hence one label
    distribution (mean label :func:`expected_mean_label` = 0.70).
    """
    return (
        DomainSpec("good_1", 1.0, "Clean labels; errors A / B / C as in the test set."),
        DomainSpec("good_2", 0.8, "good_1 with 30% of the step labels exchanged at random within a step.",
                   label_noise=0.3),
        DomainSpec("easy_A", 0.6, "Clean labels; every error is type A (zero): correct but narrow.",
                   error_mix=(1.0, 0.0, 0.0)),
        DomainSpec("misled_B", 0.0, "3x larger; type-B error chains carry the labels of correct chains and as "
                   "many correct chains those of the B chains (label marginals kept).", oracle_weight=0.05,
                   mislabel_type="B", scale=3.0),
        DomainSpec("noise_img", 0.1, "Noise images; labels come from an unrelated hidden chain, so they are "
                   "uncorrelated with the text.", oracle_weight=0.05, image="noise", hidden_labels=True),
    )


def sample_error_type(error_mix, rng: np.random.Generator) -> str:
    """One of ``ERROR_TYPES`` drawn with probabilities ``error_mix``."""
    u = rng.random()
    cumulative = np.cumsum(error_mix)  # [3]
    return ERROR_TYPES[min(int(np.searchsorted(cumulative, u, side="right")), len(ERROR_TYPES) - 1)]


def mislabel(first_errors, error_types, mislabel_type: str, rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """Swap the label sources of the ``mislabel_type`` chains with those of as many correct chains.

    Args:
      first_errors: per chain, the first error step or None (correct).
      error_types: per chain, its error type or None.
    Returns:
      (label_errors, swapped bool [C]): per chain the first error its labels are drawn from.
      Each chain of the type (all of them when there are enough correct chains) takes None,
      and a randomly chosen correct chain takes its first error, so the multiset of label
      sources, hence the domain's label distribution at every step, is unchanged.
    """
    label_errors = list(first_errors)
    typed = [i for i, t in enumerate(error_types) if t == mislabel_type]
    correct = [i for i, f in enumerate(first_errors) if f is None]
    n = min(len(typed), len(correct))
    typed = [typed[int(i)] for i in np.sort(rng.permutation(len(typed))[:n])]
    chosen = [correct[int(i)] for i in rng.permutation(len(correct))[:n]]
    swapped = np.zeros(len(first_errors), dtype=bool)  # [C]
    for t, c in zip(typed, chosen):
        label_errors[t], label_errors[c] = None, first_errors[t]
        swapped[t] = swapped[c] = True
    return label_errors, swapped


def sample_first_error(spec: DomainSpec, rng: np.random.Generator) -> int | None:
    """None (a correct chain) with probability 1 - error_rate, else a step from ``error_steps``."""
    has_error = rng.random() < spec.error_rate
    step = int(spec.error_steps[int(rng.integers(len(spec.error_steps)))])
    return step if has_error else None


def rollout_scores(first_error: int | None, spec: DomainSpec, times: int, rng: np.random.Generator) -> np.ndarray:
    """Simulated Monte-Carlo successes for prefixes k = 1..5 of one chain -> int64 [5].

    See the module docstring: Binomial(times, p_clean) before the first error,
    Binomial(times, p_error) from it on, and the complete chain scores times * correct.
    """
    k = np.arange(1, NUM_STEPS + 1)  # [S]
    clean = k < (first_error if first_error is not None else NUM_STEPS + 1)  # [S] bool
    p = np.where(clean, spec.p_clean, spec.p_error)  # [S]
    scores = rng.binomial(times, p).astype(np.int64)  # [S]
    scores[-1] = times if first_error is None else 0
    return scores


def corrupt_scores(scores: np.ndarray, spec: DomainSpec, times: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply the domain's label noise to all its step scores at once.

    Args:
      scores: int [R] scores of the domain's R step records, chain-major (record r is step
        ``r % 5 + 1`` of its chain).
    Returns:
      (scores int [R], randomised bool [R]): exactly ``round(label_noise * R)`` records are
      randomised; those of each step index exchange their scores by a random permutation,
      so the domain's label distribution at every step is unchanged.
    """
    scores = np.array(scores, dtype=np.int64, copy=True)  # [R]
    n = scores.shape[0]
    randomised = np.zeros(n, dtype=bool)  # [R]
    n_noisy = int(round(spec.label_noise * n))
    if n_noisy:
        idx = rng.permutation(n)[:n_noisy]
        randomised[idx] = True
        step = np.arange(n) % NUM_STEPS  # [R]
        for s in range(NUM_STEPS):
            group = np.flatnonzero(randomised & (step == s))
            scores[group] = scores[rng.permutation(group)]
    return scores, randomised
