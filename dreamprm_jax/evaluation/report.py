"""Reports: text tables, a JSON file with every number, a PNG of accuracy versus N.

Accuracies are printed in percent as ``mean ± std`` over trials (the std is omitted
where it is exactly 0, i.e. deterministic methods at the full N). Column "Overall"
is the mean over questions (micro); "Macro" the mean over benchmarks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from dreamprm_jax.evaluation.candidates import LoadReport
from dreamprm_jax.evaluation.selection import OVERALL_MACRO, OVERALL_MICRO, Stat, SweepResult
from dreamprm_jax.utils.jsonable import write_json

__all__ = [
    "ReportFiles",
    "format_report",
    "format_step_metrics",
    "format_sweep_table",
    "format_table",
    "plot_accuracy_vs_n",
    "report_dict",
    "write_json",
    "write_report",
]

_SCOPE_TITLES = {OVERALL_MICRO: "Overall", OVERALL_MACRO: "Macro"}


def _cell(stat: Stat, std: bool) -> str:
    text = f"{100 * stat.mean:.1f}"
    if std and stat.std > 0:
        text += f" ± {100 * stat.std:.1f}"
    return text


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def format_table(result: SweepResult, n: int | None = None, *, std: bool = True) -> str:
    """Methods x (benchmarks, Overall, Macro) at one n (default: all candidates)."""
    n = result.max_candidates if n is None else n
    if n not in result.ns:
        raise ValueError(f"format_table: n={n} not in the sweep {result.ns}")
    header = ["Method"] + [_SCOPE_TITLES.get(s, s) for s in result.scopes]
    rows = [[m] + [_cell(result.accuracy[m][n][s], std) for s in result.scopes] for m in result.methods]
    counts = ", ".join(f"{b}: {c}" for b, c in result.num_questions.items())
    title = (f"Best-of-{n} accuracy (%), {result.num_trials} trials, seed {result.seed}; "
             f"questions {counts}")
    return title + "\n" + _grid(header, rows)


def format_sweep_table(result: SweepResult, scope: str = OVERALL_MICRO, *, std: bool = True) -> str:
    """Methods x n for one scope (a benchmark, "overall_micro" or "overall_macro")."""
    if scope not in result.scopes:
        raise ValueError(f"format_sweep_table: unknown scope {scope!r}; expected one of {result.scopes}")
    header = ["Method"] + [f"N={n}" for n in result.ns]
    rows = [[m] + [_cell(result.accuracy[m][n][scope], std) for n in result.ns] for m in result.methods]
    return f"Accuracy (%) versus N, {_SCOPE_TITLES.get(scope, scope)}\n" + _grid(header, rows)


def _num(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_step_metrics(metrics: Mapping[str, Any]) -> str:
    """Step-level table from :func:`metrics.step_metrics`."""
    header = ["Scope", "steps", "F1 corr", "F1 incorr", "macro F1", "chains", "1st-err acc",
              "err acc", "ok acc", "HM"]
    rows = []
    scopes = list(metrics.get("per_benchmark", {}).items()) + [("Overall", metrics["overall"])]
    for name, m in scopes:
        f, e = m["step_f1"], m["first_error"]
        rows.append([name, str(f["num_steps"]), _num(f["f1_correct"]), _num(f["f1_incorrect"]),
                     _num(f["macro_f1"]), str(e["num_chains"]), _num(e["accuracy"]),
                     _num(e["accuracy_erroneous"]), _num(e["accuracy_correct"]), _num(e["harmonic_mean"])])
    return f"Step-level error detection (%), threshold {metrics['threshold']}\n" + _grid(header, rows)


def report_dict(result: SweepResult, *, step_metrics: Mapping[str, Any] | None = None,
                load_report: LoadReport | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything as plain JSON types."""
    out: dict[str, Any] = {"selection": result.to_dict()}
    if step_metrics is not None:
        out["step_metrics"] = dict(step_metrics)
    if load_report is not None:
        out["data"] = load_report.to_dict()
    if extra:
        out["extra"] = dict(extra)
    return out


