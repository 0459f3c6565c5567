"""Bad-record accounting of a run: what each records file gave, what was skipped and why.

With ``on_bad_record="skip"`` a trainer drops the bad records of its files; this module
says how many, whatever the progress settings, and keeps it in the run directory as
``data_report.json``::

    {"on_bad_record": "skip",
     "files": [{"kind": "meta", "file": ".../meta.json", "read": 500, "kept": 128,
                "skipped": {"bad_steps": 372},
                "first_errors": [{"file": ..., "record": 0, "line": null, "field": "input",
                                  "reason": "bad_steps", "message": "..."}, ...]},
               ...],
     "skipped": {"bad_steps": 372}}     # all files together

``read`` counts the records of the file; ``kept`` the records trained on (a TRL row of S
steps is S training records, so ``kept`` may exceed ``read - sum(skipped)`` there).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, NamedTuple, Sequence

__all__ = ["DATA_REPORT", "FileReport", "file_report", "format_skips", "write_data_report"]

DATA_REPORT = "data_report.json"


class FileReport(NamedTuple):
    """One records file: its kind (train / meta), path, records read and kept, skips per
    reason and the first few bad records (dicts: file, record, line, field, reason, message)."""

    kind: str
    file: str
    read: int
    kept: int
    skipped: dict[str, int]
    first_errors: list[dict[str, Any]]


def file_report(kind: str, table) -> FileReport:
    """The report of a prepared table (:class:`~dreamprm_jax.data.dataset.PreparedData`)."""
    info = table.info
    return FileReport(kind, str(info.get("records_file", "")), int(info.get("num_read", 0)),
                      int(info["num_records"]), dict(info.get("skipped", {})), list(info.get("first_errors", [])))


def format_skips(reports: Sequence[FileReport]) -> list[str]:
    """One line per file that lost records: ``[data] meta (FILE): skipped 372 of 500 records
    (bad_steps: 372); kept 128``. Empty when nothing was skipped."""
    lines = []
    for r in reports:
        total = sum(r.skipped.values())
        if total:
            reasons = ", ".join(f"{k}: {n}" for k, n in Counter(r.skipped).most_common())
            lines.append(f"[data] {r.kind} ({r.file}): skipped {total} of {r.read} records ({reasons}); "
                         f"kept {r.kept}")
    return lines


def write_data_report(out_dir: str, reports: Sequence[FileReport], on_bad_record: str) -> str:
    """Write ``out_dir/data_report.json`` (see the module docstring) atomically; returns its path."""
    total: Counter = Counter()
    for r in reports:
        total.update(r.skipped)
    doc = {"on_bad_record": on_bad_record, "files": [r._asdict() for r in reports], "skipped": dict(total)}
    path = os.path.join(out_dir, DATA_REPORT)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path
