"""DreamPRM record formats: reading, converting and validating, before any compute.

Two record kinds (CONTRACTS.md, "DreamPRM data records"):

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
  must exist and must decode with PIL (``verify()`` then a full ``load()``);
* meta chains split into steps (:func:`dreamprm_jax.data.steps.split_steps`, strict mode);
* ``(id, sid)`` pairs (training) and ``id`` (meta) are unique when present.

An error is a :class:`RecordError` naming the file, the record index (0-based), the line
(JSON Lines; 1-based), the field and what was expected.  File-level problems (empty file,
non-UTF-8 bytes, malformed JSON array, a single JSON object, zero records for a declared
domain) always raise.
With ``on_bad_record="skip"`` bad records are dropped and counted per reason in a
:class:`collections.Counter` returned beside the good records; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

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
from dreamprm_jax.data.steps import STEP_PATTERN, StepError, split_steps

__all__ = [
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
]

# Reasons (Counter keys in skip mode); those shared with other records files live in jsonfiles.
OUT_OF_RANGE = "out_of_range"
NOT_FINITE = "not_finite"
NOT_BOOLEAN = "not_boolean"
EMPTY_TEXT = "empty_text"
UNKNOWN_DOMAIN = "unknown_domain"
EMPTY_DOMAIN = "empty_domain"
CORRUPT_IMAGE = "corrupt_image"
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


class Loaded(NamedTuple):
    """Good records, per-reason counts of dropped ones, one message per reason, domain names."""

    records: list
    skipped: Counter
    examples: dict[str, str]
    domains: tuple[str, ...]


# ----------------------------------------------------------------------------- reading


def _fail(err: RecordError, on_bad_record: str, counter: Counter | None, examples: dict | None) -> None:
    if on_bad_record == "error" or counter is None:
        raise err
    counter[err.reason] += 1
    if examples is not None:
        examples.setdefault(err.reason, str(err))


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
    """Raise ``OSError``/``ValueError`` unless PIL can identify, verify and fully decode ``path``."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:  # verify() leaves the object unusable; reopen to decode pixels
        im.load()


def _image(ctx: _Ctx, rec: dict, image_root: str, check_images: bool, seen: dict) -> str | None:
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
        elif check_images:
            try:
                check_image(full)
                seen[full] = None
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
                seen[full] = (CORRUPT_IMAGE, "an image PIL can decode", f"{full} ({type(e).__name__}: {e})")
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


def _parse_train(ctx: _Ctx, rec, image_root, domains, check_images, seen) -> TrainRecord:
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
    image = _image(ctx, rec, image_root, check_images, seen)
    return TrainRecord(text_input, add, image, dataset, accuracy, rid, sid, score, times, rec.get("ground_truth"),
                       (ctx.file, ctx.index))


def _parse_meta(ctx: _Ctx, rec, image_root, check_images, seen, step_mode) -> MetaRecord:
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
    image = _image(ctx, rec, image_root, check_images, seen)
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


def _finish(path, records, counter, examples, domains, domain_of) -> Loaded:
    present = Counter(domain_of(r) for r in records) if domain_of else Counter()
    if domains is not None:
        empty = [d for d in domains if present[d] == 0]
        if empty:
            raise RecordError(path, None, "dataset", f"at least one record for every declared domain {list(domains)}",
                              EMPTY_DOMAIN, got=f"no (good) records for {empty}")
        names = tuple(domains)
    else:
        names = tuple(sorted(present))
    return Loaded(records, counter, examples, names)


def _check_mode(on_bad_record: str) -> None:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")


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
) -> Loaded:
    """Read and validate a training-records file (see the module docstring for every check).

    Args:
      path: JSON array or JSON Lines file.
      image_root: folder that image paths are relative to and may not escape (default: the
        file's folder).
      domains: declared domain names; records of other domains are errors and each declared
        domain needs at least one good record.  ``None``: the sorted names found.
      on_bad_record: ``"error"`` (raise the first :class:`RecordError`) or ``"skip"``.
      check_images: decode every distinct image once with PIL.
      format: ``"dreamprm"``, ``"trl"`` (stepwise supervision) or ``"auto"`` (a row with
        ``completions`` and ``labels`` is TRL).
      domain: domain name for TRL rows (overrides their ``dataset`` / ``domain`` field).
      step_separator: joins TRL step strings.

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
                parsed = [_parse_train(ctx, row, root, domain_set, check_images, seen_images) for row in rows]
            else:
                parsed = [_parse_train(ctx, value, root, domain_set, check_images, seen_images)]
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
            _fail(err, on_bad_record, counter, examples)
    return _finish(path, records, counter, examples, domain_set, lambda r: r.dataset)


def load_meta_records(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    step_mode: str = "strict",
) -> Loaded:
    """Read and validate a meta-records file (chains); ``records`` are :class:`MetaRecord`.

    ``step_mode`` is passed to :func:`~dreamprm_jax.data.steps.split_steps`; ``"reference"``
    reproduces the reference's prefixes (including its empty ones) and skips step checks
    other than "at least one step".
    """
    _check_mode(on_bad_record)
    path = os.fspath(path)
    counter: Counter = Counter()
    examples: dict[str, str] = {}
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
            rec = _parse_meta(ctx, raw.value, root, check_images, seen_images, step_mode)
            if rec.id is not None:
                if rec.id in seen_ids:
                    raise ctx.error("id", f"a unique id (first seen at record {seen_ids[rec.id]})", DUPLICATE_ID,
                                    got=repr(rec.id))
                seen_ids[rec.id] = raw.index
            records.append(rec)
        except RecordError as err:
            _fail(err, on_bad_record, counter, examples)
    return _finish(path, records, counter, examples, None, None)


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
