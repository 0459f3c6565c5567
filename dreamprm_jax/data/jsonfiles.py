"""JSON records files: the one reader, the one error type and image-path confinement.

A records file is a JSON array of records or JSON Lines (one record per line); the first
non-blank character decides (``[`` = array).  Training records
(:mod:`dreamprm_jax.data.records`) and best-of-N candidate files
(:mod:`dreamprm_jax.evaluation.candidates`) are both read by :func:`read_json_records`,
and both report problems as a :class:`RecordError`, which names the file, the record
(0-based index), the line (JSON Lines; 1-based), the field, what was expected and what
was found.

File-level problems raise at once: non-UTF-8 bytes, an empty file or one without
records, a malformed JSON array, and a single JSON object spread over several lines (a
pretty-printed object where an array of records or JSON Lines was expected).  A JSON
Lines line that does not parse is returned as a record carrying its error, so that the
caller may either raise it or count it and go on.

Image paths are confined to an image root by :func:`resolve_image_path`: symlinks are
resolved (``os.path.realpath``) on both sides, and the result must lie inside the root,
so ``..`` escapes, absolute paths elsewhere and symlinks that point out of the root are
all rejected.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

__all__ = [
    "RecordError",
    "JsonRecord",
    "ImagePathEscape",
    "read_json_records",
    "read_number_map",
    "write_number_map",
    "resolve_image_path",
    "short_repr",
]

# Reasons (machine keys: RecordError.reason, and the skip counters of the loaders).
MALFORMED_JSON = "malformed_json"
SINGLE_OBJECT = "single_json_object"
BROKEN_LINE = "broken_line"
EMPTY_FILE = "empty_file"
NOT_UTF8 = "not_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
PATH_ESCAPE = "path_escapes_image_root"
MISSING_IMAGE = "missing_image"
DUPLICATE_ID = "duplicate_id"


class RecordError(ValueError):
    """A bad record or records file.

    Attributes:
      file: path of the records file.
      record: 0-based record index (``None`` for file-level errors).
      line: 1-based line number (JSON Lines, malformed JSON, non-UTF-8), else ``None``.
      field: the offending field (``None`` when the whole record / file is at fault).
      expected: what was expected, in words.
      reason: short machine key (the counter key in skip mode).
      got: a short repr of what was found (may be ``None``).
      id: the record's own id when it has one (named in the message), else ``None``.
    """

    def __init__(self, file, record, field, expected, reason, *, line=None, got=None, id=None):
        self.file = str(file)
        self.record = record
        self.line = line
        self.field = field
        self.expected = expected
        self.reason = reason
        self.got = got
        self.id = id
        where = [self.file]
        if record is not None:
            where.append(f"record {record}" + (f" (id={id!r})" if id is not None else ""))
        if line is not None:
            where.append(f"line {line}")
        msg = ", ".join(where)
        if field is not None:
            msg += f", field '{field}'"
        msg += f": expected {expected}"
        if got is not None:
            msg += f", got {got}"
        msg += f" [{reason}]"
        super().__init__(msg)

    def __reduce__(self):  # picklable (multiprocessing, pytest-xdist)
        return (_rebuild_error, (self.file, self.record, self.field, self.expected, self.reason, self.line,
                                 self.got, self.id))


def _rebuild_error(file, record, field, expected, reason, line, got, id=None):
    return RecordError(file, record, field, expected, reason, line=line, got=got, id=id)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonRecord(NamedTuple):
    """One record of a records file.

    ``index`` is 0-based over the records (broken lines included); ``line`` is the 1-based
    line for JSON Lines and ``None`` for an array.  ``error`` is set (and ``value`` is
    ``None``) for a JSON Lines line that does not parse.
    """

    index: int
    line: int | None
    value: Any
    error: RecordError | None = None


def _decode(path: str, data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecordError(path, None, None, "UTF-8 text", NOT_UTF8, line=line,
                          got=f"byte {data[e.start:e.start + 1]!r} at offset {e.start}") from None


def _read_array(path: str, text: str) -> list[JsonRecord]:
    try:
        values = json.loads(text)  # text starts with '[': a list or a decode error
    except json.JSONDecodeError as e:
        raise RecordError(path, None, None, "a valid JSON array of records", MALFORMED_JSON, line=e.lineno,
                          got=f"{e.msg} (column {e.colno})") from None
    return [JsonRecord(i, None, v) for i, v in enumerate(values)]


def _single_object_error(path: str, text: str) -> RecordError | None:
    """The error for a pretty-printed JSON object, or None when ``text`` is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    lines = sum(1 for line in text.splitlines() if line.strip())
    return RecordError(path, None, None, "a JSON array of records or JSON Lines (one object per line)",
                       SINGLE_OBJECT, line=1, got=f"one JSON object over {lines} lines")


