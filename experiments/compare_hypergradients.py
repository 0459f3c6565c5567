"""``python -m experiments.compare_hypergradients``: the ``dreamprm-compare-hypergradients`` command
(:mod:`dreamprm_jax.cli.compare_hypergradients`)."""
from dreamprm_jax.cli.compare_hypergradients import main

if __name__ == "__main__":
    main()