def plot_accuracy_vs_n(result: SweepResult, path: str | os.PathLike, *, scope: str = OVERALL_MICRO,
                       methods: Sequence[str] | None = None) -> str:
    """PNG: accuracy (%) versus N, one line per method, ± std error bars (matplotlib Agg)."""
    # A bare Figure renders through the Agg canvas; pyplot (and its global backend
    # state) is never imported, so this is safe in headless and threaded code.
    from matplotlib.figure import Figure

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for m in methods or result.methods:
        means = [100 * result.accuracy[m][n][scope].mean for n in result.ns]
        stds = [100 * result.accuracy[m][n][scope].std for n in result.ns]
        ax.errorbar(result.ns, means, yerr=stds, marker="o", capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(result.ns))
    ax.set_xticklabels([str(n) for n in result.ns])
    ax.set_xlabel("N (candidates per question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Best-of-N accuracy, {_SCOPE_TITLES.get(scope, scope)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


class ReportFiles(NamedTuple):
    """What :func:`write_report` wrote: the text it wrote (tables) and the three paths."""

    text: str
    text_path: str
    json_path: str
    png_path: str


def format_report(result: SweepResult, *, step_metrics: Mapping[str, Any] | None = None,
                  step_metrics_label: str | None = None,
                  more_step_metrics: Mapping[str, Mapping[str, Any]] | None = None,
                  load_report: LoadReport | None = None) -> str:
    """The text report: the best-of-N table, the accuracy-versus-N tables (micro, macro) when
    the sweep has several N, the step-level table of ``step_metrics`` (headed ``[label]`` when
    ``step_metrics_label`` is given), skipped records, then one step-level table per entry of
    ``more_step_metrics`` (``{label: metrics}``)."""
    parts = [format_table(result)]
    if len(result.ns) > 1:
        parts.append(format_sweep_table(result, OVERALL_MICRO))
        parts.append(format_sweep_table(result, OVERALL_MACRO))
    if step_metrics is not None:
        label = "" if step_metrics_label is None else f"[{step_metrics_label}] "
        parts.append(label + format_step_metrics(step_metrics))
    if load_report is not None and load_report.num_skipped:
        parts.append(f"Skipped records: {dict(load_report.skipped)} of {load_report.num_records}")
    text = "\n\n".join(parts) + "\n"
    for label, metrics in (more_step_metrics or {}).items():
        text += f"\n[{label}] " + format_step_metrics(metrics) + "\n"
    return text


def write_report(out_dir: str | os.PathLike, result: SweepResult, *,
                 step_metrics: Mapping[str, Any] | None = None, step_metrics_label: str | None = None,
                 more_step_metrics: Mapping[str, Mapping[str, Any]] | None = None,
                 load_report: LoadReport | None = None, extra: Mapping[str, Any] | None = None,
                 name: str = "best_of_n") -> ReportFiles:
    """Write ``<name>.txt`` (:func:`format_report`), ``<name>.json`` (:func:`report_dict`: the
    numbers of ``step_metrics``, not of ``more_step_metrics``; put those in ``extra``) and
    ``<name>.png``; returns the text and the paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    text = format_report(result, step_metrics=step_metrics, step_metrics_label=step_metrics_label,
                         more_step_metrics=more_step_metrics, load_report=load_report)
    text_path = os.path.join(out_dir, f"{name}.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(text)
    json_path = write_json(os.path.join(out_dir, f"{name}.json"),
                           report_dict(result, step_metrics=step_metrics, load_report=load_report, extra=extra),
                           sort_keys=True)
    png_path = plot_accuracy_vs_n(result, os.path.join(out_dir, f"{name}.png"))
    return ReportFiles(text, text_path, json_path, png_path)