def _read_lines(path: str, text: str) -> list[JsonRecord]:
    out: list[JsonRecord] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        index = len(out)
        try:
            out.append(JsonRecord(index, lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            if index == 0:
                # A first line that does not parse may open one pretty-printed object.
                single = _single_object_error(path, text)
                if single is not None:
                    raise single from None
            err = RecordError(path, index, None, "one JSON object per line (JSON Lines)", BROKEN_LINE, line=lineno,
                              got=f"{e.msg} (column {e.colno})")
            out.append(JsonRecord(index, lineno, None, err))
    return out


def read_json_records(path: str | os.PathLike) -> list[JsonRecord]:
    """Every record of a JSON array or JSON Lines file, in file order.

    Raises :class:`RecordError` for file-level problems (see the module docstring); a JSON
    Lines line that does not parse comes back as a :class:`JsonRecord` with ``error`` set.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    stripped = text.lstrip()
    if not stripped:
        raise RecordError(path, None, None, "at least one record (JSON array or JSON Lines)", EMPTY_FILE,
                          got="an empty file")
    records = _read_array(path, text) if stripped[0] == "[" else _read_lines(path, text)
    if not records:
        raise RecordError(path, None, None, "at least one record", EMPTY_FILE, got="no records")
    return records


def read_number_map(path: str | os.PathLike, expected: str, *, non_empty: bool = False,
                    minimum: float | None = None) -> dict[str, float]:
    """``{name: number}`` from a file holding one JSON object, e.g. weights per domain or record.

    Args:
      path: the file.
      expected: the object in words for error messages, e.g. ``"{domain: weight}"``.
      non_empty: an empty object is an error.
      minimum: every value must be a number ``>= minimum`` (``None``: any number).

    Raises:
      ValueError: naming the file (and the entry) and what was expected.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON object {expected}") from None
    if not isinstance(value, dict) or (non_empty and not value):
        raise ValueError(f"{path}: expected a{' non-empty' if non_empty else ''} JSON object {expected}, got "
                         f"{short_repr(value) if isinstance(value, dict) else type(value).__name__}")
    for name, number in value.items():
        if (not isinstance(number, (int, float)) or isinstance(number, bool)
                or (minimum is not None and not number >= minimum)):
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise ValueError(f"{path}: entry {name!r} is {short_repr(number)}; expected a number{bound}")
    return {str(k): float(v) for k, v in value.items()}


def write_number_map(path: str | os.PathLike, numbers: dict[str, float]) -> str:
    """``numbers`` as one JSON object ``{name: number}`` (what :func:`read_number_map` reads),
    written to a temporary file and renamed, so the file is whole or absent; returns the path."""
    path = os.fspath(path)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({str(k): float(v) for k, v in numbers.items()}, f, indent=0)
    os.replace(path + ".tmp", path)
    return path


class ImagePathEscape(ValueError):
    """An image path that resolves outside its image root; ``expected`` / ``got`` in words."""

    def __init__(self, image_path: str, root: str, resolved: str):
        self.expected = f"a path inside the image root {root!r}"
        self.got = f"{image_path!r} (resolves to {resolved!r})"
        super().__init__(f"expected {self.expected}, got {self.got}")


def resolve_image_path(image_path: str, image_root: str | os.PathLike) -> str:
    """Absolute, symlink-free path of ``image_path`` (relative to ``image_root``, or absolute).

    Both the root and the path are resolved with ``os.path.realpath``; the result must be
    the root itself or below it, else :class:`ImagePathEscape` (a ``ValueError``) is raised.
    Whether the file exists is the caller's question.
    """
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, image_path))
    if os.path.commonpath([root, full]) != root:
        raise ImagePathEscape(image_path, root, full)
    return full
