"""DreamPRM record formats: reading, converting and validating, before any compute.

Two record kinds, as DreamPRM releases them:

* training record (lower level), one per (question, partial chain)::

    {"input": str, "add": str, "image_path": str | null, "dataset": str,
     "accuracy": float in [0, 1]}       optional: id, sid, score, times, ground_truth

  model text = ``input + "\\n\\n" + add``; label y = ``accuracy`` (Monte-Carlo estimate).
* meta record (upper level), one per whole chain::

    {"input": "question ... Step 1: ... Step S: ... Final answer: ...",
     "image_path": str | null, "true_false": bool}      optional: id, question_id

  ``question_id`` (a string or an integer) groups the candidate chains of one question for
  the ranking meta losses; without it, chains with the same question text (the text before
  their first step) and the same image form a question.

A file is a JSON array or JSON Lines, read by
:func:`~dreamprm_jax.data.jsonfiles.read_json_records` (the first non-blank character
decides: ``[`` = array; a single pretty-printed JSON object is an error).  Training data may also come in TRL's stepwise-supervision format
(``prompt``, ``completions`` = list of step strings, ``labels`` = list of bool, optional
``images`` / ``image``); see :func:`convert_trl_record`.

Validation policy (every record, all of it before any tokenisation):

* every required field is present with the right JSON type; ``input`` / ``add`` are
  non-blank;
* ``accuracy`` is a real number (not a bool), finite and in [0, 1];
* ``true_false`` is a JSON boolean, or the integer 0 or 1 (many writers emit 0/1 for
  booleans, and the integers are unambiguous); strings ("yes", "true"), floats and
  other integers are errors;
* ``dataset`` is one of ``domains`` when a domain list is given, and every declared domain
  has at least one (good) record;
* ``image_path`` (when not null) is resolved against ``image_root`` (default: the records
  file's folder) by :func:`~dreamprm_jax.data.jsonfiles.resolve_image_path` (symlinks
  resolved; ``..``, an absolute path elsewhere or a symlink out of the root is an error),
  must exist and pass the image check: by default
  :func:`~dreamprm_jax.data.processor.check_image_file` (decodes with PIL, not a
  decompression bomb, an 8-bit mode, an aspect ratio the Qwen2-VL image processor accepts
  after the shrink to 512 px, no side shrunk to 0), or the processor's own
  ``check_image`` (``image_check=``), so that no image fails later, during encoding;
* meta chains split into steps (:func:`dreamprm_jax.data.steps.split_steps`, strict mode);
* ``(id, sid)`` pairs (training) and ``id`` (meta) are unique when present.

A bad record is a :class:`RecordError` naming the file, the record index (0-based), the
line (JSON Lines; 1-based), the field and what was expected.  File-level problems (empty
file, non-UTF-8 bytes, malformed JSON array, a single JSON object, zero records for a
declared domain) always raise.  With ``on_bad_record="error"`` the whole file is still
validated, then a :class:`BadRecords` (a ``RecordError`` carrying the first bad record's
fields) says how many records are bad, by reason, shows the first few and points at skip
mode.  With ``on_bad_record="skip"`` bad records are dropped and counted per reason in a
:class:`collections.Counter` returned beside the good records, with the first few errors;
nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from dreamprm_jax.data.jsonfiles import (
    DUPLICATE_ID,
    MISSING_FIELD,
    MISSING_IMAGE,
    NOT_AN_OBJECT,
    PATH_ESCAPE,
    WRONG_TYPE,
    ImagePathEscape,
    RecordError,
    read_json_records,
    resolve_image_path,
)
from dreamprm_jax.data.jsonfiles import short_repr as _short
from dreamprm_jax.data.processor import IMAGE_UNREADABLE, ImageRejected, check_image_file
from dreamprm_jax.data.steps import STEP_PATTERN, StepError, split_steps

__all__ = [
    "BadRecords",
    "RecordError",
    "TrainRecord",
    "MetaRecord",
    "Loaded",
    "read_json_records",
    "load_train_records",
    "load_meta_records",
    "convert_trl_record",
    "resolve_image_path",
    "check_image",
    "format_skipped",
    "iter_texts",
    "record_keys",
]

# Reasons (Counter keys in skip mode); those shared with other records files live in jsonfiles.
OUT_OF_RANGE = "out_of_range"
NOT_FINITE = "not_finite"
NOT_BOOLEAN = "not_boolean"
EMPTY_TEXT = "empty_text"
UNKNOWN_DOMAIN = "unknown_domain"
EMPTY_DOMAIN = "empty_domain"
CORRUPT_IMAGE = IMAGE_UNREADABLE  # the other image reasons: dreamprm_jax.data.processor.IMAGE_*
NO_STEPS = "bad_steps"


@dataclasses.dataclass(frozen=True)
class TrainRecord:
    """One validated training sample. ``image_path`` is absolute (or None); ``text`` = input + "\\n\\n" + add."""

    input: str
    add: str
    image_path: str | None
    dataset: str
    accuracy: float
    id: str | None = None
    sid: str | None = None
    score: float | None = None
    times: int | None = None
    ground_truth: Any = None
    source: tuple[str, int] = ("", -1)  # (file, record index)

    @property
    def text(self) -> str:
        return self.input + "\n\n" + self.add


@dataclasses.dataclass(frozen=True)
class MetaRecord:
    """One validated meta chain with its S step prefixes (``steps[k-1]`` = prefix k)."""

    input: str
    image_path: str | None
    true_false: bool
    steps: tuple[str, ...]
    id: str | None = None
    source: tuple[str, int] = ("", -1)
    question_id: str | None = None

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def question_key(self) -> tuple:
        """What groups the chains of one question: ``question_id`` when given, else the
        question text (before the first step marker) and the image."""
        if self.question_id is not None:
            return ("question_id", self.question_id)
        first = STEP_PATTERN.search(self.input)
        question = self.input[: first.start()] if first is not None else self.input
        return ("text", question.strip(), self.image_path)


#: How many bad records a :class:`BadRecords` message and ``Loaded.first_errors`` show.
FIRST_ERRORS = 5


class Loaded(NamedTuple):
    """Good records, per-reason counts of dropped ones, one message per reason, domain names,
    the number of records read from the file and the first :data:`FIRST_ERRORS` errors."""

    records: list
    skipped: Counter
    examples: dict[str, str]
    domains: tuple[str, ...]
    num_read: int = 0
    first_errors: tuple[RecordError, ...] = ()


class BadRecords(RecordError):
    """Error mode: the records file has bad records. Its attributes (``record``, ``field``,
    ``reason``, ...) are the first bad record's; ``counts`` (reason -> number), ``num_read``
    and ``errors`` (the first few :class:`RecordError`) describe them all."""

    def __init__(self, file: str, counts: Counter, num_read: int, errors: Sequence[RecordError]):
        first = errors[0]
        super().__init__(first.file, first.record, first.field, first.expected, first.reason, line=first.line,
                         got=first.got, id=first.id)
        self.counts, self.num_read, self.errors = Counter(counts), num_read, tuple(errors)
        bad = sum(counts.values())
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        lines = [f"{file}: {bad} of {num_read} records are bad ({by_reason}); the first {len(errors)}:"]
        lines += [f"  {err}" for err in errors]
        if bad < num_read:
            lines.append(f"Fix them, or train on the {num_read - bad} good ones with on_bad_record='skip' "
                         "(--on-bad-record skip): skipped records are counted and reported.")
        else:
            lines.append("No record is good: fix the file (--on-bad-record skip would leave nothing to train on).")
        self.args = ("\n".join(lines),)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return (BadRecords, (self.file, self.counts, self.num_read, self.errors))


# ----------------------------------------------------------------------------- reading


def _fail(err: RecordError, counter: Counter, examples: dict, first: list) -> None:
    """Count a bad record (both modes: error mode raises once the whole file is read)."""
    counter[err.reason] += 1
    examples.setdefault(err.reason, str(err))
    if len(first) < FIRST_ERRORS:
        first.append(err)


# ----------------------------------------------------------------------------- field checks


class _Ctx(NamedTuple):
    file: str
    index: int
    line: int | None

    def error(self, field, expected, reason, got=None):
        return RecordError(self.file, self.index, field, expected, reason, line=self.line, got=got)


def _require(ctx: _Ctx, rec: dict, field: str):
    if field not in rec:
        raise ctx.error(field, "the field to be present", MISSING_FIELD, got=f"keys {sorted(rec)}")
    return rec[field]


def _text(ctx: _Ctx, rec: dict, field: str, allow_blank: bool = False) -> str:
    value = _require(ctx, rec, field)
    if not isinstance(value, str):
        raise ctx.error(field, "a string", WRONG_TYPE, got=f"{type(value).__name__} {_short(value)}")
    if not allow_blank and not value.strip():
        raise ctx.error(field, "non-blank text", EMPTY_TEXT, got=_short(value))
    return value


def _unit_interval(ctx: _Ctx, value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(field, "a number in [0, 1]", WRONG_TYPE, got=f"{type(value).__name__} {_short(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ctx.error(field, "a finite number in [0, 1]", NOT_FINITE, got=repr(value))
    if not 0.0 <= value <= 1.0:
        raise ctx.error(field, "a number in [0, 1]", OUT_OF_RANGE, got=repr(value))
    return value


def _boolean(ctx: _Ctx, value, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ctx.error(field, "a JSON boolean (or the integer 0 / 1)", NOT_BOOLEAN, got=f"{type(value).__name__} {_short(value)}")


def _optional_id(ctx: _Ctx, rec: dict, field: str) -> str | None:
    value = rec.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ctx.error(field, "a string or an integer", WRONG_TYPE, got=f"{type(value).__name__} {_short(value)}")
    return str(value)


def _optional_number(ctx: _Ctx, rec: dict, field: str, integer: bool = False):
    value = rec.get(field)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ctx.error(field, "an integer" if integer else "a number", WRONG_TYPE,
                        got=f"{type(value).__name__} {_short(value)}")
    if not integer and not math.isfinite(value):
        raise ctx.error(field, "a finite number", NOT_FINITE, got=repr(value))
    return value


def check_image(path: str) -> None:
    """Raise :class:`~dreamprm_jax.data.processor.ImageRejected` (a ``ValueError``) for a file
    the Qwen2-VL processor would refuse at its default settings
    (:func:`~dreamprm_jax.data.processor.check_image_file`)."""
    check_image_file(path)


def _image(ctx: _Ctx, rec: dict, image_root: str, image_check, seen: dict) -> str | None:
    value = _require(ctx, rec, "image_path")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ctx.error("image_path", "a non-empty path string or null", WRONG_TYPE, got=_short(value))
    try:
        full = resolve_image_path(value, image_root)
    except ImagePathEscape as e:
        raise ctx.error("image_path", e.expected, PATH_ESCAPE, got=e.got) from None
    if full not in seen:
        if not os.path.isfile(full):
            seen[full] = (MISSING_IMAGE, "an existing image file", full)
        elif image_check is not None:
            try:
                image_check(full)
                seen[full] = None
            except ImageRejected as e:
                seen[full] = (e.reason, e.expected, e.got)
            except Exception as e:  # noqa: BLE001 - a caller's check may raise anything
                seen[full] = (CORRUPT_IMAGE, "an image the processor accepts", f"{full} ({type(e).__name__}: {e})")
        else:
            seen[full] = None
    bad = seen[full]
    if bad is not None:
        raise ctx.error("image_path", bad[1], bad[0], got=_short(bad[2], 200))
    return full


def _as_object(ctx: _Ctx, value) -> dict:
    if not isinstance(value, dict):
        raise ctx.error(None, "a JSON object", NOT_AN_OBJECT, got=type(value).__name__)
    return value


# ----------------------------------------------------------------------------- parsers


def _parse_train(ctx: _Ctx, rec, image_root, domains, image_check, seen) -> TrainRecord:
    rec = _as_object(ctx, rec)
    text_input = _text(ctx, rec, "input")
    add = _text(ctx, rec, "add")
    dataset = _text(ctx, rec, "dataset")
    if domains is not None and dataset not in domains:
        raise ctx.error("dataset", f"one of the declared domains {list(domains)}", UNKNOWN_DOMAIN, got=_short(dataset))
    accuracy = _unit_interval(ctx, _require(ctx, rec, "accuracy"), "accuracy")
    rid = _optional_id(ctx, rec, "id")
    sid = _optional_id(ctx, rec, "sid")
    score = _optional_number(ctx, rec, "score")
    times = _optional_number(ctx, rec, "times", integer=True)
    image = _image(ctx, rec, image_root, image_check, seen)
    return TrainRecord(text_input, add, image, dataset, accuracy, rid, sid, score, times, rec.get("ground_truth"),
                       (ctx.file, ctx.index))


def _parse_meta(ctx: _Ctx, rec, image_root, image_check, seen, step_mode) -> MetaRecord:
    rec = _as_object(ctx, rec)
    text_input = _text(ctx, rec, "input")
    label = _boolean(ctx, _require(ctx, rec, "true_false"), "true_false")
    rid = _optional_id(ctx, rec, "id")
    question_id = _optional_id(ctx, rec, "question_id")
    try:
        steps = tuple(split_steps(text_input, mode=step_mode))
    except StepError as e:
        raise ctx.error("input", f"a chain 'Step 1: ... Step S: ... Final answer: ...' ({e})", NO_STEPS,
                        got=_short(text_input)) from None
    if not steps:
        raise ctx.error("input", "a chain with at least one 'Step <n>'", NO_STEPS, got=_short(text_input))
    image = _image(ctx, rec, image_root, image_check, seen)
    return MetaRecord(text_input, image, label, steps, rid, (ctx.file, ctx.index), question_id)


def convert_trl_record(rec: dict, domain: str | None = None, step_separator: str = "\n") -> list[dict]:
    """TRL stepwise supervision -> DreamPRM training records, one per step prefix.

    TRL row: ``{"prompt": str, "completions": [step_1, ..., step_S], "labels": [b_1, ..., b_S],
    "images": [path] | "image": path (optional), "dataset"/"domain": str (optional)}``.
    Record k (1-based) = ``{"input": prompt, "add": step_separator.join(steps[:k]),
    "accuracy": float(labels[k-1]), "sid": k, ...}`` (TRL's ``PRMTrainer`` also joins steps
    with ``"\\n"``).  The domain is ``domain`` if given, else the row's ``dataset`` /
    ``domain`` field.  Only shape is checked here; the records then go through the usual
    training-record validation (so a non-boolean label becomes an ``accuracy`` error).

    Raises ``KeyError``/``TypeError``/``ValueError`` (turned into :class:`RecordError` by
    the loader) when the row has the wrong shape.
    """
    for key in ("prompt", "completions", "labels"):
        if key not in rec:
            raise KeyError(key)
    steps, labels = rec["completions"], rec["labels"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise TypeError("completions")
    if not isinstance(labels, list):
        raise TypeError("labels")
    if len(steps) != len(labels) or not steps:
        raise ValueError("labels")
    image = rec.get("image")
    if "images" in rec and rec["images"] is not None:
        images = rec["images"]
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) > 1:
            raise ValueError("images")
        image = images[0] if images else None
    dataset = domain if domain is not None else rec.get("dataset", rec.get("domain"))
    out = []
    for k in range(1, len(steps) + 1):
        label = labels[k - 1]
        out.append({
            "input": rec["prompt"],
            "add": step_separator.join(steps[:k]),
            "image_path": image,
            "dataset": dataset,
            # bools become 0/1; anything else is passed on for the accuracy check to reject
            "accuracy": float(label) if isinstance(label, bool) else label,
            "id": rec.get("id"),
            "sid": k,
        })
    return out


_TRL_EXPECT = {
    "prompt": "the TRL field 'prompt' (str)",
    "completions": "a non-empty list of step strings",
    "labels": "a list of booleans, one per completion",
    "images": "at most one image path (the model takes one image)",
}


def _default_root(path: str, image_root) -> str:
    return os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))


def _finish(path, records, counter, examples, first, num_read, on_bad_record, domains, domain_of) -> Loaded:
    if counter and on_bad_record == "error":
        raise BadRecords(path, counter, num_read, first)
    present = Counter(domain_of(r) for r in records) if domain_of else Counter()
    if domains is not None:
        empty = [d for d in domains if present[d] == 0]
        if empty:
            raise RecordError(path, None, "dataset", f"at least one record for every declared domain {list(domains)}",
                              EMPTY_DOMAIN, got=f"no (good) records for {empty}")
        names = tuple(domains)
    else:
        names = tuple(sorted(present))
    return Loaded(records, counter, examples, names, num_read, tuple(first))


def _check_mode(on_bad_record: str) -> None:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")


def _image_check(check_images: bool, image_check):
    if not check_images:
        return None
    return image_check if image_check is not None else check_image


def load_train_records(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    domains: Sequence[str] | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    format: str = "auto",
    domain: str | None = None,
    step_separator: str = "\n",
    image_check: Callable[[str], Any] | None = None,
) -> Loaded:
    """Read and validate a training-records file (see the module docstring for every check).

    Args:
      path: JSON array or JSON Lines file.
      image_root: folder that image paths are relative to and may not escape (default: the
        file's folder).
      domains: declared domain names; records of other domains are errors and each declared
        domain needs at least one good record.  ``None``: the sorted names found.
      on_bad_record: ``"error"`` (validate every record, then raise :class:`BadRecords` if any
        is bad) or ``"skip"``.
      check_images: check every distinct image once (``image_check``).
      format: ``"dreamprm"``, ``"trl"`` (stepwise supervision) or ``"auto"`` (a row with
        ``completions`` and ``labels`` is TRL).
      domain: domain name for TRL rows (overrides their ``dataset`` / ``domain`` field).
      step_separator: joins TRL step strings.
      image_check: ``check(path)`` raising for an image the processor would refuse
        (``Processor.check_image``); ``None``: :func:`check_image`, the default settings.

    Returns:
      :class:`Loaded` ``(records: list[TrainRecord], skipped: Counter, examples, domains)``.
      For TRL rows, the record index in errors is the row index; ``sid`` tells the step.
    """
    _check_mode(on_bad_record)
    if format not in ("auto", "dreamprm", "trl"):
        raise ValueError(f"format must be 'auto', 'dreamprm' or 'trl', got {format!r}")
    path = os.fspath(path)
    counter: Counter = Counter()
    examples: dict[str, str] = {}
    first: list[RecordError] = []
    check = _image_check(check_images, image_check)
    raws = read_json_records(path)
    root = _default_root(path, image_root)
    domain_set = None if domains is None else tuple(domains)
    seen_images: dict = {}
    seen_ids: dict = {}
    records: list[TrainRecord] = []
    for raw in raws:
        ctx = _Ctx(path, raw.index, raw.line)
        try:
            if raw.error is not None:
                raise raw.error
            value = raw.value
            is_trl = format == "trl" or (format == "auto" and isinstance(value, dict)
                                         and "completions" in value and "labels" in value)
            if is_trl:
                value = _as_object(ctx, value)
                try:
                    rows = convert_trl_record(value, domain=domain, step_separator=step_separator)
                except KeyError as e:
                    raise ctx.error(e.args[0], _TRL_EXPECT[e.args[0]], MISSING_FIELD, got=f"keys {sorted(value)}") from None
                except (TypeError, ValueError) as e:
                    field = e.args[0]
                    raise ctx.error(field, _TRL_EXPECT[field], WRONG_TYPE, got=_short(value.get(field))) from None
                if rows[0]["dataset"] is None:
                    raise ctx.error("dataset", "a domain name (TRL row field 'dataset'/'domain' or the domain argument)",
                                    MISSING_FIELD)
                parsed = [_parse_train(ctx, row, root, domain_set, check, seen_images) for row in rows]
            else:
                parsed = [_parse_train(ctx, value, root, domain_set, check, seen_images)]
            for rec in parsed:
                if rec.id is not None:
                    key = (rec.id, rec.sid)
                    if key in seen_ids:
                        raise ctx.error("id", f"a unique (id, sid) pair (first seen at record {seen_ids[key]})",
                                        DUPLICATE_ID, got=f"(id={rec.id!r}, sid={rec.sid!r})")
            for rec in parsed:
                if rec.id is not None:
                    seen_ids[(rec.id, rec.sid)] = raw.index
            records.extend(parsed)
        except RecordError as err:
            _fail(err, counter, examples, first)
    return _finish(path, records, counter, examples, first, len(raws), on_bad_record, domain_set, lambda r: r.dataset)


def load_meta_records(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    step_mode: str = "strict",
    image_check: Callable[[str], Any] | None = None,
) -> Loaded:
    """Read and validate a meta-records file (chains); ``records`` are :class:`MetaRecord`.

    ``step_mode`` is passed to :func:`~dreamprm_jax.data.steps.split_steps`; ``"reference"``
    reproduces the reference's prefixes (including its empty ones) and skips step checks
    other than "at least one step".  ``on_bad_record``, ``check_images`` and ``image_check``
    as in :func:`load_train_records`.
    """
    _check_mode(on_bad_record)
    path = os.fspath(path)
    counter: Counter = Counter()
    examples: dict[str, str] = {}
    first: list[RecordError] = []
    check = _image_check(check_images, image_check)
    raws = read_json_records(path)
    root = _default_root(path, image_root)
    seen_images: dict = {}
    seen_ids: dict = {}
    records: list[MetaRecord] = []
    for raw in raws:
        ctx = _Ctx(path, raw.index, raw.line)
        try:
            if raw.error is not None:
                raise raw.error
            rec = _parse_meta(ctx, raw.value, root, check, seen_images, step_mode)
            if rec.id is not None:
                if rec.id in seen_ids:
                    raise ctx.error("id", f"a unique id (first seen at record {seen_ids[rec.id]})", DUPLICATE_ID,
                                    got=repr(rec.id))
                seen_ids[rec.id] = raw.index
            records.append(rec)
        except RecordError as err:
            _fail(err, counter, examples, first)
    return _finish(path, records, counter, examples, first, len(raws), on_bad_record, None, None)


def format_skipped(loaded: Loaded) -> str:
    """One human line per skip reason (for the caller to print / log)."""
    if not loaded.skipped:
        return "no records skipped"
    lines = [f"skipped {sum(loaded.skipped.values())} bad record(s):"]
    for reason, count in loaded.skipped.most_common():
        lines.append(f"  {reason}: {count}  (e.g. {loaded.examples.get(reason, '')})")
    return "\n".join(lines)


def iter_texts(records: Iterable) -> Iterator[str]:
    """Every text the model will see (training text or each meta step prefix)."""
    for rec in records:
        if isinstance(rec, TrainRecord):
            yield rec.text
        else:
            yield from rec.steps


def record_keys(records: Sequence[TrainRecord]) -> list[str]:
    """One key per training record that names it uniquely (the keys of ``instance_weights.json``).

    ``"<id>/<sid>"`` (the chain's ``id`` and the step's ``sid``, DreamPRM's own naming; the
    generated benchmark's ``"train-00017/3"`` is step 3 of chain ``train-00017``) when the
    record has both; ``"<id>"`` with an id alone; ``"record <n>"`` (``n``: the record's
    0-based position in its file) without one. A key that would occur more than once gets
    ``"#<i>"`` appended to every occurrence, ``i`` being the record's index among the
    validated records (its row in the training table).
    """
    base = []
    for rec in records:
        if rec.id is not None:
            base.append(rec.id if rec.sid is None else f"{rec.id}/{rec.sid}")
        else:
            base.append(f"record {rec.source[1]}")
    counts = Counter(base)
    return [k if counts[k] == 1 else f"{k}#{i}" for i, k in enumerate(base)]
