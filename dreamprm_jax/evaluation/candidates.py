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

Every record is checked before anything is scored. A problem is reported as a
:class:`CandidateError` naming the file, the record index (and line for JSON Lines),
the record id, the field and what was expected. With ``on_bad_record="skip"`` the
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
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from dreamprm_jax.data.steps import StepError, find_max_step, split_steps

__all__ = [
    "SKIP_REASONS",
    "Candidate",
    "CandidateError",
    "LoadReport",
    "Question",
    "StepError",
    "find_max_step",
    "load_candidates",
    "parse_records",
    "step_prefixes",
]

#: Reasons a record can be rejected, with what was expected (keys of LoadReport.skipped).
SKIP_REASONS: dict[str, str] = {
    "invalid_json": "a line that parses as JSON",
    "not_an_object": "a JSON object",
    "missing_field": "every required field present",
    "bad_type": "fields of the documented types",
    "missing_answer": "a non-empty gold answer",
    "empty_candidates": "a non-empty list of candidates",
    "candidate_without_steps": "candidate text with at least one 'Step k' marker",
    "bad_steps": "step markers numbered exactly 1..S, each with a non-empty prefix",
    "bad_step_labels": "step_labels of 0/1/null, one per step",
    "missing_image": "image_path pointing to an existing file",
    "image_outside_root": "image_path inside the image root",
    "duplicate_id": "ids unique within the file",
}


class CandidateError(ValueError):
    """A candidate file or record that does not follow the format.

    Attributes: ``path`` (file), ``index`` (0-based record index or None for the whole
    file), ``field`` (dotted field path or None) and ``reason`` (a key of SKIP_REASONS,
    or "file" for whole-file problems).
    """

    def __init__(self, message: str, *, path: str, index: int | None = None,
                 field: str | None = None, reason: str = "file"):
        super().__init__(message)
        self.path = path
        self.index = index
        self.field = field
        self.reason = reason


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


