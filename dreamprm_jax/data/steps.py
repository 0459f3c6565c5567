"""Splitting a structured chain of thought into step prefixes.

A DreamPRM meta chain is one string::

    <question> Step 1: ... Step 2: ... Step S: ... Final answer: X

The upper-level loss scores every *prefix* of the chain: prefix ``k`` is all the text
before the marker of step ``k + 1`` (it therefore contains the question and steps
``1..k``), and the last prefix is the text before ``Final answer``.  The reference
(DreamPRM ``data.py``: ``find_max_step`` / ``split_step``) counts steps with the
case-insensitive regex ``Step[\\s:]*(\\d+)`` and sets S to the largest step number.

Deviations from the reference, all deliberate (``mode="reference"`` reproduces it):

1. Markers are matched with the same case-insensitive regex that counts them, so
   ``"step 2"`` splits the chain exactly where it is counted (the reference counts
   case-insensitively but splits on the case-sensitive ``"Step 2"``, which silently gives
   the *whole* chain as prefix 1).
2. A marker must end at a digit boundary: ``"Step 1"`` does not match inside
   ``"Step 10"`` (the reference uses plain substring tests).
3. The last prefix is the text before the reference's final-answer marker, the first
   ``Final answer`` *as written* (case-sensitive, as the reference's ``text.split("Final
   answer")[0]``): a ``### Final Answer`` header before it is reasoning and stays in the
   prefix (DreamPRM's released meta chains have such headers; cutting there would drop
   13 to 167 characters of the last step).  When there is no ``Final answer``, the last
   prefix is the whole chain (the reference returns ``""`` there).

On chains that number their steps ``Step 1`` .. ``Step S`` in order and end with ``Final
answer``, as all of DreamPRM's released chains do, strict and reference prefixes are equal.
4. Step numbers must be exactly ``1..S``; a gap or a chain with no steps raises
   :class:`StepError` (the records loader turns it into a bad record).  The reference
   would score invented or duplicated prefixes.
"""

from __future__ import annotations

import re

__all__ = ["FINAL_ANSWER", "STEP_PATTERN", "StepError", "find_max_step", "step_numbers", "split_steps", "split_step_reference"]

STEP_PATTERN = re.compile(r"Step[\s:]*(\d+)", re.IGNORECASE)
FINAL_ANSWER = "Final answer"  # the reference's marker, matched as written


class StepError(ValueError):
    """A chain whose steps cannot be split (no steps, gaps, empty prefix)."""


def step_numbers(text: str) -> list[int]:
    """All step numbers in ``text`` in order of appearance (regex ``Step[\\s:]*(\\d+)``, any case)."""
    return [int(m.group(1)) for m in STEP_PATTERN.finditer(text)]


def find_max_step(text: str) -> int:
    """S = largest step number in ``text``; 0 when there is none (reference ``find_max_step``)."""
    numbers = step_numbers(text)
    return max(numbers) if numbers else 0


def split_step_reference(step: int, text: str) -> str:
    """The reference ``split_step(step, text)``, quirks included (see module docstring)."""
    s, s_next = f"Step {step}", f"Step {step + 1}"
    if s_next in text:
        return text.split(s_next)[0]
    if "Final answer" in text and s in text:
        return text.split("Final answer")[0]
    return ""


def _marker(step: int) -> re.Pattern:
    return re.compile(r"Step[\s:]*0*" + str(step) + r"(?!\d)", re.IGNORECASE)


def split_steps(text: str, mode: str = "strict") -> list[str]:
    """The S step prefixes of a chain, prefix k (1-based) = text before the step k+1 marker.

    Args:
      text: the chain, question included.
      mode: ``"strict"`` (default; see the module docstring for the four deviations) or
        ``"reference"`` (byte-for-byte the reference behaviour, no checks at all).

    Returns:
      ``[prefix_1, ..., prefix_S]``; every prefix is a non-empty string in strict mode.

    Raises:
      StepError: (strict mode) no steps, step numbers that are not exactly ``1..S``, or an
        empty prefix.
    """
    if mode == "reference":
        return [split_step_reference(k + 1, text) for k in range(find_max_step(text))]
    if mode != "strict":
        raise ValueError(f"split_steps: mode must be 'strict' or 'reference', got {mode!r}")
    numbers = step_numbers(text)
    if not numbers:
        raise StepError("no 'Step <n>' marker found (expected 'Step 1: ... Step S: ... Final answer: ...')")
    num_steps = max(numbers)
    missing = sorted(set(range(1, num_steps + 1)) - set(numbers))
    if missing:
        raise StepError(f"step numbers must run 1..{num_steps} without gaps; missing {missing}")
    if 0 in numbers:
        raise StepError("step numbers start at 1; found 'Step 0'")
    final = text.find(FINAL_ANSWER)
    end = final if final >= 0 else len(text)
    prefixes = []
    for k in range(1, num_steps + 1):
        if k < num_steps:
            nxt = _marker(k + 1).search(text)
            cut = nxt.start()
        else:
            cut = end
        prefix = text[:cut]
        if not _marker(k).search(prefix) or not prefix.strip():
            raise StepError(f"step {k} has an empty prefix (its marker does not precede step {k + 1} / 'Final answer')")
        prefixes.append(prefix)
    return prefixes
