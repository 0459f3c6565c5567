"""Questions about the synthetic images and five-step chains of thought about them.

A chain has the DreamPRM structure, one line per step::

    Step 1: <restate the question>
    Step 2: <evidence read from the image: the target value v>
    Step 3: <background, restating the value>
    Step 4: <reasoning with the value>
    Step 5: <conclusion>
    Final answer: <value of step 5>

Steps 3, 4 and 5 each state the value they use.  A *planted error* at step k (k in 3..5):
from step k on the chain uses a wrong value w != v, and the final answer is w.  The wrong
value has one of three kinds (:data:`ERROR_TYPES`), chosen so that a small PRM can learn
two of them from the text and the third marks the limit of what it learns:

* ``A`` (blatant): the value 0, "zero".  No question's answer and no correct chain ever
  states it, so one token gives it away; a small PRM learns it within a few dozen
  iterations.
* ``B`` (out of range): a value in 10..15 ("ten" .. "fifteen"), outside every task's range
  (bars and counts 1..9, sides 3..8).  Six words instead of one and never the answer:
  learnable from the text, less obvious than A, and the kind a misleading training
  domain mislabels (see :mod:`.domains`).
* ``C`` (contradiction): an in-range value (also different from the image's other
  quantity), visible only as a contradiction with the value step 2 read from the image (a
  copy-consistency check the demo PRM does not learn on a CPU budget).

Values are written as words ("seven"; the final answer in digits), so they never share a
token with the step markers ("Step 3"), and no template contains a number word of its
own.  Step 2 states exactly one value, so a prefix is consistent iff it names one value.
Texts are short on purpose (44-100 tokens per step prefix, chat template included, with
the demo's offline BPE).  Every step has three paraphrases (3^5 = 243 texts per chain
meaning), so that a position in the template is not a label and the generator can keep
the chain texts of the training, meta and test sets disjoint (:func:`text_split`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dreamprm_jax.data.synthetic import images

__all__ = [
    "TASKS", "NUM_STEPS", "STEP_SEPARATOR", "ERROR_TYPES", "BLATANT_VALUE", "OUT_OF_RANGE_VALUES", "SPLITS",
    "Problem", "Chain", "sample_problem", "sample_wrong_value", "error_type_of", "make_chain", "make_chain_in_split", "text_split",
    "render_problem", "prefix_text", "chain_text",
]

TASKS: tuple[str, ...] = ("bars", "count", "shapes")
NUM_STEPS = 5
ERROR_STEPS: tuple[int, ...] = (3, 4, 5)
STEP_SEPARATOR = "\n"
ERROR_TYPES: tuple[str, ...] = ("A", "B", "C")
BLATANT_VALUE = 0  # error type A
OUT_OF_RANGE_VALUES: tuple[int, ...] = (10, 11, 12, 13, 14, 15)  # error type B

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen")
_SHAPE_NAMES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon"}
_VALUE_RANGE = {"bars": (1, 9), "count": (1, 9), "shapes": (3, 8)}

# Per task: question, then three paraphrases per step.  Slots: t target, v true value,
# x the value this step states, c colour (shapes); d / u (the image's other quantity) are
# available but unused, so that step 2 states one number.
_TEMPLATES: dict[str, dict[str, Any]] = {
    "bars": {
        "question": "What is the height of the {t} bar?",
        "steps": (
            ("Find the {t} bar.", "We need the {t} bar.", "Look for the {t} bar."),
            ("The {t} bar is at {v}.", "The chart shows {t} at {v}.", "The {t} bar stops at {v}."),
            ("Heights use the axis, so {x}.", "Read on the axis: {x}.", "The axis mark is {x}."),
            ("The {t} bar reaches {x}.", "Its top is at {x}.", "The bar ends at {x}."),
            ("So the height is {x}.", "Therefore it is {x}.", "The answer is {x}."),
        ),
    },
    "count": {
        "question": "How many {t} squares are in the grid?",
        "steps": (
            ("Count the {t} squares.", "We count {t} squares.", "Look at the {t} squares."),
            ("The grid has {v} {t} squares.", "There are {v} {t} squares.", "I see {v} {t} squares."),
            ("Each counts once, so {x}.", "Counting gives {x}.", "Tallied: {x}."),
            ("The {t} count is {x}.", "We found {x}.", "That makes {x}."),
            ("So there are {x}.", "Therefore the count is {x}.", "The answer is {x}."),
        ),
    },
    "shapes": {
        "question": "How many sides does the shape have?",
        "steps": (
            ("Count the sides.", "We need the sides.", "Look at the edges."),
            ("It is a {c} {t} with {v} sides.", "We see a {t} of {v} sides.", "The {c} shape is a {t}, {v} sides."),
            ("A {t} has {x} sides.", "Polygons by sides: {x}.", "Its side count is {x}."),
            ("It has {x} corners.", "Edges give {x}.", "Corners match: {x}."),
            ("So it has {x} sides.", "Therefore {x}.", "The answer is {x}."),
        ),
    },
}
_PARAPHRASES = 3

#: The three sets a chain text can belong to; :func:`text_split` assigns each text to one.
SPLITS: tuple[str, ...] = ("train", "meta", "test")
# crc32(text) % 8 -> split: half of the texts may be training chains, 1/8 meta, 3/8 test
_SPLIT_OF_BUCKET: tuple[str, ...] = ("train",) * 4 + ("meta",) + ("test",) * 3
_MAX_DRAWS = 10_000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question about one image.

    ``value`` (= ``answer``) is the target quantity, ``distractor_value`` the other number
    step 2 states; ``scene`` holds the renderer arguments.
    """

    task: str
    question: str
    answer: int
    target: str
    distractor: str
    distractor_value: int
    scene: dict = dataclasses.field(compare=False, hash=False)

    @property
    def value_range(self) -> tuple[int, int]:
        return _VALUE_RANGE[self.task]


