"""``python -m experiments.compare_hypergradients``: the ``dreamprm-compare-hypergradients`` command
(:mod:`dreamprm_jax.cli.compare_hypergradients`)."""
import sys

from dreamprm_jax.cli.compare_hypergradients import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.compare_hypergradients"))
