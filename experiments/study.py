"""``python -m experiments.study``: the ``dreamprm-study`` command (:mod:`dreamprm_jax.cli.study`)."""
import sys

from dreamprm_jax.cli.study import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.study"))