def _read_raw(path: str) -> list[tuple[int | None, Any]]:
    """(line number or None, parsed object or a ``_BadLine``) for every record."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    stripped = content.lstrip()
    if not stripped:
        raise CandidateError(f"{path}: the file is empty; expected a JSON array or JSON Lines "
                             "of candidate records", path=path)
    if stripped.startswith("["):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            raise CandidateError(f"{path}: not valid JSON ({e}); expected a JSON array of "
                                 "candidate records", path=path) from e
        if not isinstance(data, list):
            raise CandidateError(f"{path}: expected a JSON array at the top level, got "
                                 f"{type(data).__name__}", path=path)
        return [(None, r) for r in data]
    out: list[tuple[int | None, Any]] = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((lineno, _BadLine(str(e))))
    return out


@dataclasses.dataclass(frozen=True)
class _BadLine:
    error: str


class _Reject(Exception):
    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_image(image_path: str, image_root: str, check_exists: bool) -> str:
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, image_path))
    if os.path.commonpath([root, full]) != root:
        raise _Reject("image_outside_root", "image_path",
                      f"expected a path inside the image root {root!r}, got {image_path!r} "
                      f"(resolves to {full!r})")
    if check_exists and not os.path.isfile(full):
        raise _Reject("missing_image", "image_path",
                      f"expected an existing image file, {image_path!r} (resolved to {full!r}) "
                      "does not exist")
    return full


def _validate(record: Any, image_root: str, check_images: bool, record_index: int) -> Question:
    if isinstance(record, _BadLine):
        raise _Reject("invalid_json", None, f"expected one JSON object per line: {record.error}")
    if not isinstance(record, dict):
        raise _Reject("not_an_object", None,
                      f"expected a JSON object, got {type(record).__name__}")

    def req_str(name: str, *, allow_empty: bool = True) -> str:
        if name not in record:
            raise _Reject("missing_field", name, "expected a string, the field is missing")
        value = record[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("id", "answer"):
            value = str(value)  # numeric ids / numeric gold answers are common; accept them
        if not isinstance(value, str):
            raise _Reject("bad_type", name, f"expected a string, got {_short(value)}")
        if not allow_empty and not value.strip():
            raise _Reject("missing_field", name, "expected a non-empty string, got ''")
        return value

    qid = req_str("id", allow_empty=False)
    benchmark = req_str("benchmark", allow_empty=False)
    question = req_str("question")
    if "answer" not in record or record["answer"] is None:
        raise _Reject("missing_answer", "answer", "expected a non-empty gold answer, the field is "
                      "missing or null")
    answer = req_str("answer")
    if not answer.strip():
        raise _Reject("missing_answer", "answer", "expected a non-empty gold answer, got ''")

    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise _Reject("bad_type", "choices", f"expected a list of strings, got {_short(choices)}")
        if len(choices) > 26:
            raise _Reject("bad_type", "choices", f"expected at most 26 choices (A-Z), got {len(choices)}")
        choices = tuple(choices)

    if "image_path" not in record:
        raise _Reject("missing_field", "image_path", "expected a string or null, the field is missing")
    image_path = record["image_path"]
    if image_path is not None:
        if not isinstance(image_path, str) or not image_path.strip():
            raise _Reject("bad_type", "image_path",
                          f"expected a non-empty string or null, got {_short(image_path)}")
        image_path = _resolve_image(image_path, image_root, check_images)

    if "candidates" not in record:
        raise _Reject("missing_field", "candidates", "expected a list of candidates, the field is missing")
    raw_cands = record["candidates"]
    if not isinstance(raw_cands, list):
        raise _Reject("bad_type", "candidates", f"expected a list of candidates, got {_short(raw_cands)}")
    if not raw_cands:
        raise _Reject("empty_candidates", "candidates", "expected at least one candidate, got []")
    candidates = []
    for j, c in enumerate(raw_cands):
        field = f"candidates[{j}]"
        if not isinstance(c, dict):
            raise _Reject("bad_type", field, f"expected an object with a 'text' field, got {_short(c)}")
        text = c.get("text")
        if not isinstance(text, str):
            raise _Reject("missing_field" if text is None else "bad_type", f"{field}.text",
                          f"expected a string, got {_short(text)}")
        if find_max_step(text) == 0:
            raise _Reject("candidate_without_steps", f"{field}.text",
                          f"expected at least one 'Step k' marker, got {_short(text)}")
        try:
            prefixes = step_prefixes(text)
        except StepError as e:
            raise _Reject("bad_steps", f"{field}.text", f"{e}; got {_short(text)}") from None
        correct = c.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise _Reject("bad_type", f"{field}.correct", f"expected true/false, got {_short(correct)}")
        labels = c.get("step_labels")
        if labels is not None:
            if (not isinstance(labels, list)
                    or not all(v is None or (isinstance(v, int) and v in (0, 1)) for v in labels)):
                raise _Reject("bad_step_labels", f"{field}.step_labels",
                              f"expected a list of 0/1/null, got {_short(labels)}")
            if len(labels) != len(prefixes):
                raise _Reject("bad_step_labels", f"{field}.step_labels",
                              f"expected one label per step ({len(prefixes)} steps found in the text), "
                              f"got {len(labels)} labels")
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
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record: expected 'error' or 'skip', got {on_bad_record!r}")
    records = list(records)
    root = image_root if image_root is not None else os.getcwd()
    questions: list[Question] = []
    skipped: dict[str, int] = {}
    messages: list[str] = []
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        line = line_numbers[i] if line_numbers is not None else None
        where = f"{source}: record {i}" + (f" (line {line})" if line is not None else "")
        rid = record.get("id") if isinstance(record, dict) else None
        if rid is not None:
            where += f" (id={rid!r})"
        try:
            q = _validate(record, root, check_images, i)
            if q.id in seen:
                raise _Reject("duplicate_id", "id", f"expected a unique id, {q.id!r} already used by "
                              f"record {seen[q.id]}")
        except _Reject as r:
            field = f"field '{r.field}'" if r.field else "record"
            message = f"{where}: {field}: {r.detail}"
            if on_bad_record == "error":
                raise CandidateError(message, path=source, index=i, field=r.field,
                                     reason=r.reason) from None
            skipped[r.reason] = skipped.get(r.reason, 0) + 1
            messages.append(message)
            continue
        seen[q.id] = i
        questions.append(q)
    report = LoadReport(path=source, num_records=len(records), num_loaded=len(questions),
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
      path: the candidate file.
      image_root: directory that relative ``image_path`` values are resolved against
        and that no resolved image may escape (``..`` or an absolute path elsewhere is
        rejected). Defaults to the candidate file's directory.
      on_bad_record: "error" raises :class:`CandidateError` at the first bad record;
        "skip" drops bad records and counts them per reason in the report.
      check_images: check that every image file exists.

    Returns:
      (questions in file order, :class:`LoadReport`).

    Raises:
      CandidateError: whole-file problems (unreadable JSON array, empty file) always;
        record problems when ``on_bad_record == "error"``.
    """
    path = os.fspath(path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    raw = _read_raw(path)
    return parse_records([r for _, r in raw], source=path, image_root=root,
                         on_bad_record=on_bad_record, check_images=check_images,
                         line_numbers=[ln for ln, _ in raw])