@dataclasses.dataclass(frozen=True)
class Chain:
    """Five step bodies (without the ``Step k:`` marker), the final answer, the planted error.

    ``first_error`` is the 1-based step of the first wrong value, or None for a correct chain;
    ``error_type`` its kind (one of :data:`ERROR_TYPES`), or None.
    """

    steps: tuple[str, ...]
    answer: str
    first_error: int | None
    error_type: str | None = None

    @property
    def correct(self) -> bool:
        return self.first_error is None

    def step_labels(self) -> list[int]:
        """1 for steps before the first error, 0 from it on."""
        k = self.first_error or NUM_STEPS + 1
        return [1 if s < k else 0 for s in range(1, NUM_STEPS + 1)]


def prefix_text(steps: Sequence[str], k: int) -> str:
    """``"Step 1: s1\\nStep 2: s2\\n...Step k: sk\\n"`` (each step ends with the separator).

    The trailing separator makes ``question + "\\n\\n" + prefix_text(steps, k)`` byte-equal
    to prefix k of the full meta chain as :func:`dreamprm_jax.data.steps.split_steps`
    cuts it (the text before the ``Step k+1`` marker), so training texts and meta step
    prefixes end on the same token.
    """
    if not 1 <= k <= len(steps):
        raise ValueError(f"prefix_text: k must be in 1..{len(steps)}, got {k}")
    return "".join(f"Step {i}: {body}{STEP_SEPARATOR}" for i, body in enumerate(steps[:k], start=1))


def chain_text(chain: Chain) -> str:
    """The full chain: all steps, then ``Final answer: X``."""
    return prefix_text(chain.steps, len(chain.steps)) + f"Final answer: {chain.answer}"


