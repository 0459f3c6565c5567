"""Training domains with planted quality, and their Monte-Carlo step labels.

Labels.  DreamPRM labels a chain prefix (steps 1..k) with the Monte-Carlo accuracy of a
policy that completes it ``times`` times: ``accuracy = score / times``.  Here the policy
is simulated::

    score_k ~ Binomial(times, p_clean)   if the prefix has no error (k < first_error)
    score_k ~ Binomial(times, p_error)   if it contains the error   (k >= first_error)
    score_5 = times * [chain correct]    (a complete chain has nothing left to roll out)

Errors.  An error chain uses a wrong value from its first error on (step 3, 4 or 5). It is
*blatant* (the value "zero", which no question here has as its answer: one token gives
it away, and a small PRM learns it in a few dozen iterations) or *subtle* (an in-range
value, visible only by comparing with the value step 2 read from the image).

A domain's planted ``quality`` (higher = better for the clean meta set, whose errors are
all blatant: a held-out set drawn from the kind of errors a small PRM can learn on a CPU
budget) is the ordering the learned domain weights should recover; it is recorded in
``manifest.json``. The default domains, best first:

=================  =======  =============================================================
name               quality  what is planted
=================  =======  =============================================================
trivial            1.00     clean labels, every error blatant: trivially easy, and exactly
                            the meta set's kind of error
clean_easy         0.85     clean labels; 25% of the errors subtle (in-range values the PRM
                            cannot check yet, so those labels look like noise to it)
clean_hard         0.70     clean labels; 50% of the errors subtle
label_noise        0.40     clean_hard with half of the step labels exchanged at random
                            among the domain's records of the same step
blank_image        0.15     noise images; the chain's text is as usual but the labels
                            come from an independent hidden chain, so they are
                            uncorrelated with the text (the values were unverifiable)
flipped            0.00     clean_hard with correctness flipped: correct chains carry the
                            labels of a chain with an error, erroneous chains those of a
                            correct one (anti-correlated with the text)
=================  =======  =============================================================

The ordering follows how much of a domain's text-label agreement the meta set rewards:
the clean domains differ in how much of it is about the meta set's errors, label_noise
keeps half of clean_hard's, blank_image none, flipped reverses it.

Three good domains against three bad ones.  The learned weights are
``K softplus(r_k) / sum softplus(r)``: a domain gains weight only while it helps the meta
loss more than the *weight-averaged* domain, and that average moves towards the best
domains as they gain weight. With four good domains (an earlier default added a clean
domain with 75% subtle errors) the weakest of them ended within about 0.1 of 1 in most
runs, on either side; with three, the weakest clean domain ends above 1 more often (in 11 of
the 12 runs of seeds 0-4 recorded in the README's Status), but not always: the weights are a
chaotic function of float32 rounding and of the seed.

One label distribution.  The meta loss also rewards *calibration*: a domain whose labels
pull the PRM's predictions (at some step, or on average) towards what the meta loss
prefers gets a larger hypergradient, whatever its quality; with mean aggregation the meta
loss prefers low predictions on early steps, for instance, since an error at step 5 must
out-vote four clean steps. So every default domain has the same label distribution at
every step: the same p_clean, p_error, error rate and error steps; the domains differ only
in *which* texts carry which labels. The corruptions keep it: ``label_noise`` exchanges
labels within a step, ``flipped`` swaps correct and erroneous chains' labels rather than
mapping ``accuracy -> 1 - accuracy`` (which would move the mean label from 0.7 to 0.3 and
plant a calibration signal instead of a quality one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dreamprm_jax.data.synthetic.tasks import ERROR_STEPS, NUM_STEPS, TASKS

__all__ = ["DomainSpec", "default_domains", "expected_mean_label", "rollout_scores", "corrupt_scores",
           "sample_first_error"]


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """One training domain: how its chains are made and how their labels are planted.

    Attributes:
      name: the ``dataset`` field of its records.
      quality: planted quality, higher = more useful for the clean meta set.
      description: one line for the manifest.
      p_clean: rollout success probability from a prefix without an error.
      p_error: rollout success probability from a prefix that contains the error.
      error_rate: fraction of chains with a planted error.
      error_steps: steps the first error is drawn from (uniformly).
      blatant_fraction: fraction of the error chains whose wrong value is the blatant "zero" (no
        question here has the answer 0, so one token gives it away) instead of an in-range value
        (visible only by comparing with step 2).
      image: ``"informative"`` (the scene) or ``"noise"`` (random pixels).
      hidden_labels: labels come from an independent hidden chain, not from the text.
      label_noise: fraction of step records whose score is re-drawn: the randomised records of
        each step index exchange their scores by a random permutation.
      label_flip: correctness flipped: a correct chain is labelled as a chain with an error
        (at a step from ``error_steps``), an erroneous chain as a correct one.
      tasks: the question types drawn from.
      chains: chain count override (None: the config's ``train_per_domain``).
    """

    name: str
    quality: float
    description: str
    p_clean: float = 0.85
    p_error: float = 0.05
    error_rate: float = 0.5
    error_steps: tuple[int, ...] = ERROR_STEPS
    blatant_fraction: float = 0.5
    image: str = "informative"
    hidden_labels: bool = False
    label_noise: float = 0.0
    label_flip: bool = False
    tasks: tuple[str, ...] = TASKS
    chains: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.p_error <= self.p_clean <= 1.0:
            raise ValueError(f"domain {self.name!r}: expected 0 <= p_error <= p_clean <= 1, got "
                             f"p_error={self.p_error}, p_clean={self.p_clean}")
        if not all(0.0 <= x <= 1.0 for x in (self.error_rate, self.label_noise, self.blatant_fraction)):
            raise ValueError(f"domain {self.name!r}: error_rate, label_noise and blatant_fraction must be in [0, 1]")
        if not self.error_steps or any(k not in ERROR_STEPS for k in self.error_steps):
            raise ValueError(f"domain {self.name!r}: error_steps must be a non-empty subset of {ERROR_STEPS}, "
                             f"got {self.error_steps}")
        if self.image not in ("informative", "noise"):
            raise ValueError(f"domain {self.name!r}: image must be 'informative' or 'noise', got {self.image!r}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"domain {self.name!r}: tasks must be a non-empty subset of {TASKS}, got {self.tasks}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["error_steps"] = list(self.error_steps)
        d["tasks"] = list(self.tasks)
        return d

    def corruption(self) -> dict[str, Any]:
        """The corruption parameters in one dict (for the manifest)."""
        return {"blatant_fraction": self.blatant_fraction, "error_steps": list(self.error_steps),
                "image": self.image, "hidden_labels": self.hidden_labels,
                "label_noise": self.label_noise, "label_flip": self.label_flip}


def expected_mean_label(p_clean: float, p_error: float, error_rate: float, error_steps=ERROR_STEPS) -> float:
    """E[accuracy] over a domain's step records (5 per chain, errors uniform over ``error_steps``).

    A correct chain's prefixes score p_clean (k = 1..4) and 1 (k = 5); a chain whose first
    error is at k scores p_clean before k, p_error from k to 4 and 0 at k = 5.
    """
    correct = ((NUM_STEPS - 1) * p_clean + 1.0) / NUM_STEPS
    wrong = float(np.mean([((k - 1) * p_clean + (NUM_STEPS - k) * p_error) / NUM_STEPS for k in error_steps]))
    return (1.0 - error_rate) * correct + error_rate * wrong


def default_domains() -> tuple[DomainSpec, ...]:
    """The six default domains (see the module docstring for why each has its quality).

    All share p_clean 0.85, p_error 0.05, error rate 0.5 and error steps 3..5, hence one label
    distribution (mean label :func:`expected_mean_label` = 0.70).
    """
    return (
        DomainSpec("trivial", 1.0, "Every error is the blatant value zero, the meta set's kind of error.",
                   blatant_fraction=1.0),
        DomainSpec("clean_easy", 0.85, "Clean labels; 25% of the errors are subtle (in-range values).",
                   blatant_fraction=0.75),
        DomainSpec("clean_hard", 0.7, "Clean labels; 50% of the errors subtle.", blatant_fraction=0.5),
        DomainSpec("label_noise", 0.4, "clean_hard with 50% of the step labels exchanged at random within a step.",
                   label_noise=0.5, blatant_fraction=0.5),
        DomainSpec("blank_image", 0.15, "Noise images; labels come from an independent hidden chain, so they are "
                   "uncorrelated with the text.", image="noise", hidden_labels=True, blatant_fraction=0.5),
        DomainSpec("flipped", 0.0, "clean_hard with correctness flipped: correct chains carry the labels of "
                   "erroneous ones and vice versa.", label_flip=True, blatant_fraction=0.5),
    )


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
