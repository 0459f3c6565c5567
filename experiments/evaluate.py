"""``python -m experiments.evaluate``: the ``dreamprm-evaluate`` command (:mod:`dreamprm_jax.cli.evaluate`)."""
import sys

from dreamprm_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.evaluate"))
