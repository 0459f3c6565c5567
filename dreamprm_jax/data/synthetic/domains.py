"""Training domains with planted quality, and their Monte-Carlo step labels.

Labels.  DreamPRM labels a chain prefix (steps 1..k) with the Monte-Carlo accuracy of a
policy that completes it ``times`` times: ``accuracy = score / times``.  Here the policy
is simulated::

    score_k ~ Binomial(times, p_clean)   if the prefix has no error (k < first_error)
    score_k ~ Binomial(times, p_error)   if it contains the error   (k >= first_error)
    score_5 = times * [chain correct]    (a complete chain has nothing left to roll out)

A domain's planted ``quality`` (higher = better for the clean meta distribution) is the
ordering the learned domain weights should recover; it is recorded in ``manifest.json``.
The default domains, best first:

=================  =======  =============================================================
name               quality  what is planted
=================  =======  =============================================================
clean_easy         1.00     clean labels, p_clean 0.95 (the sharpest clean/error contrast)
clean_medium       0.85     clean labels, p_clean 0.85
clean_hard         0.70     clean labels, p_clean 0.70 (harder questions: noisier labels,
                            clean prefixes pulled towards 0.5)
trivial            0.50     correct labels, but every error is blatant (the value "zero") and
                            at step 3: the domain is solved by a shortcut that does not
                            transfer to the meta chains (in-range values, errors at 3-5),
                            so it teaches little; it never teaches anything wrong, hence
                            above every corrupted domain and below every clean one.
label_noise        0.40     clean_medium with half of the step labels replaced by a
                            uniform random score in 0..times
blank_image        0.15     noise images; the chain's text is as usual but the labels
                            come from an independent hidden chain, so they are
                            uncorrelated with the text (the values were unverifiable)
flipped            0.00     clean_medium with accuracy -> 1 - accuracy (anti-correlated)
=================  =======  =============================================================

The ordering among the corrupted domains follows how far their expected label moves from
the clean one: label_noise keeps half the signal, blank_image none, flipped reverses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dreamprm_jax.data.synthetic.tasks import ERROR_STEPS, NUM_STEPS, TASKS

__all__ = ["DomainSpec", "default_domains", "rollout_scores", "corrupt_scores", "sample_first_error"]


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
      blatant_errors: wrong values are the out-of-range value 0 instead of in-range values.
      image: ``"informative"`` (the scene) or ``"noise"`` (random pixels).
      hidden_labels: labels come from an independent hidden chain, not from the text.
      label_noise: fraction of step records whose score is replaced by Uniform{0..times}.
      label_flip: accuracy -> 1 - accuracy (score -> times - score), applied last.
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
    blatant_errors: bool = False
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
        if not 0.0 <= self.error_rate <= 1.0 or not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"domain {self.name!r}: error_rate and label_noise must be in [0, 1]")
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
        return {"blatant_errors": self.blatant_errors, "error_steps": list(self.error_steps),
                "image": self.image, "hidden_labels": self.hidden_labels,
                "label_noise": self.label_noise, "label_flip": self.label_flip}


def default_domains() -> tuple[DomainSpec, ...]:
    """The seven default domains (see the module docstring for why each has its quality)."""
    return (
        DomainSpec("clean_easy", 1.0, "Clean Monte-Carlo labels; easy questions (p_clean 0.95).", p_clean=0.95),
        DomainSpec("clean_medium", 0.85, "Clean Monte-Carlo labels; medium questions (p_clean 0.85).", p_clean=0.85),
        DomainSpec("clean_hard", 0.7, "Clean Monte-Carlo labels; hard questions (p_clean 0.70).", p_clean=0.70),
        DomainSpec("trivial", 0.5, "Correct labels, but every error is the blatant value zero at step 3: a shortcut "
                   "that does not transfer to the meta chains.", p_clean=0.95, p_error=0.0,
                   error_steps=(3,), blatant_errors=True),
        DomainSpec("label_noise", 0.4, "clean_medium with 50% of the step labels replaced by uniform random scores.",
                   label_noise=0.5),
        DomainSpec("blank_image", 0.15, "Noise images; labels come from an independent hidden chain, so they are "
                   "uncorrelated with the text.", image="noise", hidden_labels=True),
        DomainSpec("flipped", 0.0, "clean_medium with flipped labels (accuracy -> 1 - accuracy).", label_flip=True),
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
    """Apply the domain's label corruption to all its step scores at once.

    Args:
      scores: int [R] clean scores of the domain's R step records.
    Returns:
      (scores int [R], randomised bool [R]): exactly ``round(label_noise * R)`` records get
      a Uniform{0..times} score, then (if ``label_flip``) every score becomes times - score.
    """
    scores = np.array(scores, dtype=np.int64, copy=True)  # [R]
    n = scores.shape[0]
    randomised = np.zeros(n, dtype=bool)  # [R]
    n_noisy = int(round(spec.label_noise * n))
    if n_noisy:
        idx = rng.permutation(n)[:n_noisy]
        randomised[idx] = True
        scores[idx] = rng.integers(0, times + 1, size=n_noisy)
    if spec.label_flip:
        scores = times - scores
    return scores, randomised
