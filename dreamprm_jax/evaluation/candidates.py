"""Best-of-N candidate files: format, step splitting and up-front validation.

File format (a JSON array, or JSON Lines with one object per line)::

    {"id": str, "benchmark": str, "image_path": str | null, "question": str,
     "answer": str, "choices": [str] (optional),
     "candidates": [{"text": "Step 1: ... Step k: ... Final answer: X",
                     "correct": bool (optional),
                     "step_labels": [0 | 1 | null, ...] (optional)}]}

``step_labels[k]`` is 1 for a correct step, 0 for an incorrect one and ``null`` for a
neutral / unlabelled step (VisualProcessBench's "neutral" label); when present it must
have one entry per step found by :func:`step_prefixes`.

The file is read by :func:`dreamprm_jax.data.jsonfiles.read_json_records`, the reader of
training records files too. Every record is checked before anything is scored. A problem
is reported as a :class:`~dreamprm_jax.data.jsonfiles.RecordError` (``CandidateError`` is
the same class) naming the file, the record index (and line for JSON Lines), the record
id, the field and what was expected. With ``on_bad_record="skip"`` the
record is dropped instead and counted under its reason in :class:`LoadReport`
(reasons are the keys of :data:`SKIP_REASONS`).

Step splitting is the project's one implementation, :func:`dreamprm_jax.data.steps.split_steps`
(strict mode), so best-of-N prefixes are byte-for-byte the prefixes the meta loss was
trained on: steps are the markers of the case-insensitive regex ``Step[\\s:]*(\\d+)``,
the prefix of step k is the text before the marker of step k+1, and the last prefix is
the text before "Final answer" (the whole text when there is none). Chains whose step
numbers are not exactly 1..S are rejected ("bad_steps"), as the training loader does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from dreamprm_jax.data.jsonfiles import (
    BROKEN_LINE,
    DUPLICATE_ID,
    MISSING_FIELD,
    MISSING_IMAGE,
    NOT_AN_OBJECT,
    PATH_ESCAPE,
    WRONG_TYPE,
    ImagePathEscape,
    JsonRecord,
    RecordError,
    read_json_records,
    resolve_image_path,
)
from dreamprm_jax.data.jsonfiles import short_repr as _short
from dreamprm_jax.data.steps import StepError, find_max_step, split_steps

__all__ = [
    "SKIP_REASONS",
    "Candidate",
    "CandidateError",
    "LoadReport",
    "Question",
    "RecordError",
    "StepError",
    "find_max_step",
    "load_candidates",
    "parse_records",
    "step_prefixes",
]

#: Reasons a record can be rejected, with what was expected (keys of LoadReport.skipped).
#: The reasons shared with training records files have the same names there.
SKIP_REASONS: dict[str, str] = {
    BROKEN_LINE: "a line that parses as JSON",
    NOT_AN_OBJECT: "a JSON object",
    MISSING_FIELD: "every required field present",
    WRONG_TYPE: "fields of the documented types",
    "missing_answer": "a non-empty gold answer",
    "empty_candidates": "a non-empty list of candidates",
    "candidate_without_steps": "candidate text with at least one 'Step k' marker",
    "bad_steps": "step markers numbered exactly 1..S, each with a non-empty prefix",
    "bad_step_labels": "step_labels of 0/1/null, one per step",
    MISSING_IMAGE: "image_path pointing to an existing file",
    PATH_ESCAPE: "image_path inside the image root",
    DUPLICATE_ID: "ids unique within the file",
}

#: Candidate files report problems with the records files' error type.
CandidateError = RecordError


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One chain of thought.

    ``prefixes[k]`` is the text of steps 1..k+1 (see :func:`step_prefixes`);
    ``step_labels`` has one entry per prefix (1 correct, 0 incorrect, None neutral).
    """

    text: str
    prefixes: tuple[str, ...]
    correct: bool | None = None
    step_labels: tuple[int | None, ...] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.prefixes)


