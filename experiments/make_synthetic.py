"""``python -m experiments.make_synthetic``: the ``dreamprm-make-synthetic`` command (:mod:`dreamprm_jax.cli.make_synthetic`)."""
import sys

from dreamprm_jax.cli.make_synthetic import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.make_synthetic"))
