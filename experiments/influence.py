"""``python -m experiments.influence``: the ``dreamprm-influence`` command (:mod:`dreamprm_jax.cli.influence`)."""
import sys

from dreamprm_jax.cli.influence import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.influence"))
