"""Train a DreamPRM process reward model with bi-level domain reweighting.

With no arguments: generates the synthetic multimodal benchmark (planted domain quality),
trains a small Qwen2-VL PRM on this machine's CPU with exact hypergradients, and prints the
learned domain weights beside the planted qualities. With ``--preset qwen2_vl_2b --model-dir
DIR --train-json F --meta-json F`` the same command trains the real 2B model on GPU/TPU.

    python -m experiments.train
    python -m experiments.train --hypergradient darts --out-dir runs/darts
    python -m experiments.train --no-reweighting --out-dir runs/vanilla
    python -m experiments.train --weighting instance_table --out-dir runs/instance   # a weight per record
    python -m experiments.train --weighting instance_table --record-weights-file runs/instance/instance_weights.json \
        --out-dir runs/retrained                                    # a fresh PRM under those weights, held fixed
    python -m experiments.train --resume --out-dir runs/default --iterations 600
    python -m experiments.train --resume auto --out-dir runs/preemptible   # continue if there is a checkpoint

Installed, ``dreamprm-train`` is the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dreamprm_jax.train.loop import TrainResult

PROG = "dreamprm-train"


@dataclasses.dataclass
class TrainRun:
    """A finished command-line training run: the trainer's result and, for the generated
    benchmark, the planted qualities and (with reweighting) their Spearman correlation with
    the learned weights."""

    result: TrainResult
    planted_quality: dict[str, float] | None
    spearman: float | None
    reweighting: bool = True
    weighting: str = "domain"


def run(cfg, *, create_out_dir_parents: bool = True) -> TrainRun:
    """Resolve the data and the model from ``cfg`` (:mod:`dreamprm_jax.train.demo`), train, and
    plot the run (``domain_weights.png``, ``losses.png``) on process 0.

    The run directory is checked before anything is generated, loaded or compiled
    (:func:`~dreamprm_jax.train.loop.check_run_dir`; ``create_out_dir_parents=False``: its
    parent must exist)."""
    from dreamprm_jax.evaluation.statistics import spearman
    from dreamprm_jax.train import demo, distributed, loop
    from dreamprm_jax.train.plots import plot_domain_weights, plot_losses

    loop.check_run_dir(cfg, create_parents=create_out_dir_parents)
    loop.start_processes(cfg)  # before anything touches a device
    cfg = dataclasses.replace(cfg, progress=cfg.progress and distributed.is_primary())
    # Process 0 first: the generated data and the tokenizer are then reused by the others.
    with distributed.primary_first("dreamprm_jax.sources"):
        source = demo.resolve_data(cfg)
        model = demo.resolve_model(cfg, source.data)
    result = loop.train(cfg, source.data, model)  # reads --record-weights-file, when given, itself
    if cfg.record_weights_file is not None:  # held fixed: nothing learned
        cfg = dataclasses.replace(cfg, reweighting=False)
    del model  # the trainer took over its parameters
    planted = source.planted_quality
    if result.metrics_path is not None:
        plot_domain_weights(result.metrics_path, os.path.join(result.out_dir, "domain_weights.png"),
                            planted_quality=planted)
        plot_losses(result.metrics_path, os.path.join(result.out_dir, "losses.png"))
    # Uniform weights (no reweighting) have no rank to correlate.
    rho = None if planted is None or not cfg.reweighting else spearman(result.weights,
                                                                         [planted[d] for d in result.domains])
    return TrainRun(result, planted, rho, cfg.reweighting, cfg.weighting)


def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns as wide as their widest cell; the first left-aligned, the others right-aligned."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *map(line, rows)]


def format_extremes(record_weights, count: int = 3) -> list[str]:
    """Per domain, the ``count`` highest- and lowest-weighted training records (key and weight)."""
    lines = [f"Instance weights: the {count} highest and lowest per domain (record key = weight)"]
    for domain, (top, bottom) in record_weights.extremes(count).items():
        lines.append(f"  {domain}")
        lines.append("    top:    " + ", ".join(f"{k} = {w:.4f}" for k, w in top))
        lines.append("    bottom: " + ", ".join(f"{k} = {w:.4f}" for k, w in bottom))
    return lines


def format_run(run: TrainRun) -> str:
    """The closing table: domain, planted quality (generated benchmark only), the weight, and
    the Spearman correlation when there is a planted quality and the weights were learned.
    With instance weights the weight column is each domain's mean, and the highest- and
    lowest-weighted records of each domain follow."""
    result = run.result
    planted = run.planted_quality
    learned = "learned weight" if run.weighting == "domain" else "mean instance weight"
    header = ["domain"] + (["planted quality"] if planted is not None else []) + [
        learned if run.reweighting else "weight (fixed)"]
    rows = []
    for i in np.argsort(-result.weights, kind="stable"):
        d = result.domains[i]
        quality = [f"{planted[d]:.3f}" if d in planted else "-"] if planted is not None else []
        rows.append([d, *quality, f"{result.weights[i]:.4f}"])
    lines = format_table(header, rows)
    if run.spearman is not None and np.isfinite(run.spearman):
        lines.append(f"Spearman({learned}, planted quality) = {run.spearman:.3f}")
    if result.record_weights is not None:
        lines += format_extremes(result.record_weights)
    lines.append(f"{result.step} iterations in {result.seconds:.1f} s ({result.compile_count} compiled programs)"
                 + (" [interrupted]" if result.interrupted else ""))
    return "\n".join(lines)


def build_parser(argv=None, prog: str = PROG):
    """(parser, preset defaults): ``--preset`` is read first, as it sets every other default."""
    from dreamprm_jax import configs

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=sorted(configs.PRESETS))
    known, _ = pre.parse_known_args(argv)
    defaults = configs.get(known.preset)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre])
    configs.add_arguments(parser, defaults)
    return parser, defaults


def main(argv=None, prog: str = PROG) -> int:
    from dreamprm_jax import configs

    parser, defaults = build_parser(argv, prog)
    args = parser.parse_args(argv)
    cfg = configs.from_arguments(args, defaults)

    from dreamprm_jax.train import loop

    try:
        # An --out-dir typed on the command line must have an existing parent (a typo is not created).
        finished = run(cfg, create_out_dir_parents=args.out_dir is None)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad records, bad run directory, unreadable files: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_run(finished))
    print(f"run directory: {finished.result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