@dataclasses.dataclass(frozen=True)
class Question:
    """One validated record. ``image_path`` is absolute (resolved) or None."""

    id: str
    benchmark: str
    image_path: str | None
    question: str
    answer: str
    choices: tuple[str, ...] | None
    candidates: tuple[Candidate, ...]
    record_index: int = 0

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_candidates` kept and dropped.

    ``skipped`` maps a reason (key of SKIP_REASONS) to a count; ``messages`` holds the
    full error text of every skipped record, in file order.
    """

    path: str
    num_records: int
    num_loaded: int
    skipped: Mapping[str, int]
    messages: tuple[str, ...] = ()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "num_records": self.num_records, "num_loaded": self.num_loaded,
                "num_skipped": self.num_skipped, "skipped": dict(self.skipped),
                "messages": list(self.messages)}


# ---------------------------------------------------------------------------------------
# Step splitting (shared with training: dreamprm_jax.data.steps)
# ---------------------------------------------------------------------------------------


def step_prefixes(text: str) -> list[str]:
    """The step prefixes ``[steps 1..1, ..., steps 1..S]`` of one chain (not stripped).

    ``dreamprm_jax.data.steps.split_steps(text, "strict")``; raises ``StepError`` (a
    ValueError) for a chain without steps or with step numbers other than 1..S.

    >>> step_prefixes("Step 1: a. Step 2: b. Final answer: c")
    ['Step 1: a. ', 'Step 1: a. Step 2: b. ']
    """
    return split_steps(text, mode="strict")


# ---------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------


class _Reject(Exception):
    """A record problem, before the loader adds the file, record, line and id."""

    def __init__(self, reason: str, field: str | None, expected: str, got: str | None = None):
        super().__init__(f"expected {expected}" + (f", got {got}" if got is not None else ""))
        self.reason, self.field, self.expected, self.got = reason, field, expected, got


def _resolve_image(image_path: str, image_root: str, check_exists: bool) -> str:
    try:
        full = resolve_image_path(image_path, image_root)
    except ImagePathEscape as e:
        raise _Reject(PATH_ESCAPE, "image_path", e.expected, e.got) from None
    if check_exists and not os.path.isfile(full):
        raise _Reject(MISSING_IMAGE, "image_path", "an existing image file",
                      f"{image_path!r} (resolved to {full!r}, which does not exist)")
    return full


def _validate(record: Any, image_root: str, check_images: bool, record_index: int) -> Question:
    if not isinstance(record, dict):
        raise _Reject(NOT_AN_OBJECT, None, "a JSON object", type(record).__name__)

    def req_str(name: str, *, allow_empty: bool = True) -> str:
        if name not in record:
            raise _Reject(MISSING_FIELD, name, "a string", "the field missing")
        value = record[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("id", "answer"):
            value = str(value)  # numeric ids / numeric gold answers are common; accept them
        if not isinstance(value, str):
            raise _Reject(WRONG_TYPE, name, "a string", _short(value))
        if not allow_empty and not value.strip():
            raise _Reject(MISSING_FIELD, name, "a non-empty string", "''")
        return value

    qid = req_str("id", allow_empty=False)
    benchmark = req_str("benchmark", allow_empty=False)
    question = req_str("question")
    if "answer" not in record or record["answer"] is None:
        raise _Reject("missing_answer", "answer", "a non-empty gold answer", "the field missing or null")
    answer = req_str("answer")
    if not answer.strip():
        raise _Reject("missing_answer", "answer", "a non-empty gold answer", "''")

    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise _Reject(WRONG_TYPE, "choices", "a list of strings", _short(choices))
        if len(choices) > 26:
            raise _Reject(WRONG_TYPE, "choices", "at most 26 choices (A-Z)", str(len(choices)))
        choices = tuple(choices)

    if "image_path" not in record:
        raise _Reject(MISSING_FIELD, "image_path", "a string or null", "the field missing")
    image_path = record["image_path"]
    if image_path is not None:
        if not isinstance(image_path, str) or not image_path.strip():
            raise _Reject(WRONG_TYPE, "image_path", "a non-empty string or null", _short(image_path))
        image_path = _resolve_image(image_path, image_root, check_images)

    if "candidates" not in record:
        raise _Reject(MISSING_FIELD, "candidates", "a list of candidates", "the field missing")
    raw_cands = record["candidates"]
    if not isinstance(raw_cands, list):
        raise _Reject(WRONG_TYPE, "candidates", "a list of candidates", _short(raw_cands))
    if not raw_cands:
        raise _Reject("empty_candidates", "candidates", "at least one candidate", "[]")
    candidates = []
    for j, c in enumerate(raw_cands):
        field = f"candidates[{j}]"
        if not isinstance(c, dict):
            raise _Reject(WRONG_TYPE, field, "an object with a 'text' field", _short(c))
        text = c.get("text")
        if not isinstance(text, str):
            raise _Reject(MISSING_FIELD if text is None else WRONG_TYPE, f"{field}.text", "a string", _short(text))
        if find_max_step(text) == 0:
            raise _Reject("candidate_without_steps", f"{field}.text", "at least one 'Step k' marker", _short(text))
        try:
            prefixes = step_prefixes(text)
        except StepError as e:
            raise _Reject("bad_steps", f"{field}.text", f"steps numbered 1..S ({e})", _short(text)) from None
        correct = c.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise _Reject(WRONG_TYPE, f"{field}.correct", "true/false", _short(correct))
        labels = c.get("step_labels")
        if labels is not None:
            if (not isinstance(labels, list)
                    or not all(v is None or (isinstance(v, int) and v in (0, 1)) for v in labels)):
                raise _Reject("bad_step_labels", f"{field}.step_labels", "a list of 0/1/null", _short(labels))
            if len(labels) != len(prefixes):
                raise _Reject("bad_step_labels", f"{field}.step_labels",
                              f"one label per step ({len(prefixes)} steps found in the text)", f"{len(labels)} labels")
            labels = tuple(None if v is None else int(v) for v in labels)
        candidates.append(Candidate(text=text, prefixes=tuple(prefixes), correct=correct,
                                    step_labels=labels))
    return Question(id=qid, benchmark=benchmark, image_path=image_path, question=question,
                    answer=answer, choices=choices, candidates=tuple(candidates),
                    record_index=record_index)


def parse_records(
    records: Iterable[Any],
    *,
    source: str = "<records>",
    image_root: str | None = None,
    on_bad_record: Literal["error", "skip"] = "error",
    check_images: bool = True,
    line_numbers: Sequence[int | None] | None = None,
) -> tuple[list[Question], LoadReport]:
    """Validate already-parsed records (see :func:`load_candidates` for the arguments)."""
    records = list(records)
    lines = line_numbers if line_numbers is not None else [None] * len(records)
    entries = [JsonRecord(i, line, record) for i, (line, record) in enumerate(zip(lines, records))]
    return _parse(entries, source, image_root, on_bad_record, check_images)


def _parse(entries: Sequence[JsonRecord], source: str, image_root: str | None,
           on_bad_record: str, check_images: bool) -> tuple[list[Question], LoadReport]:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record: expected 'error' or 'skip', got {on_bad_record!r}")
    root = image_root if image_root is not None else os.getcwd()
    questions: list[Question] = []
    skipped: dict[str, int] = {}
    messages: list[str] = []
    seen: dict[str, int] = {}
    for entry in entries:
        i, record = entry.index, entry.value
        rid = record.get("id") if isinstance(record, dict) else None
        try:
            if entry.error is not None:
                raise entry.error
            q = _validate(record, root, check_images, i)
            if q.id in seen:
                raise _Reject(DUPLICATE_ID, "id", f"a unique id (first used by record {seen[q.id]})", repr(q.id))
        except _Reject as r:
            err = RecordError(source, i, r.field, r.expected, r.reason, line=entry.line, got=r.got, id=rid)
        except RecordError as e:
            err = e
        else:
            seen[q.id] = i
            questions.append(q)
            continue
        if on_bad_record == "error":
            raise err from None
        skipped[err.reason] = skipped.get(err.reason, 0) + 1
        messages.append(str(err))
    report = LoadReport(path=source, num_records=len(entries), num_loaded=len(questions),
                        skipped=dict(sorted(skipped.items())), messages=tuple(messages))
    return questions, report


def load_candidates(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    on_bad_record: Literal["error", "skip"] = "error",
    check_images: bool = True,
) -> tuple[list[Question], LoadReport]:
    """Load and validate a best-of-N candidate file (JSON array or JSON Lines).

    Args:
      path: the candidate file, read by :func:`dreamprm_jax.data.jsonfiles.read_json_records`.
      image_root: directory that relative ``image_path`` values are resolved against
        and that no resolved image may escape (symlinks resolved; ``..``, an absolute path
        elsewhere or a symlink out of the root is rejected). Defaults to the candidate
        file's directory.
      on_bad_record: "error" raises :class:`RecordError` at the first bad record;
        "skip" drops bad records and counts them per reason in the report.
      check_images: check that every image file exists.

    Returns:
      (questions in file order, :class:`LoadReport`).

    Raises:
      RecordError: whole-file problems (unreadable JSON array, a single JSON object, empty
        file) always; record problems when ``on_bad_record == "error"``.
    """
    path = os.fspath(path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    return _parse(read_json_records(path), path, root, on_bad_record, check_images)
