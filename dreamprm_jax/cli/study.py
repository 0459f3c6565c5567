"""Does domain reweighting help best-of-N selection, and how sure are we?

Per seed: generates the benchmark (or reads your files), trains every arm on the same
budget from the same initialisation, scores the best-of-N test set with each trained PRM,
and compares each arm with the vanilla PRM by a paired bootstrap over questions (pooled over
seeds). Arms: vanilla (uniform weights), dreamprm (exact hypergradients), darts (DARTS),
oracle_weights (weights fixed from the planted quality: the room correct weights leave).
Writes study.json, report.md, best_of_n.png and weights.png into --out-dir; every finished
piece (data, trained arms, test scores) is reused when the command is run again, so an
interrupted study continues where it stopped.

    python -m experiments.study --quick                 # one seed, about 8 minutes on 2 idle CPU cores
    python -m experiments.study --seeds 0 1 2 3 4       # the full protocol
    python -m experiments.study --train-json train.json --meta-json meta.json --image-root imgs \\
        --candidates bon.jsonl --oracle-weights weights.json --seeds 0 1 2

Installed, ``dreamprm-study`` is the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

PROG = "dreamprm-study"
DEFAULT_ARMS = ("vanilla", "dreamprm", "darts", "oracle_weights")
QUICK_ARMS = ("vanilla", "dreamprm", "oracle_weights")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from dreamprm_jax.study.arms import ARMS

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="seeds (each: its own generated data, initialisation and data order); default 0 1 2 3 4, "
                        "with --quick the first given seed or 0")
    p.add_argument("--quick", action="store_true",
                   help=f"one seed and the arms {', '.join(QUICK_ARMS)} (about 8 minutes on 2 idle CPU cores, "
                        "from nothing)")
    p.add_argument("--arms", default=None,
                   help=f"comma-separated arms among {', '.join(ARMS)} (default: {','.join(DEFAULT_ARMS)}; "
                        "vanilla is always run: every arm is compared with it)")
    p.add_argument("--out-dir", default=os.path.join("runs", "study"), help="where everything is written")
    p.add_argument("--iterations", type=int, default=None,
                   help="bi-level iterations per arm (default: the training default)")
    p.add_argument("--train-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a training-config field for every arm (repeatable), e.g. --train-option meta_lr=0.1 "
                        "--train-option unroll=10; the fields are those of dreamprm-train's flags, with underscores")
    p.add_argument("--test-questions", type=int, default=None,
                   help="best-of-N questions of the generated test set (default: the generator's, 2,000)")
    p.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8], metavar="N", help="best-of-N sizes")
    p.add_argument("--trials", type=int, default=20, help="random candidate subsets per question for N below the "
                                                          "candidate count")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or messages")
    user = p.add_argument_group("your own data (instead of the generated benchmark)")
    user.add_argument("--train-json", default=None, help="DreamPRM training records")
    user.add_argument("--meta-json", default=None, help="DreamPRM meta records")
    user.add_argument("--image-root", default=None, help="directory the records' image paths are resolved against")
    user.add_argument("--candidates", default=None, help="best-of-N candidates file (the format experiments.evaluate "
                                                         "reads)")
    user.add_argument("--candidates-image-root", default=None, help="image root of the candidates file")
    user.add_argument("--oracle-weights", default=None, metavar="FILE",
                      help="JSON object {domain: weight}; the oracle_weights arm runs only with it")
    return p


def config_from_args(args) -> "StudyConfig":
    from dreamprm_jax import configs
    from dreamprm_jax.data import synthetic
    from dreamprm_jax.study.runner import StudyConfig, UserData, read_oracle_weights

    user_fields = (args.train_json, args.meta_json, args.candidates)
    if any(f is not None for f in user_fields) and not all(f is not None for f in user_fields):
        raise ValueError("your own data needs --train-json, --meta-json and --candidates together")
    if args.oracle_weights is not None and args.train_json is None:
        raise ValueError("--oracle-weights is for your own data; the generated benchmark brings its own")
    user = None
    if args.train_json is not None:
        user = UserData(args.train_json, args.meta_json, args.candidates, image_root=args.image_root,
                        candidates_image_root=args.candidates_image_root,
                        oracle_weights=None if args.oracle_weights is None else read_oracle_weights(args.oracle_weights))
    seeds = tuple(args.seeds) if args.seeds else (0, 1, 2, 3, 4)
    if args.quick:
        seeds = seeds[:1] if args.seeds else (0,)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else (
        QUICK_ARMS if args.quick else DEFAULT_ARMS)
    train = configs.default()
    if args.iterations is not None:
        if args.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
        train = dataclasses.replace(train, iterations=args.iterations)
    train = dataclasses.replace(train, **dict(configs.parse_override(o) for o in args.train_option))
    generated = None
    if user is None:
        generated = synthetic.default_config()
        if args.test_questions is not None:
            generated = dataclasses.replace(generated, test=args.test_questions)
    return StudyConfig(out_dir=args.out_dir, seeds=seeds, arms=arms, train=train, synthetic=generated, user_data=user,
                       ns=tuple(args.ns), trials=args.trials, resamples=args.resamples, progress=args.progress)


def main(argv=None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    from dreamprm_jax.study import report, runner
    from dreamprm_jax.train.loop import TrainingDiverged

    try:
        config = config_from_args(args)
        t0 = time.perf_counter()
        results = runner.run_study(config)
        paths, text = report.write_study(config, results, time.perf_counter() - t0)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: {e or 'the finished pieces are kept'}; run the same command again to continue",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text.rstrip())
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
