"""Write the synthetic DreamPRM benchmark (planted domain qualities) to a directory.

    python -m experiments.make_synthetic --out runs/synthetic --seed 0

(installed: ``dreamprm-make-synthetic``, the same flags)

writes train.json, meta.json, test_bon.json, images/*.png and manifest.json (see
dreamprm_jax/data/synthetic/generate.py).  The same seed and options give byte-identical
JSON files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from dreamprm_jax.data import synthetic


PROG = "dreamprm-make-synthetic"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    d = synthetic.default_config()
    names = [s.name for s in d.domains]
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0] + " Training domains (planted quality, higher = better): "
        + ", ".join(f"{s.name} ({s.quality:g})" for s in d.domains) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=d.seed, help="the only source of randomness")
    p.add_argument("--train-per-domain", type=int, default=d.train_per_domain,
                   help="chains per training domain at scale 1 (misled_B has 3x); each chain gives 5 step records")
    p.add_argument("--chains-per-question", type=int, default=d.chains_per_question,
                   help="training chains sampled per question/image")
    p.add_argument("--meta", type=int, default=d.meta, help="meta chains (half correct, half with a planted error as in the test set)")
    p.add_argument("--meta-candidates", type=int, default=d.meta_candidates,
                   help="candidate chains per meta question (at least one correct and one wrong when >= 2)")
    p.add_argument("--test", type=int, default=d.test, help="best-of-N test questions")
    p.add_argument("--candidates", type=int, default=d.candidates, help="candidate chains per test question")
    p.add_argument("--image-size", type=int, default=d.image_size, help="side of the square RGB images in pixels")
    p.add_argument("--times", type=int, default=d.times, help="simulated Monte-Carlo rollouts per training prefix")
    p.add_argument("--domains", default=",".join(names),
                   help="comma-separated subset of the training domains, in order")
    p.add_argument("--reuse", action="store_true",
                   help="do nothing if --out already holds this exact benchmark (same version and options)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    config = dataclasses.replace(
        synthetic.default_config(), seed=args.seed, train_per_domain=args.train_per_domain,
        chains_per_question=args.chains_per_question, meta=args.meta, meta_candidates=args.meta_candidates,
        test=args.test, candidates=args.candidates,
        image_size=args.image_size, times=args.times)
    config = synthetic.select_domains(config, [n.strip() for n in args.domains.split(",") if n.strip()])
    start = time.perf_counter()
    manifest = synthetic.generate(args.out, config, progress=not args.quiet, reuse=args.reuse)
    if not args.quiet:
        print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {json.dumps(manifest['counts'])}")
        for d in manifest["domains"]:
            print(f"  {d['name']:<10} quality {d['quality']:<4g} oracle weight {d['oracle_weight']:<4g} "
                  f"records {d['records']:<6} {d['description']}")
        print("  best-of-N baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in manifest["test_baselines"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
