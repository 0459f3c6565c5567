"""Per-step metrics: JSON Lines (the record of truth) and TensorBoard (optional).

``MetricsLogger(out_dir)`` writes ``out_dir/metrics.jsonl``, one JSON object per logged
step, flushed after every line::

    {"step": 12, "time": 1718000000.5, "inner_loss": 0.21, "meta_loss": 0.24,
     "domain_weights": {"geometry": 1.31, "charts": 0.69}}

Values may be Python / numpy / jax scalars (-> float or int), arrays (-> nested lists, e.g.
``[K]`` domain weights), or one level of mappings ``{name: scalar}`` (-> a JSON object;
the form :mod:`dreamprm_jax.train.plots` reads for named domain weights). Non-finite
floats are written as ``null`` (strict JSON has no NaN) and the logger warns once.

Resume consistency: a run restored from the checkpoint of step ``N`` opens the logger with
``resume_step=N``; every line with ``step > N`` (logged after that checkpoint by the run
that died) is dropped, as is a torn last line from a process killed mid-write, so the file
again describes exactly one trajectory. The rewrite goes through a temporary file and
``os.replace`` (atomic). TensorBoard is told the same with ``purge_step=N + 1``.

TensorBoard (``out_dir/tb``) uses tensorboardX; if it cannot be imported, the logger warns
once and writes JSONL only. Vectors become ``key/0``, ``key/1``, ... and mappings
``key/name`` tags; :meth:`MetricsLogger.histogram` adds distributions (TensorBoard only).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Iterable, Mapping

import numpy as np

from dreamprm_jax.utils.jsonable import to_jsonable

__all__ = ["MetricsLogger", "read_jsonl", "format_postfix"]

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    """Yields ``(tag, float)`` for every numeric leaf (tags joined by '/')."""
    for k, v in record.items():
        tag = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten_scalars(v, tag + "/")
        elif isinstance(v, list):
            yield from _flatten_scalars({str(i): x for i, x in enumerate(v)}, tag + "/")
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        else:
            yield tag, float(v)


def read_jsonl(path: str | os.PathLike, *, skip_torn_last_line: bool = True) -> list[dict]:
    """Reads a JSON Lines metrics file -> list of records.

    A last line that is not valid JSON (a process killed mid-write) is skipped when
    ``skip_torn_last_line``; any other bad line raises ``ValueError`` naming file and line.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    nonempty = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    for j, (lineno, line) in enumerate(nonempty):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if skip_torn_last_line and j == len(nonempty) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
    return records


class MetricsLogger:
    """Appends one JSON line (and TensorBoard scalars) per logged step.

    Args:
      out_dir: directory for ``metrics.jsonl`` and ``tb/`` (created if missing).
      resume_step: if given, drop lines with ``step > resume_step`` first (resume from
        that checkpoint; pass 0 for a run that restored nothing and restarts from scratch).
        ``None``: append to what is there (only a torn last line is dropped).
      tensorboard: also write TensorBoard event files (if tensorboardX imports).
      filename: the JSON Lines file name inside ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        filename: str = "metrics.jsonl",
    ):
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, filename)
        self.dropped = self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except Exception as e:  # ImportError, or a broken protobuf install
                _warn_once("tensorboardX", f"tensorboardX unavailable ({e}); writing JSON Lines only")
            else:
                purge = None if resume_step is None else int(resume_step) + 1
                self._tb = SummaryWriter(logdir=os.path.join(self.out_dir, "tb"), purge_step=purge)

    def _truncate(self, resume_step: int | None) -> int:
        """Rewrites the file without ``step > resume_step`` lines / a torn tail -> #dropped."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
        kept = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    continue  # torn last line
                raise ValueError(f"{self.path}:{i + 1}: not a JSON object ({e.msg})") from e
            if resume_step is not None and int(record.get("step", -1)) > resume_step:
                continue
            kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return dropped

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, /, **more: Any) -> dict:
        """Writes one record ``{"step", "time", **metrics, **more}`` and flushes it.

        Returns the JSON-ready record (useful for a tqdm postfix). ``jax.Array`` values are
        fetched to the host here: log after the step's results are needed anyway, not
        inside the hot loop's asynchronous dispatch.
        """
        if self._file is None:
            raise RuntimeError(f"MetricsLogger({self.out_dir!r}) is closed")
        items = dict(metrics or {}, **more)
        for reserved in ("step", "time"):
            if reserved in items:
                raise ValueError(f"metrics field '{reserved}' is reserved (set by MetricsLogger.log)")
        record = {"step": int(step), "time": time.time()}
        record.update({k: to_jsonable(v, where=f"metrics.{k}", nonfinite="null") for k, v in items.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in _flatten_scalars({k: v for k, v in record.items() if k not in ("step", "time")}):
                self._tb.add_scalar(tag, value, global_step=record["step"])
        return record

    def histogram(self, tag: str, values, step: int) -> None:
        """A TensorBoard histogram of ``values`` (e.g. the instance weights) at ``step``; TensorBoard
        only (a distribution does not fit a JSON line), nothing without tensorboardX or values."""
        values = np.asarray(values, np.float64).reshape(-1)
        if self._tb is not None and values.size:
            self._tb.add_histogram(tag, values, global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both writers. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_postfix(metrics: Mapping[str, Any], *, keys: Iterable[str] | None = None, digits: int = 4) -> dict[str, str]:
    """Scalars -> short strings for ``tqdm.set_postfix(format_postfix(record))``.

    Args:
      metrics: a record (e.g. what :meth:`MetricsLogger.log` returns) or raw values.
      keys: which keys, in order (default: every scalar except ``step`` and ``time``).
      digits: significant digits (``'%.{digits}g'``).

    Vectors and mappings are skipped unless listed in ``keys``, in which case they are
    shown as ``a/b/c``.
    """
    chosen = list(keys) if keys is not None else [k for k in metrics if k not in ("step", "time")]
    out = {}
    for k in chosen:
        if k not in metrics:
            continue
        v = to_jsonable(metrics[k], where=f"metrics.{k}", nonfinite="null")
        if isinstance(v, Mapping):
            if keys is None:
                continue
            v = list(v.values())
        if isinstance(v, list):
            if keys is None:
                continue
            out[k] = "/".join("nan" if x is None else f"{x:.{digits}g}" for x in np.ravel(np.asarray(v, dtype=object)))
        elif v is None:
            out[k] = "nan"
        elif isinstance(v, float):
            out[k] = f"{v:.{digits}g}"
        else:
            out[k] = str(v)
    return out
