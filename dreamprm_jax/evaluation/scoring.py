"""The PRM as a scoring callable: enumerate step prefixes, assemble the returned logits.

The model never enters this package. Whatever runs it (bucketing, batching, devices)
is a callable::

    score_steps(requests: Sequence[StepRequest]) -> step logits [len(requests)]

returning the PRM's pre-sigmoid logit for each request, in request order. A request
carries the candidate id (``"<question id>#<candidate index>"``), the text to score
(by default the question, a blank line, then the step prefix — exactly the prefixes
of the DreamPRM meta text ``question + "\\n\\n" + chain``) and the image path.

:func:`assemble_step_logits` puts per-request logits back into padded arrays::

    step_logits   [Q, N, S] float64   (0 where masked out)
    step_mask     [Q, N, S] bool      (step s of candidate n exists)
    candidate_mask [Q, N]   bool      (candidate n exists)

with Q questions, N = max candidates per question, S = max steps per candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from dreamprm_jax.evaluation.candidates import Question

__all__ = [
    "StepRequest",
    "StepScores",
    "assemble_chain_logits",
    "assemble_step_logits",
    "candidate_mask",
    "chain_requests",
    "default_prompt",
    "score_chains",
    "score_steps",
    "step_label_array",
    "step_requests",
]


class StepRequest(NamedTuple):
    """One sequence to score: a step prefix (or a whole chain) of one candidate."""

    candidate_id: str
    text: str
    image_path: str | None
    question_index: int
    candidate_index: int
    step_index: int          # 0-based; 0 for whole-chain requests


PromptFn = Callable[[Question, str], str]


def default_prompt(question: Question, prefix: str) -> str:
    """``question + "\\n\\n" + prefix`` (just the prefix when the question is blank).

    This is the DreamPRM meta text (``input = question + "\\n\\n" + chain``): splitting
    that whole string with ``data.steps.split_steps`` gives exactly these prompts.
    """
    return f"{question.question}\n\n{prefix}" if question.question.strip() else prefix


@dataclasses.dataclass(frozen=True)
class StepScores:
    """Step logits of every candidate, padded (shapes in the module docstring)."""

    step_logits: np.ndarray     # [Q, N, S] float64
    step_mask: np.ndarray       # [Q, N, S] bool
    candidate_mask: np.ndarray  # [Q, N] bool


def _dims(questions: Sequence[Question]) -> tuple[int, int, int]:
    Q = len(questions)
    N = max((q.num_candidates for q in questions), default=0)
    S = max((c.num_steps for q in questions for c in q.candidates), default=0)
    return Q, N, S


def candidate_mask(questions: Sequence[Question]) -> np.ndarray:
    """[Q, N] bool: candidate n of question q exists."""
    Q, N, _ = _dims(questions)
    mask = np.zeros((Q, N), dtype=bool)
    for qi, q in enumerate(questions):
        mask[qi, : q.num_candidates] = True
    return mask


def step_requests(questions: Sequence[Question], *, prompt_fn: PromptFn = default_prompt) -> list[StepRequest]:
    """Every step prefix of every candidate, question-major, then candidate, then step."""
    out = []
    for qi, q in enumerate(questions):
        for ci, c in enumerate(q.candidates):
            for si, prefix in enumerate(c.prefixes):
                out.append(StepRequest(f"{q.id}#{ci}", prompt_fn(q, prefix), q.image_path, qi, ci, si))
    return out


def chain_requests(questions: Sequence[Question], *, prompt_fn: PromptFn = default_prompt) -> list[StepRequest]:
    """One request per candidate with its whole text (for outcome-only scoring)."""
    return [StepRequest(f"{q.id}#{ci}", prompt_fn(q, c.text), q.image_path, qi, ci, 0)
            for qi, q in enumerate(questions) for ci, c in enumerate(q.candidates)]


def _check_logits(requests: Sequence[StepRequest], logits) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64).reshape(-1)     # [R]
    if values.shape[0] != len(requests):
        raise ValueError(f"assemble: expected one logit per request ({len(requests)}), got "
                         f"{values.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        r = requests[int(bad[0])]
        raise ValueError(f"assemble: non-finite logit {values[bad[0]]} for request {int(bad[0])} "
                         f"(candidate {r.candidate_id}, step {r.step_index + 1}); expected finite "
                         f"logits ({bad.size} bad in total)")
    return values


def assemble_step_logits(questions: Sequence[Question], requests: Sequence[StepRequest], logits) -> StepScores:
    """Scatter per-request logits [R] into :class:`StepScores`; every step exactly once."""
    values = _check_logits(requests, logits)
    Q, N, S = _dims(questions)
    z = np.zeros((Q, N, S), dtype=np.float64)
    filled = np.zeros((Q, N, S), dtype=bool)
    for r, v in zip(requests, values):
        key = (r.question_index, r.candidate_index, r.step_index)
        if filled[key]:
            raise ValueError(f"assemble: step {r.step_index + 1} of candidate {r.candidate_id} "
                             "scored twice; expected each step prefix once")
        z[key] = v
        filled[key] = True
    expected = np.zeros((Q, N, S), dtype=bool)
    for qi, q in enumerate(questions):
        for ci, c in enumerate(q.candidates):
            expected[qi, ci, : c.num_steps] = True
    missing = np.argwhere(expected & ~filled)
    if missing.size:
        qi, ci, si = (int(x) for x in missing[0])
        raise ValueError(f"assemble: no logit for step {si + 1} of candidate "
                         f"{questions[qi].id}#{ci} ({len(missing)} steps missing in total)")
    if (filled & ~expected).any():
        raise ValueError("assemble: a request names a step that the candidate does not have")
    return StepScores(step_logits=z, step_mask=filled, candidate_mask=candidate_mask(questions))


def assemble_chain_logits(questions: Sequence[Question], requests: Sequence[StepRequest], logits) -> np.ndarray:
    """Per-candidate logits [Q, N] (-inf where no candidate) from whole-chain requests."""
    values = _check_logits(requests, logits)
    Q, N, _ = _dims(questions)
    out = np.full((Q, N), -np.inf)
    seen = np.zeros((Q, N), dtype=bool)
    for r, v in zip(requests, values):
        if seen[r.question_index, r.candidate_index]:
            raise ValueError(f"assemble: candidate {r.candidate_id} scored twice")
        out[r.question_index, r.candidate_index] = v
        seen[r.question_index, r.candidate_index] = True
    if (candidate_mask(questions) & ~seen).any():
        qi, ci = (int(x) for x in np.argwhere(candidate_mask(questions) & ~seen)[0])
        raise ValueError(f"assemble: no logit for candidate {questions[qi].id}#{ci}")
    return out


def _call_chunked(fn, requests, chunk_size):
    if chunk_size is None or chunk_size >= len(requests):
        return np.asarray(fn(requests), dtype=np.float64).reshape(-1)
    parts = [np.asarray(fn(requests[i:i + chunk_size]), dtype=np.float64).reshape(-1)
             for i in range(0, len(requests), chunk_size)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def score_steps(questions: Sequence[Question], score_fn: Callable[[Sequence[StepRequest]], object], *,
                chunk_size: int | None = None, prompt_fn: PromptFn = default_prompt) -> StepScores:
    """Enumerate step prefixes, call ``score_fn`` (in chunks if asked) and assemble."""
    requests = step_requests(questions, prompt_fn=prompt_fn)
    return assemble_step_logits(questions, requests, _call_chunked(score_fn, requests, chunk_size))


def score_chains(questions: Sequence[Question], score_fn: Callable[[Sequence[StepRequest]], object], *,
                 chunk_size: int | None = None, prompt_fn: PromptFn = default_prompt) -> np.ndarray:
    """Outcome-only scoring: each whole chain scored once; logits [Q, N]."""
    requests = chain_requests(questions, prompt_fn=prompt_fn)
    return assemble_chain_logits(questions, requests, _call_chunked(score_fn, requests, chunk_size))


def step_label_array(questions: Sequence[Question]) -> np.ndarray:
    """[Q, N, S] int8: 1 correct step, 0 incorrect, -1 neutral / unlabelled / padding."""
    Q, N, S = _dims(questions)
    labels = np.full((Q, N, S), -1, dtype=np.int8)
    for qi, q in enumerate(questions):
        for ci, c in enumerate(q.candidates):
            if c.step_labels is not None:
                for si, v in enumerate(c.step_labels):
                    if v is not None:
                        labels[qi, ci, si] = v
    return labels
