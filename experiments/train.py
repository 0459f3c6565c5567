"""``python -m experiments.train``: the ``dreamprm-train`` command (:mod:`dreamprm_jax.cli.train`)."""
import sys

from dreamprm_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.train"))
