"""What each meta loss says about each training record, at a trained PRM.

    python -m experiments.train --no-reweighting --out-dir runs/vanilla
    python -m experiments.influence --run-dir runs/vanilla
    python -m experiments.influence --run-dir runs/vanilla --meta-losses listwise,chain_mse --meta-batches 64

For every record, the first-order influence of its label on the meta loss at the run's
exported PRM: grad L_meta . grad (p_i - y_i)^2, positive when training on the record also
lowers the meta loss (dreamprm_jax.train.record_influence). It is what an instance table entry's
hypergradient says at that PRM, for every record at once and with nothing trained, so it
shows in about a minute whether a meta loss can tell a table which labels to trust.

Writes <out>/<meta loss>.json (record key -> influence). When the training records carry
their true label (the generated benchmark's "true_label"), prints per domain the AUROC of the
influence for "the record's label is correct" (0.5: no signal; below 0.5: the meta loss asks
for the wrong labels), also against only the labels too high and only those too low. Run
from the directory the training ran in (the run's relative data paths resolve against it).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def parse_args(argv=None, prog: str = "dreamprm-influence"):
    from dreamprm_jax import bilevel

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished run of python -m experiments.train (its checkpoints "
                   "name the data, export/ holds the PRM)")
    p.add_argument("--meta-losses", default=",".join(bilevel.META_LOSSES),
                   help=f"comma-separated meta losses among {', '.join(bilevel.META_LOSSES)} (default: all)")
    p.add_argument("--aggregation", default=None, choices=bilevel.CHAIN_REDUCTIONS,
                   help="how the meta loss scores a chain (default: the run's)")
    p.add_argument("--meta-batches", type=int, default=32,
                   help="meta batches the meta-loss gradient is averaged over (default: 32)")
    p.add_argument("--out", default=None, help="output directory (default: <run-dir>/record_influence)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def format_aurocs(name: str, aurocs: dict[str, dict[str, float | None]]) -> list[str]:
    """One line per domain: AUROC against every wrong label (too high / too low)."""

    def cell(v):
        return "–" if v is None else f"{v:.3f}"

    lines = [f"{name}: AUROC of the influence for 'label correct' (all wrong labels; too high / too low)"]
    for domain, value in aurocs["any"].items():
        lines.append(f"  {domain:<24} {cell(value)} ({cell(aurocs['too_high'].get(domain))} / "
                     f"{cell(aurocs['too_low'].get(domain))})")
    return lines


def main(argv=None, prog: str = "dreamprm-influence") -> int:
    args = parse_args(argv, prog)
    import dataclasses

    from dreamprm_jax.data.jsonfiles import write_number_map
    from dreamprm_jax.study.analysis import instance_weight_aurocs
    from dreamprm_jax.train import demo
    from dreamprm_jax.train.record_influence import export_record_influence
    from dreamprm_jax.train.run_dir import saved_config

    names = [m.strip() for m in args.meta_losses.split(",") if m.strip()]
    export_dir = os.path.join(args.run_dir, "export")
    try:
        if not os.path.isdir(export_dir):
            raise FileNotFoundError(f"{export_dir}: no export; expected a finished run of python -m experiments.train")
        cfg, _ = saved_config(args.run_dir)
        cfg = dataclasses.replace(cfg, progress=False, aggregation=args.aggregation or cfg.aggregation)
        data = demo.resolve_data(cfg).data
        influence = export_record_influence(export_dir, cfg, data, names, args.meta_batches,
                                            progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "record_influence")
    os.makedirs(out, exist_ok=True)
    for name, values in influence.items():
        path = write_number_map(os.path.join(out, f"{name}.json"), values)
        aurocs = instance_weight_aurocs(data.train_json, values)
        if any(v is not None for per in aurocs.values() for v in per.values()):
            print("\n".join(format_aurocs(f"{name} ({cfg.aggregation})", aurocs)))
        else:  # no true labels to score against
            print(f"{name} ({cfg.aggregation}): the records carry no true label to score against; mean influence "
                  f"{np.mean(list(values.values())):+.3e} over {len(values)} records")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
