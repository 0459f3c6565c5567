"""PNG plots of a training run, read from its JSON Lines metrics log.

- :func:`plot_domain_weights`: one line per domain of the normalised weights
  ``w_k = softplus(r_k) / mean_j softplus(r_j)`` over steps (their mean is 1, drawn as a
  dashed reference). With ``planted_quality`` (synthetic runs, where each domain's label
  quality is known) each line is labelled with it, so one sees at a glance whether the
  learned weights order the domains as the planted quality does.
- :func:`plot_losses`: inner (weighted MSE) and meta (aggregation) losses over steps,
  one panel each.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display
needed, the global backend is left alone).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dreamprm_jax.train.metrics import read_jsonl

__all__ = ["plot_domain_weights", "plot_losses", "domain_weight_series"]

Records = str | os.PathLike | Sequence[Mapping[str, Any]]


def _records(log: Records) -> list[Mapping[str, Any]]:
    if isinstance(log, (str, os.PathLike)):
        return read_jsonl(log)
    return list(log)


def _value(x: Any) -> float:
    return np.nan if x is None else float(x)


def domain_weight_series(
    log: Records, *, key: str = "domain_weights", domain_names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Extracts ``(steps [T], names [K], weights [T, K])`` from the records that carry ``key``.

    ``record[key]`` is either ``{name: weight}`` (names from the first such record) or a
    list ``[K]`` (names from ``domain_names``, else ``"domain 0"``, ...). Missing values
    (``null``) become NaN.
    """
    rows = [r for r in _records(log) if r.get(key) is not None]
    where = log if isinstance(log, (str, os.PathLike)) else "records"
    if not rows:
        raise ValueError(f"{where}: no record has a '{key}' field")
    first = rows[0][key]
    if isinstance(first, Mapping):
        names = list(first)
        try:
            weights = [[_value(r[key][n]) for n in names] for r in rows]
        except KeyError as e:
            raise ValueError(f"{where}: a '{key}' record lacks domain {e}; expected {names}") from e
    else:
        k = len(first)
        names = list(domain_names) if domain_names is not None else [f"domain {i}" for i in range(k)]
        if len(names) != k:
            raise ValueError(f"{where}: '{key}' has {k} entries but {len(names)} domain_names were given")
        for r in rows:
            if len(r[key]) != k:
                raise ValueError(f"{where}: step {r.get('step')}: '{key}' has {len(r[key])} entries, expected {k}")
        weights = [[_value(x) for x in r[key]] for r in rows]
    steps = np.asarray([r["step"] for r in rows], dtype=np.int64)  # [T]
    return steps, names, np.asarray(weights, dtype=np.float64)  # [T, K]


def _save(fig: Figure, out_path: str | os.PathLike) -> str:
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, format="png", dpi=110)
    return out_path


def plot_domain_weights(
    log: Records,
    out_path: str | os.PathLike,
    *,
    key: str = "domain_weights",
    domain_names: Sequence[str] | None = None,
    planted_quality: Mapping[str, float] | Sequence[float] | None = None,
    title: str | None = None,
) -> str:
    """Writes a PNG of the domain-weight trajectories; returns its path.

    Args:
      log: path of a metrics JSON Lines file, or its records.
      out_path: the PNG to write (parent directories are created).
      key: the record field holding the weights (see :func:`domain_weight_series`).
      domain_names: names for list-valued weights.
      planted_quality: the known quality of each domain (by name, or in domain order),
        shown in the legend and as a label at the end of each line.
      title: figure title.
    """
    steps, names, weights = domain_weight_series(log, key=key, domain_names=domain_names)
    quality = None
    if planted_quality is not None:
        if isinstance(planted_quality, Mapping):
            missing = [n for n in names if n not in planted_quality]
            if missing:
                raise ValueError(f"planted_quality lacks domains {missing}; have {sorted(planted_quality)}")
            quality = [float(planted_quality[n]) for n in names]
        else:
            quality = [float(q) for q in planted_quality]
            if len(quality) != len(names):
                raise ValueError(f"planted_quality has {len(quality)} entries, expected {len(names)} domains")

    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for k, name in enumerate(names):
        label = name if quality is None else f"{name} (quality {quality[k]:.2f})"
        (line,) = ax.plot(steps, weights[:, k], label=label, linewidth=1.5)
        if quality is not None:
            finite = np.flatnonzero(np.isfinite(weights[:, k]))
            if finite.size:
                j = finite[-1]
                ax.annotate(f"q={quality[k]:.2f}", (steps[j], weights[j, k]), xytext=(4, 0),
                            textcoords="offset points", fontsize=8, color=line.get_color(), va="center")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("domain weight  w = softplus(r) / mean softplus(r)")
    if quality is not None:
        ax.margins(x=0.08)  # room for the end-of-line labels
    ax.set_title(title or "Domain weights")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncol=1 if len(names) <= 8 else 2)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_losses(
    log: Records,
    out_path: str | os.PathLike,
    *,
    keys: Sequence[str] = ("inner_loss", "meta_loss"),
    log_scale: bool = False,
    title: str | None = None,
) -> str:
    """Writes a PNG with one panel per loss in ``keys`` (those present); returns its path."""
    records = _records(log)
    present = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not present:
        where = log if isinstance(log, (str, os.PathLike)) else "records"
        raise ValueError(f"{where}: none of the loss fields {list(keys)} is present")
    fig = Figure(figsize=(5 * len(present), 3.8))
    for i, k in enumerate(present):
        rows = [r for r in records if k in r]  # null (non-finite) values plot as gaps
        steps = np.asarray([r["step"] for r in rows])  # [T]
        values = np.asarray([_value(r.get(k)) for r in rows], dtype=np.float64)  # [T]
        ax = fig.add_subplot(1, len(present), i + 1)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(k)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_path)