def _choice(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def sample_problem(rng: np.random.Generator, tasks: Sequence[str] = TASKS) -> Problem:
    """A random question (task chosen uniformly from ``tasks``) with its scene."""
    task = _choice(rng, tuple(tasks))
    if task == "bars":
        colours = tuple(str(c) for c in rng.permutation(["red", "green", "blue"]))
        values = tuple(int(v) for v in rng.choice(np.arange(1, 10), size=3, replace=False))
        ti, di = (int(i) for i in rng.choice(3, size=2, replace=False))
        return Problem(task, _TEMPLATES[task]["question"].format(t=colours[ti]), values[ti], colours[ti],
                       colours[di], values[di], {"values": values, "colours": colours})
    if task == "count":
        target, other = (str(c) for c in rng.choice(list(images.COLOURS), size=2, replace=False))
        n = int(rng.integers(1, 10))
        m_options = [m for m in range(1, min(6, 16 - n) + 1) if m != n]
        m = int(_choice(rng, m_options))
        cells: list[str | None] = [None] * 16
        order = rng.permutation(16)
        for i in order[:n]:
            cells[int(i)] = target
        for i in order[n:n + m]:
            cells[int(i)] = other
        return Problem(task, _TEMPLATES[task]["question"].format(t=target), n, target, other, m,
                       {"cells": tuple(cells)})
    if task == "shapes":
        sides = int(rng.integers(3, 9))
        colour = str(_choice(rng, list(images.COLOURS)))
        dots = int(_choice(rng, [d for d in range(1, 5) if d != sides]))
        rotation = float(rng.uniform(0.0, 2 * math.pi))
        return Problem(task, _TEMPLATES[task]["question"], sides, _SHAPE_NAMES[sides], "dots", dots,
                       {"sides": sides, "colour": colour, "dots": dots, "rotation": rotation})
    raise ValueError(f"sample_problem: unknown task {task!r}; expected one of {TASKS}")


def sample_wrong_value(problem: Problem, rng: np.random.Generator, error_type: str) -> int:
    """A wrong value of the given kind (see the module docstring).

    ``"A"``: 0; ``"B"``: one of 10..15; ``"C"``: in the task's range and different from both
    numbers of the image (the answer and the distractor).
    """
    if error_type == "A":
        return BLATANT_VALUE
    if error_type == "B":
        return int(_choice(rng, OUT_OF_RANGE_VALUES))
    if error_type == "C":
        lo, hi = problem.value_range
        options = [w for w in range(lo, hi + 1) if w not in (problem.answer, problem.distractor_value)]
        return int(_choice(rng, options))
    raise ValueError(f"sample_wrong_value: error_type must be one of {ERROR_TYPES}, got {error_type!r}")


def error_type_of(problem: Problem, wrong_value: int) -> str:
    """The kind (``"A"``, ``"B"`` or ``"C"``) of a wrong value for ``problem``."""
    if wrong_value == BLATANT_VALUE:
        return "A"
    if wrong_value in OUT_OF_RANGE_VALUES:
        return "B"
    lo, hi = problem.value_range
    if lo <= wrong_value <= hi and wrong_value != problem.answer:
        return "C"
    raise ValueError(f"error_type_of: {wrong_value} is not a wrong value for a {problem.task} question with "
                     f"answer {problem.answer}")


def make_chain(problem: Problem, rng: np.random.Generator, first_error: int | None = None,
               wrong_value: int | None = None) -> Chain:
    """A chain for ``problem``; with ``first_error = k`` steps k..5 and the answer use ``wrong_value``.

    The paraphrase of each step is drawn from ``rng`` (5 draws, whatever ``first_error``).
    """
    error_type = None
    if first_error is not None:
        if first_error not in ERROR_STEPS:
            raise ValueError(f"make_chain: first_error must be one of {ERROR_STEPS} (steps that restate the "
                             f"value), got {first_error}")
        if wrong_value is None or wrong_value == problem.answer:
            raise ValueError(f"make_chain: an error chain needs a wrong_value != {problem.answer}, got {wrong_value}")
        error_type = error_type_of(problem, wrong_value)
    templates = _TEMPLATES[problem.task]["steps"]
    slots = {"t": problem.target, "v": NUMBER_WORDS[problem.answer], "d": problem.distractor,
             "u": NUMBER_WORDS[problem.distractor_value],
             "c": problem.scene.get("colour", "")}
    variants = rng.integers(_PARAPHRASES, size=NUM_STEPS)
    steps = []
    x = problem.answer
    for k in range(1, NUM_STEPS + 1):
        if first_error is not None and k >= first_error:
            x = wrong_value
        steps.append(templates[k - 1][int(variants[k - 1])].format(x=NUMBER_WORDS[x], **slots))
    return Chain(tuple(steps), str(x), first_error, error_type)


def text_split(text: str) -> str:
    """The one split (``"train"``, ``"meta"`` or ``"test"``) whose files may hold this chain text.

    A fixed hash of the text (crc32 mod 8: half train, 1/8 meta, 3/8 test), so the sets'
    chain texts are disjoint by construction, whatever their sizes; the hash carries no
    meaning a PRM could learn.
    """
    return _SPLIT_OF_BUCKET[zlib.crc32(text.encode("utf-8")) % len(_SPLIT_OF_BUCKET)]


def make_chain_in_split(problem: Problem, rng: np.random.Generator, split: str, first_error: int | None = None,
                        wrong_value: int | None = None) -> Chain:
    """:func:`make_chain`, paraphrases redrawn until ``text_split(chain_text(chain)) == split``.

    Each draw succeeds with probability 1/8 or more and every chain meaning has 243 texts, so
    this ends after a few draws (8 at most on average).
    """
    if split not in SPLITS:
        raise ValueError(f"make_chain_in_split: split must be one of {SPLITS}, got {split!r}")
    for _ in range(_MAX_DRAWS):
        chain = make_chain(problem, rng, first_error, wrong_value)
        if text_split(chain_text(chain)) == split:
            return chain
    raise RuntimeError(f"make_chain_in_split: no paraphrase of a {problem.task} chain (first error {first_error}, "
                       f"value {wrong_value}) fell in split {split!r} in {_MAX_DRAWS} draws")


def render_problem(problem: Problem, size: int) -> Image.Image:
    """The image the question is about."""
    s = problem.scene
    if problem.task == "bars":
        return images.render_bars(s["values"], s["colours"], size)
    if problem.task == "count":
        return images.render_count(s["cells"], size)
    if problem.task == "shapes":
        return images.render_shape(s["sides"], s["colour"], s["dots"], s["rotation"], size)
    raise ValueError(f"render_problem: unknown task {problem.task!r}")
