"""Compare hypergradient methods with exact at checkpoints of a real training run.

    python -m experiments.train --out-dir runs/default --checkpoint-every 60 --keep-checkpoints 10
    python -m experiments.compare_hypergradients --run-dir runs/default
    python -m experiments.compare_hypergradients --run-dir runs/default --methods darts,sama,neumann --draws 4

At the checkpoints nearest to the start, 1/4, 1/2 and the end of the run (the start is the
run's initial state rebuilt from its config and seed; the trainer keeps only
--keep-checkpoints of them, so train with enough), the run's state (parameters, inner AdamW
state, raw domain weights) is restored and each method's hypergradient is computed on the
next --draws batches the run's samplers give, with the run's model, losses and optimizer.
Reported per checkpoint and method: cosine and relative error to exact, the share of the K
domains whose sign agrees, the median time per call after compilation. Writes
<out>/hypergradient_audit.json and .png and prints a table. A run with instance weights
(--weighting instance_table or instance_net) is compared on its table (the entries of the
records each draw's batches hold) or on its net's parameters.

"exact" is exact for the T-step unrolled objective (T = the run's --unroll); the
short-horizon bias of stopping at T remains (Wu et al., ICLR 2018). Run from the directory
the training ran in (the run's relative data and cache paths resolve against it), on a
finished or stopped run.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None, prog: str = "dreamprm-compare-hypergradients"):
    from dreamprm_jax import bilevel

    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory written by python -m experiments.train")
    p.add_argument("--methods", default=",".join(bilevel.METHODS),
                   help="comma-separated hypergradient methods; exact is always added as the reference")
    p.add_argument("--draws", type=int, default=2, help="batch draws per checkpoint")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method and draw (median reported)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="checkpoint steps to audit (0: the initial state); default: nearest to 0, 1/4, 1/2, end")
    p.add_argument("--darts-r", type=float, default=0.01, help="DARTS / SAMA radius R (eps = R / ||v||)")
    p.add_argument("--darts-lr-eff", type=float, default=1.0, help="DARTS scale lr_eff (1 = Betty's convention)")
    p.add_argument("--neumann-k", type=int, default=3, help="Neumann series terms")
    p.add_argument("--neumann-step", type=float, default=1.0, help="Neumann step size")
    p.add_argument("--cg-k", type=int, default=3, help="conjugate-gradient iterations")
    p.add_argument("--damping", type=float, default=0.0, help="Hessian damping for neumann / cg")
    p.add_argument("--truncate-k", type=int, default=1, help="steps kept by truncated")
    p.add_argument("--out", default=None, help="output directory (default: <run-dir>/hypergradient_audit)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def method_options(args) -> dict[str, dict]:
    return {
        "truncated": {"k": args.truncate_k},
        "darts": {"R": args.darts_r, "lr_eff": args.darts_lr_eff},
        "darts_exact": {"lr_eff": args.darts_lr_eff}, "sama": {"R": args.darts_r},
        "neumann": {"k": args.neumann_k, "step_size": args.neumann_step, "damping": args.damping},
        "cg": {"k": args.cg_k, "damping": args.damping},
    }


def main(argv=None, prog: str = "dreamprm-compare-hypergradients") -> int:
    args = parse_args(argv, prog)
    from dreamprm_jax.train import hypergradient_audit as audit_lib
    from dreamprm_jax.utils.jsonable import write_json

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        audit = audit_lib.audit_run(args.run_dir, methods, draws=args.draws, repeats=args.repeats,
                                    method_options=method_options(args), steps=args.steps, progress=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(audit_lib.format_audit(audit))
    out = args.out or os.path.join(args.run_dir, "hypergradient_audit")
    os.makedirs(out, exist_ok=True)
    path = write_json(os.path.join(out, "hypergradient_audit.json"), audit.to_dict(), nonfinite="null")
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {audit_lib.plot_audit(audit, os.path.join(out, 'hypergradient_audit.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
