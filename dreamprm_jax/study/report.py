"""A study's results as numbers (``study.json``), a table (``report.md``) and plots.

``study.json`` holds at least ``{"paired": {"<arm>": {"diff": float, "ci95": [lo, hi]}}}``:
best-of-N accuracy (N = the largest of the study's ns) minus the baseline arm's, pooled over
the seeds run (:func:`dreamprm_jax.evaluation.statistics.paired_bootstrap`), plus per-seed
rows, best-of-n for every n, the untrained baselines, the learned weights beside the planted
quality (Spearman and its permutation p-value), AUROCs and wall times. Arms with a weight per
training record add ``instance_weight_auroc`` ``{domain: AUROC or null}``: how well the weights
rank the records whose label is correct above the others
(:func:`~dreamprm_jax.study.analysis.instance_weight_auroc`); the baseline arm then adds
``loss_auroc`` ``{"any" | "too_high" | "too_low": {domain: AUROC or null}}``, the same for
minus each record's loss under its PRM (no weight learned).

Two comparisons beyond the baseline: ``"versus_dreamprm"`` pairs every other learned arm with
``dreamprm`` (DreamPRM's own chain-MSE meta loss) the same way, so a new objective is judged
against the method it would replace; ``"selection_vs_step_auroc"`` correlates best-of-N with
each error type's step AUROC over every (seed, arm) cell, which says which kind of error a PRM
must learn to select well on this data (``selection_vs_step_auroc.png`` plots it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dreamprm_jax.evaluation import statistics
from dreamprm_jax.study.analysis import gap_closed
from dreamprm_jax.study.arms import ARMS, BASELINE_ARM
from dreamprm_jax.study.runner import SeedResult, StudyConfig

__all__ = ["summarize", "format_report", "write_study", "plot_best_of_n", "plot_weights",
           "plot_selection_vs_step_auroc"]

ORACLE_ARM = "oracle_weights"
#: The learned arm every other learned arm is also compared with: DreamPRM as published.
REFERENCE_ARM = "dreamprm"


def _pooled_difference(results: Sequence[SeedResult], arm: str, reference: str, n: int, resamples: int):
    """Pooled paired bootstrap of ``arm`` minus ``reference`` at best-of-n over the seeds that
    ran both; ``None`` when none did."""
    seeds = [r for r in results if arm in r.arms and reference in r.arms]
    if not seeds:
        return None
    diffs = [r.arms[arm].outcome.hits[n] - r.arms[reference].outcome.hits[n] for r in seeds]
    return {**statistics.paired_bootstrap(diffs, num_resamples=resamples, seed=0).to_dict(),
            "seeds": [r.seed for r in seeds], **_across_seeds([float(np.mean(d)) for d in diffs])}


def _across_seeds(diffs: list[float]) -> dict[str, Any]:
    """The per-seed differences and their spread: the paired bootstrap holds each seed's trained
    PRMs fixed, so only the seed-to-seed spread shows how much training itself varies.
    ``seed_t`` = mean / (sd / sqrt(seeds)) (``None`` with one seed or no spread)."""
    values = np.asarray(diffs, np.float64)
    sd = float(np.std(values, ddof=1)) if values.size > 1 else None
    t = float(np.mean(values) / (sd / np.sqrt(values.size))) if sd else None
    return {"per_seed": [float(v) for v in values], "seed_sd": sd, "seed_t": t}


def _selection_vs_step_auroc(results: Sequence[SeedResult], n: int) -> dict[str, dict[str, float]]:
    """Per error type: Pearson r of best-of-n accuracy against the step AUROC of that type over
    every (seed, arm) cell that measured it (``cells``: how many)."""
    cells: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        for run in r.arms.values():
            for kind, value in run.outcome.step_auroc.items():
                if np.isfinite(value):
                    cells.setdefault(kind, []).append((value, run.outcome.accuracy(n)))
    out = {}
    for kind, pairs in sorted(cells.items()):
        x, y = np.array(pairs).T  # [cells] each
        if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:  # a constant column has no correlation
            out[kind] = {"pearson_r": float(np.corrcoef(x, y)[0, 1]), "cells": int(x.size)}
    return out


def _arm_names(results: Sequence[SeedResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [a for a in r.arms if a not in names]
    return names


def summarize(config: StudyConfig, results: Sequence[SeedResult], wall_seconds: float) -> dict[str, Any]:
    """Everything the report shows, as plain JSON values."""
    n_max = max(config.ns)
    arms = _arm_names(results)
    paired: dict[str, Any] = {}
    paired_by_n: dict[str, Any] = {}
    for arm in arms:
        if arm == BASELINE_ARM:
            continue
        seeds = [r for r in results if arm in r.arms and BASELINE_ARM in r.arms]
        if not seeds:
            continue
        by_n, spread = {}, {}
        for n in config.ns:
            diffs = [r.arms[arm].outcome.hits[n] - r.arms[BASELINE_ARM].outcome.hits[n] for r in seeds]
            by_n[str(n)] = statistics.paired_bootstrap(diffs, num_resamples=config.resamples, seed=0).to_dict()
            if n == n_max:
                spread = _across_seeds([float(np.mean(d)) for d in diffs])
        paired_by_n[arm] = by_n
        paired[arm] = {**by_n[str(n_max)], "seeds": [r.seed for r in seeds], **spread}
    if ORACLE_ARM in paired:
        for arm, row in paired.items():
            if arm != ORACLE_ARM:
                share = gap_closed(row["diff"], paired[ORACLE_ARM]["diff"])
                row["share_of_oracle_gap"] = None if np.isnan(share) else share  # None: the oracle gained nothing

    versus_reference: dict[str, Any] = {}
    for arm in arms:
        if arm not in (BASELINE_ARM, REFERENCE_ARM, ORACLE_ARM) and ARMS[arm].overrides.get("reweighting"):
            row = _pooled_difference(results, arm, REFERENCE_ARM, n_max, config.resamples)
            if row is not None:
                versus_reference[arm] = row

    per_seed = []
    for r in results:
        row: dict[str, Any] = {"seed": r.seed, "num_questions": r.num_questions, "arms": {}, "baselines": {}}
        base = r.arms.get(BASELINE_ARM)
        for name, run in r.arms.items():
            entry = {
                "best_of_n": {str(n): run.outcome.accuracy(n) for n in config.ns},
                "within_question_auroc": run.outcome.within_question_auroc,
                "step_auroc": dict(run.outcome.step_auroc),
                "chain_score_std": run.outcome.score_std,
                "test_pairwise_loss": run.outcome.pairwise_loss,
                "test_scale_free_pairwise_loss": run.outcome.scale_free_pairwise_loss,
                "weights": run.weights,
                "train_seconds": run.train_seconds,
                "score_seconds": run.score_seconds,
            }
            if run.instance_weight_auroc:
                entry["instance_weight_auroc"] = dict(run.instance_weight_auroc)
            for wrong, values in run.instance_weight_auroc_by_direction.items():
                entry[f"instance_weight_auroc_label_{wrong}"] = dict(values)
            if run.loss_auroc:
                entry["loss_auroc"] = {wrong: dict(values) for wrong, values in run.loss_auroc.items()}
            if run.hypergradient_signal:
                entry["hypergradient_signal"] = {d: dataclasses.asdict(sig) for d, sig in run.hypergradient_signal.items()}
            if base is not None and name != BASELINE_ARM:
                diffs = [run.outcome.hits[n_max] - base.outcome.hits[n_max]]
                entry["paired"] = statistics.paired_bootstrap(diffs, num_resamples=config.resamples, seed=0).to_dict()
            quality = r.planted_quality or r.oracle_weights
            if quality and run.weights and ARMS[name].overrides.get("reweighting") and not ARMS[name].oracle_weights:
                domains = [d for d in run.weights if d in quality]
                w = [run.weights[d] for d in domains]
                q = [quality[d] for d in domains]
                entry["spearman_vs_quality"] = statistics.spearman(w, q)
                entry["spearman_p"] = statistics.spearman_permutation_p(w, q)
                entry["lowest_weight_domain"] = domains[int(np.argmin(w))]
            row["arms"][name] = entry
        for name, hits in r.baselines.items():
            row["baselines"][name] = {str(n): float(np.mean(h)) for n, h in hits.items()}
        row["planted_quality"] = r.planted_quality
        row["oracle_weights"] = r.oracle_weights
        per_seed.append(row)
    return {
        "paired": paired,
        "paired_by_n": paired_by_n,
        "versus_dreamprm": versus_reference,
        "selection_vs_step_auroc": _selection_vs_step_auroc(results, n_max),
        "n": n_max,
        "baseline_arm": BASELINE_ARM,
        "seeds": [r.seed for r in results],
        "per_seed": per_seed,
        "config": {"arms": list(config.arms), "ns": list(config.ns), "trials": config.trials,
                   "resamples": config.resamples, "aggregation": config.aggregation,
                   "iterations": config.train.iterations, "sampler": config.train.sampler,
                   "user_data": config.user_data is not None},
        "wall_seconds": wall_seconds,
    }


def _fmt_ci(row: dict) -> str:
    lo, hi = row["ci95"]
    return f"{row['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _fmt_auroc(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt_spread(row: dict) -> str:
    """``"sd (t)"`` across seeds; blank parts where there is one seed or no spread."""
    text = "" if row.get("seed_sd") is None else f"{row['seed_sd']:.3f}"
    return text + ("" if row.get("seed_t") is None else f" ({row['seed_t']:+.1f})")


def format_report(summary: dict[str, Any]) -> str:
    """Markdown: the pooled comparison, per-seed rows, weights, AUROCs."""
    n = summary["n"]
    seeds = summary["seeds"]
    lines = [f"# Reweighting study: best-of-{n}, seeds {', '.join(map(str, seeds))}", ""]
    lines += [f"Each arm minus `{summary['baseline_arm']}`: paired bootstrap over questions (95 % CI), pooled over "
              "seeds (mean of the seed means).", "",
              "| arm | " + " | ".join(f"best-of-{k} diff [95 % CI]" for k in summary["config"]["ns"])
              + f" | share of the oracle gap | best-of-{n} diff per seed | across seeds: sd (t) |",
              "|---|" + "---|" * len(summary["config"]["ns"]) + "---|---|---|"]
    for arm, by_n in summary["paired_by_n"].items():
        row = summary["paired"][arm]
        share = row.get("share_of_oracle_gap")
        share_text = "" if share is None else f"{share:.2f}"
        lines.append(f"| {arm} | " + " | ".join(_fmt_ci(by_n[str(k)]) for k in summary["config"]["ns"])
                     + f" | {share_text} | " + ", ".join(f"{d:+.3f}" for d in row.get("per_seed", []))
                     + f" | {_fmt_spread(row)} |")
    lines += ["", "The CI holds each seed's trained PRMs fixed (it is over questions); the sd and t across seeds "
                  "(t = mean / (sd / sqrt(seeds))) include how much training itself varies. "
                  "`vanilla_reseeded`, when run, is that variation alone."]
    if summary.get("versus_dreamprm"):
        lines += ["", f"Each other learned arm minus `{REFERENCE_ARM}` (DreamPRM's chain-MSE meta loss), best-of-{n}, "
                      "paired the same way:", "",
                  "| arm | diff [95 % CI] | seeds | diff per seed | across seeds: sd (t) |", "|---|---|---|---|---|"]
        for arm, row in summary["versus_dreamprm"].items():
            lines.append(f"| {arm} | {_fmt_ci(row)} | {', '.join(map(str, row['seeds']))} | "
                         + ", ".join(f"{d:+.3f}" for d in row["per_seed"]) + f" | {_fmt_spread(row)} |")
    if summary.get("selection_vs_step_auroc"):
        lines += ["", f"What selection depends on: Pearson r of best-of-{n} accuracy against each error type's step "
                      "AUROC, over every (seed, arm) cell:", "",
                  "| error type | r | cells |", "|---|---|---|"]
        for kind, row in summary["selection_vs_step_auroc"].items():
            lines.append(f"| {kind} | {row['pearson_r']:+.2f} | {row['cells']} |")
    lines += ["", f"Best-of-{n} accuracy per seed (untrained baselines on the right):", ""]
    arms = list(dict.fromkeys(a for row in summary["per_seed"] for a in row["arms"]))
    baselines = list(dict.fromkeys(b for row in summary["per_seed"] for b in row["baselines"]))
    lines.append("| seed | questions | " + " | ".join(arms + baselines) + " |")
    lines.append("|---|---|" + "---|" * (len(arms) + len(baselines)))
    for row in summary["per_seed"]:
        cells = [f"{row['arms'][a]['best_of_n'][str(n)]:.3f}" if a in row["arms"] else "" for a in arms]
        cells += [f"{row['baselines'][b][str(n)]:.3f}" if b in row["baselines"] else "" for b in baselines]
        lines.append(f"| {row['seed']} | {row['num_questions']} | " + " | ".join(cells) + " |")
    lines += ["", "Domain weights at the end of training (planted quality / oracle weight in the header):", ""]
    for row in summary["per_seed"]:
        quality = row["planted_quality"] or row["oracle_weights"] or {}
        domains = list(dict.fromkeys(d for a in row["arms"].values() for d in a["weights"]))
        lines.append(f"Seed {row['seed']}:")
        lines.append("")
        lines.append("| arm | " + " | ".join(f"{d} ({quality[d]:.2f})" if d in quality else d for d in domains)
                     + " | Spearman (p) | within-question AUROC | step AUROC by error type | chain score std "
                       "| test pairwise loss (scale-free) |")
        lines.append("|---|" + "---|" * (len(domains) + 5))
        for a, entry in row["arms"].items():
            rho = entry.get("spearman_vs_quality")
            rho_text = "" if rho is None else f"{rho:.3f} ({entry['spearman_p']:.3f})"
            steps = ", ".join(f"{k} {v:.3f}" for k, v in entry["step_auroc"].items())
            lines.append(f"| {a} | " + " | ".join(f"{entry['weights'].get(d, float('nan')):.3f}" for d in domains)
                         + f" | {rho_text} | {entry['within_question_auroc']:.3f} | {steps} | "
                           f"{entry['chain_score_std']:.3f} | {entry['test_pairwise_loss']:.3f} "
                           f"({entry['test_scale_free_pairwise_loss']:.3f}) |")
        lines.append("")
        signals = {a: e["hypergradient_signal"] for a, e in row["arms"].items() if e.get("hypergradient_signal")}
        if signals:
            lines += ["Hypergradient per domain over the second half of training: mean x 1e3 (t = mean / standard "
                      "error; positive pushes the weight down, |t| < 2 is indistinguishable from noise):", "",
                      "| arm | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
            for a, sig in signals.items():
                lines.append(f"| {a} | " + " | ".join(
                    f"{1e3 * sig[d]['mean']:+.2f} ({sig[d]['t']:+.1f})" if d in sig else "" for d in domains) + " |")
            lines.append("")
        label_auroc = {a: e["instance_weight_auroc"] for a, e in row["arms"].items() if e.get("instance_weight_auroc")}
        if label_auroc:
            lines += ["AUROC of the learned instance weights for \"the record's Monte-Carlo label is correct\" "
                      "(|accuracy - true label| < 0.5), per domain, against every wrong label and in brackets "
                      "against only the labels too high (an erroneous step labelled correct) / too low (a correct "
                      "step labelled wrong); 0.5: the weights do not tell them apart, blank: no such labels:", "",
                      "| arm | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]

            rows = [(a, values, row["arms"][a].get("instance_weight_auroc_label_too_high", {}),
                     row["arms"][a].get("instance_weight_auroc_label_too_low", {})) for a, values in label_auroc.items()]
            loss = row["arms"].get(BASELINE_ARM, {}).get("loss_auroc")
            if loss:
                rows.insert(0, (f"{BASELINE_ARM}: minus its loss, no weight learned", loss.get("any", {}),
                                loss.get("too_high", {}), loss.get("too_low", {})))
            for a, values, high, low in rows:
                lines.append(f"| {a} | " + " | ".join(
                    "" if values.get(d) is None
                    else f"{values[d]:.3f} ({_fmt_auroc(high.get(d))} / {_fmt_auroc(low.get(d))})"
                    for d in domains) + " |")
            if loss:
                lines.append("")
                lines.append(f"The first row ranks each record by minus its squared error under the `{BASELINE_ARM}` "
                             "PRM: what the unweighted PRM already says about its labels, the bar a learned weight "
                             "has to clear.")
            lines.append("")
    runs = [e for row in summary["per_seed"] for e in row["arms"].values()]
    reused = sum(1 for e in runs if e["train_seconds"] == 0.0)
    lines.append(f"Wall time: {summary['wall_seconds'] / 60:.1f} min "
                 f"({summary['config']['iterations']} iterations per arm, sampler `{summary['config']['sampler']}`"
                 + (f"; {reused} of {len(runs)} trained arms reused from an earlier run, their time not counted"
                    if reused else "") + ").")
    return "\n".join(lines) + "\n"


def plot_best_of_n(summary: dict[str, Any], path: str) -> str:
    """Accuracy against N per arm (mean over seeds), with the pooled 95 % CI of the difference
    to the baseline drawn as a band around the baseline's curve shifted by each arm's diff."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = summary["config"]["ns"]
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = summary["per_seed"]
    arms = list(dict.fromkeys(a for row in rows for a in row["arms"]))
    base_name = summary["baseline_arm"]
    base = [np.mean([row["arms"][base_name]["best_of_n"][str(k)] for row in rows if base_name in row["arms"]])
            for k in ns]
    for arm in arms:
        acc = [np.mean([row["arms"][arm]["best_of_n"][str(k)] for row in rows if arm in row["arms"]]) for k in ns]
        (line,) = ax.plot(ns, acc, marker="o", label=arm)
        if arm in summary["paired_by_n"]:
            lo = [b + summary["paired_by_n"][arm][str(k)]["ci95"][0] for b, k in zip(base, ns)]
            hi = [b + summary["paired_by_n"][arm][str(k)]["ci95"][1] for b, k in zip(base, ns)]
            ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.15)
    for name in dict.fromkeys(b for row in rows for b in row["baselines"]):
        acc = [np.mean([row["baselines"][name][str(k)] for row in rows]) for k in ns]
        ax.plot(ns, acc, linestyle="--", linewidth=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(k) for k in ns])
    ax.set_xlabel("N (candidates per question)")
    ax.set_ylabel("best-of-N accuracy")
    ax.set_title("Best-of-N (bands: 95 % CI of the paired difference to " + base_name + ")")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(results: Sequence[SeedResult], path: str) -> str | None:
    """Learned weight trajectories (from each reweighting arm's metrics.jsonl), one panel per
    seed and arm, each domain labelled with its planted quality."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamprm_jax.train.metrics import read_jsonl

    panels = [(r, run) for r in results for name, run in r.arms.items()
              if ARMS[name].overrides.get("reweighting") and os.path.isfile(os.path.join(run.run_dir, "metrics.jsonl"))]
    if not panels:
        return None
    seeds = list(dict.fromkeys(r.seed for r, _ in panels))
    arms = list(dict.fromkeys(run.arm for _, run in panels))
    # one row per seed, one column per arm (a panel left empty where a seed did not run an arm)
    fig, axes = plt.subplots(len(seeds), len(arms), figsize=(3.6 * len(arms), 2.8 * len(seeds)), squeeze=False,
                             sharex=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, (r, run) in enumerate(panels):
        ax = axes[seeds.index(r.seed)][arms.index(run.arm)]
        ax.set_visible(True)
        records = [x for x in read_jsonl(os.path.join(run.run_dir, "metrics.jsonl")) if "domain_weights" in x]
        steps = [x["step"] for x in records]
        quality = r.planted_quality or r.oracle_weights or {}
        for d in run.weights:
            label = f"{d} ({quality[d]:.2f})" if d in quality else d
            values = [x["domain_weights"].get(d) for x in records]  # null: no row of d that iteration
            ax.plot(steps, [np.nan if v is None else v for v in values], label=label)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title(f"seed {r.seed}: {run.arm}", fontsize=9)
        ax.set_xlabel("iteration")
        if arms.index(run.arm) == 0:
            ax.set_ylabel("domain weight")
        if i == 0:  # one legend for the figure: every panel has the same domains
            fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncol=len(run.weights), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_size_inches()[1]))  # room for the legend
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_selection_vs_step_auroc(summary: dict[str, Any], path: str) -> str | None:
    """Best-of-N accuracy against the step AUROC of each error type, one point per (seed, arm),
    one panel per error type; ``None`` when no arm measured a step AUROC."""
    kinds = list(summary.get("selection_vs_step_auroc") or {})
    if not kinds:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = str(summary["n"])
    arms = list(dict.fromkeys(a for row in summary["per_seed"] for a in row["arms"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for i, arm in enumerate(arms):
            points = [(row["arms"][arm]["step_auroc"][kind], row["arms"][arm]["best_of_n"][n])
                      for row in summary["per_seed"] if kind in row["arms"].get(arm, {}).get("step_auroc", {})]
            if points:
                x, y = zip(*points)
                ax.scatter(x, y, s=18, marker="osD^v<>"[i % 7], label=arm)
        r = summary["selection_vs_step_auroc"][kind]["pearson_r"]
        ax.set_title(f"error type {kind}: r = {r:+.2f}", fontsize=9)
        ax.set_xlabel(f"step AUROC, type {kind}")
        ax.ticklabel_format(axis="x", useOffset=False)  # AUROCs within 1e-4 of 1 read as 1.0000, not as an offset
    axes[0][0].set_ylabel(f"best-of-{n} accuracy")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_study(config: StudyConfig, results: Sequence[SeedResult],
                wall_seconds: float) -> tuple[dict[str, str], str]:
    """Writes study.json, report.md and the plots into ``config.out_dir``; returns their paths
    and the report's text."""
    from dreamprm_jax.utils.jsonable import write_json

    summary = summarize(config, results, wall_seconds)
    paths = {"json": os.path.join(config.out_dir, "study.json"), "report": os.path.join(config.out_dir, "report.md")}
    write_json(paths["json"], summary, nonfinite="null")  # NaN (e.g. no oracle gap) -> null
    text = format_report(summary)
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(text)
    paths["best_of_n_png"] = plot_best_of_n(summary, os.path.join(config.out_dir, "best_of_n.png"))
    selection_png = plot_selection_vs_step_auroc(summary, os.path.join(config.out_dir, "selection_vs_step_auroc.png"))
    if selection_png:
        paths["selection_vs_step_auroc_png"] = selection_png
    weights_png = plot_weights(results, os.path.join(config.out_dir, "weights.png"))
    if weights_png:
        paths["weights_png"] = weights_png
    return paths, text
