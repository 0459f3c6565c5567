"""Train a DreamPRM process reward model with bi-level domain reweighting.

With no arguments: generates the synthetic multimodal benchmark (planted domain quality),
trains a small Qwen2-VL PRM on this machine's CPU with exact hypergradients, and prints the
learned domain weights beside the planted qualities. With ``--preset qwen2_vl_2b --model-dir
DIR --train-json F --meta-json F`` the same command trains the real 2B model on GPU/TPU.

    python -m experiments.train
    python -m experiments.train --hypergradient darts --out-dir runs/darts
    python -m experiments.train --no-reweighting --out-dir runs/vanilla
    python -m experiments.train --resume --out-dir runs/default --iterations 600
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from dreamprm_jax import configs

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=sorted(configs.PRESETS))
    known, _ = pre.parse_known_args(argv)
    defaults = configs.get(known.preset)

    parser = argparse.ArgumentParser(
        prog="python -m experiments.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre])
    configs.add_arguments(parser, defaults)
    cfg = configs.from_arguments(parser.parse_args(argv), defaults)

    from dreamprm_jax.train import loop

    try:
        result = loop.train(cfg)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(loop.format_result(result))
    print(f"run directory: {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
